"""Reading the thought back: a RoT model's generated latents, given to the anchor VLM as if they were the
visual tokens of an image, transcribed as text and scored against the true CoT, per latent position.

RoT trains each latent to be the vision tower's embedding of one 32-px column of the rendered CoT, so a VLM
that reads its own tower's tokens (the anchor) can read the latents: this shows what the model "thought".
Per position k, the score is the share of the true characters drawn in column k that the transcription
reproduces (characters aligned with difflib's longest matching blocks).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch
from tqdm import tqdm

from rot_data import registry
from rot_data.edit_distance import edit_distance
from rot_data.records import load_records
from rot_model.export import latent_budget, latent_merge, read_config
from rot_eval.evaluate import check_positions
from rot_eval.generate import generate_rot, load_for_inference
from rot_model.shard_stream import ShardSet
from rot_eval.viz import token_of_characters


def aligned_matches(truth: str, transcript: str) -> tuple[list[bool], list[bool]]:
    """For each character of ``truth`` and of ``transcript``: is it part of a matching block of the two (difflib)?"""
    in_truth, in_transcript = [False] * len(truth), [False] * len(transcript)
    for block in difflib.SequenceMatcher(None, truth, transcript, autojunk=False).get_matching_blocks():
        in_truth[block.a:block.a + block.size] = [True] * block.size
        in_transcript[block.b:block.b + block.size] = [True] * block.size
    return in_truth, in_transcript


def matched_characters(truth: str, transcript: str) -> list[bool]:
    """For each character of ``truth``: is it reproduced in ``transcript`` (aligned matching blocks)?"""
    return aligned_matches(truth, transcript)[0]


def position_scores(cot: str, transcript: str, render: dict, token_px: int, n_positions: int) -> list[tuple[int, int]]:
    """(reproduced, total) non-space characters of the true CoT drawn under each latent position."""
    line, tokens = token_of_characters(cot, render, token_px)
    counts = [[0, 0] for _ in range(n_positions)]
    for char, token, ok in zip(line, tokens, matched_characters(line, " ".join(transcript.split()))):
        if not char.isspace() and token < n_positions:
            counts[token][0] += ok
            counts[token][1] += 1
    return [tuple(c) for c in counts]


@torch.no_grad()
def read_back(checkpoint: str, dataset: str, shards: Path, out: Path, split: str = "test", data_dir: Path | None = None,
              reader: str = registry.ANCHOR, latents: int | None = None, limit: int | None = None, batch_size: int = 64) -> dict:
    from rot_vision import read

    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: use at least 1 (leave it out for every row)")
    records, _ = load_records(dataset, split, data_dir=data_dir)
    records = records[:limit] if limit is not None else records
    device = "cuda" if torch.cuda.is_available() else "cpu"
    merge = latent_merge(read_config(checkpoint))
    if merge > 1:
        raise ValueError(f"{checkpoint} was trained with --merge-latents {merge}: each latent stands for the mean of {merge} "
                         "visual tokens, and the reader reads one visual token per position; read back an export trained "
                         "with one latent per visual token")
    model, tokenizer, config = load_for_inference(checkpoint, device=device)
    latents = latent_budget(config, latents)
    check_positions(model, tokenizer, [r.question for r in records], latents + 3, "--latents")  # + <img_end>, an answer token
    manifest = ShardSet.open(shards, verify=False).manifest
    render, token_px = manifest["render"], manifest["encoder"]["token_px"]
    vlm, vlm_tokenizer = read.load(reader, device=device)
    totals, examples, char_errors, chars = [[0, 0] for _ in range(latents)], [], 0, 0
    for start in tqdm(range(0, len(records), batch_size), desc=f"read back {dataset}", unit="batch"):
        batch = records[start:start + batch_size]
        generations = generate_rot(model, tokenizer, [r.question for r in batch], latents=latents, max_answer_tokens=1)
        transcripts = read.transcribe(vlm, vlm_tokenizer, [g.latents.to(device) for g in generations],
                                      max_new_tokens=max(len(r.cot) for r in batch) + 16)
        for record, transcript in zip(batch, transcripts):
            truth = " ".join(record.cot.split())
            char_errors += edit_distance(" ".join(transcript.split()), truth)
            chars += len(truth)
            for k, (ok, total) in enumerate(position_scores(record.cot, transcript, render, token_px, latents)):
                totals[k][0] += ok
                totals[k][1] += total
            if len(examples) < 10:
                examples.append({"question": record.question, "truth": truth, "read_back": transcript})
    summary = {"checkpoint": str(checkpoint), "reader": reader, "dataset": dataset, "split": split, "examples": len(records),
               "latents": latents, "char_accuracy": max(0.0, 1 - char_errors / max(1, chars)),
               "per_position": [ok / total if total else None for ok, total in totals], "samples": examples}
    out.mkdir(parents=True, exist_ok=True)
    (out / "readback.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(summary, out / "readback.png")
    return summary


def _plot(summary: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = [(k + 1, 100 * s) for k, s in enumerate(summary["per_position"]) if s is not None]
    figure, axis = plt.subplots(figsize=(8, 3))
    if scores:
        axis.bar(*zip(*scores))
    axis.set(xlabel="latent position", ylabel="characters read back (%)", ylim=(0, 100),
             title=f"latents read by {summary['reader']}: {100 * summary['char_accuracy']:.1f}% of the CoT's characters")
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)


def draw_transcript(transcript: str, png: Path, truth: str | None = None, title: str = "") -> Path:
    """The latents' transcript as a picture: with the true CoT above it, the transcript's characters that match
    the truth (aligned as in the scores) are green and the others red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transcript = " ".join(transcript.split())
    rows = [("read back", transcript, None)]
    if truth is not None:
        truth = " ".join(truth.split())
        matched = aligned_matches(truth, transcript)[1]
        rows = [("true CoT", truth, None), ("read back", transcript, matched)]
    width = max(len(text) for _, text, _ in rows)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.11 * width + 1.5), 0.5 * len(rows) + 0.6))
    axis.set(xlim=(-12, width), ylim=(-0.5, len(rows) - 0.5), title=title)
    axis.axis("off")
    for y, (label, text, matched) in enumerate(reversed(rows)):
        axis.text(-1, y, label, ha="right", va="center", fontsize=9)
        for x, char in enumerate(text):
            colour = "black" if matched is None else ("tab:green" if matched[x] else "tab:red")
            axis.text(x, y, char, ha="center", va="center", family="monospace", fontsize=9, color=colour)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return png
