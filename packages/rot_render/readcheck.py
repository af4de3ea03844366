"""Check a shard set against its text: a VLM reads N random rows' stored embeddings back as text.

Why: a shard set is only worth training on if its embeddings carry the CoT. A VLM whose language model reads its
own tower (the shipped anchor; a real Qwen3-VL for its own tower's shards) is given each stored row where an
image's visual tokens would stand, and its transcription is scored against the row's recorded CoT as drawn
(character accuracy = 1 - edit distance / characters, over all rows read).
"""

from __future__ import annotations

import random
from dataclasses import fields
from pathlib import Path

import pyarrow.parquet as pq

from rot_data import shards
from rot_data.edit_distance import edit_distance
from rot_vision.render import RenderSettings, default_font_path, fit_line


def drawn_reference(cot: str, render: dict, token_px: int) -> str:
    """The text the build drew for ``cot``: one line, thought tags if set, cut at --max-tokens."""
    names = {f.name for f in fields(RenderSettings)}
    settings = RenderSettings(**{k: v for k, v in render.items() if k in names})
    if render.get("font_file", "DejaVuSans.ttf") != Path(default_font_path()).name:
        return shards.drawn_text(cot, settings.thought_tags)  # a custom font: the cut cannot be redone here
    return fit_line(cot, settings, token_px)[0]


def sample_rows(folder: Path, manifest: dict, count: int, seed: int) -> list[dict]:
    """``count`` rows drawn at random (seeded) over every shard, with their embeddings."""
    places = [(s["name"], i) for s in manifest["shards"] for i in range(s["rows"])]
    chosen = sorted(random.Random(seed).sample(places, min(count, len(places))))
    rows = []
    for name in dict.fromkeys(n for n, _ in chosen):
        table = pq.read_table(folder / name, columns=["id", "cot", "n_tokens", "embedding"]).to_pylist()
        rows += [table[i] for n, i in chosen if n == name]
    return rows


def read_shards(folder: Path, count: int, reader: str | None = None, seed: int = 0, batch_size: int = 64) -> dict:
    """Transcribe ``count`` random rows with ``reader`` (default: the encoder that built the set); their scores."""
    import torch

    from rot_vision import read

    manifest = shards.read_manifest(folder)
    encoder = manifest["encoder"]
    reader = reader or encoder["name"]
    if reader == "tiny" or (reader == encoder["name"] and encoder.get("untrained")):
        raise ValueError(f"{folder} was built by an untrained tower ('{encoder['name']}'): nothing can read it; "
                         "pass --reader with a VLM that reads these embeddings")
    from transformers import AutoConfig

    from rot_data import registry

    dim, dtype = manifest["embedding"]["dim"], manifest["embedding"]["dtype"]
    config = AutoConfig.from_pretrained(registry.resolve(reader))
    width = getattr(config, "text_config", config).hidden_size
    if width != dim:
        raise ValueError(f"--reader {reader} takes {width}-wide visual tokens but {folder} stores {dim}-wide ones; "
                         f"pass the VLM that built it ({encoder['name']})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vlm, tokenizer = read.load(reader, device=device)
    rows = sample_rows(folder, manifest, count, seed)
    token_px = manifest["render"].get("height") or 32
    references = [drawn_reference(r["cot"], manifest["render"], token_px) for r in rows]
    visual = [shards.decode_embedding(r["embedding"], r["n_tokens"], dim, dtype) for r in rows]
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in references) + 8
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        transcripts = read.transcribe(vlm, tokenizer, visual, longest, batch_size)
    errors = sum(edit_distance(t, r) for t, r in zip(transcripts, references))
    characters = sum(len(r) for r in references)
    return {"rows": len(rows), "reader": reader, "characters": characters,
            "char_accuracy": max(0.0, 1 - errors / max(1, characters)),
            "line_accuracy": sum(t == r for t, r in zip(transcripts, references)) / max(1, len(rows)),
            "examples": [{"id": r["id"], "truth": ref, "read": t} for r, ref, t in zip(rows[:3], references, transcripts)]}
