"""Look inside the latents of one question: the paper's three pictures, and what text each latent is nearest to.

- ``heatmap.png``: the latent matrix [n_latents, dim] (rows = reasoning steps);
- ``similarity.png``: cosine similarity between every pair of latents (the "saturation plateau"
  shows as a bright block once later latents become nearly identical);
- ``stats.png``: per-latent norm, mean and std;
- with a shard set, ``nearest.md``: for each latent, the closest stored visual tokens and the piece of
  rendered CoT text under each (found from the manifest's render settings and the same font).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rot_data.shards import drawn_text


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(latents: torch.Tensor, out: Path, title: str) -> list[Path]:
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    latents = latents.float()
    paths = []

    figure, axis = plt.subplots(figsize=(10, 4))
    image = axis.imshow(latents.numpy(), aspect="auto", cmap="RdBu_r", interpolation="nearest")
    axis.set(xlabel="embedding dimension", ylabel="latent token", title=f"latent embeddings: {title}")
    figure.colorbar(image)
    paths.append(save_figure(figure, out / "heatmap.png", plt))

    unit = torch.nn.functional.normalize(latents, dim=-1)
    figure, axis = plt.subplots(figsize=(5, 4.5))
    image = axis.imshow((unit @ unit.T).numpy(), vmin=-1, vmax=1, cmap="viridis")
    axis.set(xlabel="latent token", ylabel="latent token", title="cosine similarity")
    figure.colorbar(image)
    paths.append(save_figure(figure, out / "similarity.png", plt))

    figure, axes = plt.subplots(1, 3, figsize=(12, 3))
    steps = range(1, len(latents) + 1)
    for axis, values, name in zip(axes, (latents.norm(dim=-1), latents.mean(-1), latents.std(-1)), ("norm", "mean", "std")):
        axis.plot(steps, values.numpy(), marker="o", markersize=3)
        axis.set(xlabel="latent token", title=name)
    paths.append(save_figure(figure, out / "stats.png", plt))
    return paths


def save_figure(figure, path: Path, plt) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def token_of_characters(text: str, render: dict, token_px: int) -> tuple[str, list[int]]:
    """The line as drawn (one line, optional thought tags) and, for each of its characters, the index of the
    token_px-wide column its centre falls in (same font and settings as the build, read from its manifest)."""
    import matplotlib
    from PIL import ImageFont

    font_path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / render.get("font_file", "DejaVuSans.ttf")
    font = ImageFont.truetype(str(font_path), render["font_size"], layout_engine=ImageFont.Layout.BASIC)
    line = drawn_text(text, bool(render.get("thought_tags")))
    centres = [render["padding"] + font.getlength(line[:i]) + font.getlength(line[i]) / 2 for i in range(len(line))]
    return line, [int(x // token_px) for x in centres]


def _token_texts(text: str, n_tokens: int, render: dict, token_px: int) -> list[str]:
    """The characters drawn inside each token_px-wide column of a rendered line."""
    line, tokens = token_of_characters(text, render, token_px)
    return ["".join(c for c, t in zip(line, tokens) if t == k) for k in range(n_tokens)]


def nearest_text(latents: torch.Tensor, shard_set, top: int = 3, max_rows: int = 2048) -> str:
    """Markdown: for each latent, the ``top`` nearest stored visual tokens (cosine) and their text."""
    rows, vectors, owners = [], [], []
    for shard in range(len(shard_set.manifest["shards"])):
        for row in shard_set.read_rows(shard):
            if len(rows) >= max_rows:
                break
            embedding = shard_set.embedding(row)
            owners += [(len(rows), k) for k in range(len(embedding))]
            vectors.append(embedding)
            rows.append(row)
    bank = torch.nn.functional.normalize(torch.cat(vectors), dim=-1)
    scores = torch.nn.functional.normalize(latents.float(), dim=-1) @ bank.T
    token_px = shard_set.manifest["encoder"]["token_px"]
    render = shard_set.manifest["render"]
    lines = [f"Nearest rendered CoT tokens among {len(rows)} rows of {shard_set.folder} (cosine similarity).", "",
             "| latent | nearest tokens: text under the token (row id, token index, similarity) |", "|---|---|"]
    for i, row_scores in enumerate(scores):
        best = row_scores.topk(min(top, len(row_scores)))
        cells = []
        for score, index in zip(best.values.tolist(), best.indices.tolist()):
            row_index, token = owners[index]
            row = rows[row_index]
            text = _token_texts(row["cot"], row["n_tokens"], render, token_px)[token]
            cells.append(f"`{text or ' '}` ({row['id']}, {token}, {score:.2f})")
        lines.append(f"| {i + 1} | " + "; ".join(cells) + " |")
    return "\n".join(lines) + "\n"
