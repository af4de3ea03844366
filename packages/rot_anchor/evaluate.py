"""The anchor's three figures: reading rendered lines, multiplication CoT from text, answer from the true CoT image.

- reading: character accuracy (1 - edit distance / length, summed over lines) and exact-line accuracy
  on rendered CoTs of held-out sets (4x4 and 5x5 ``test_bigbench``, GSM8k test);
- CoT from text: question -> ``cot #### answer`` greedy, the answer after ``####`` compared exactly;
- answer from image: RoT's layout with the true CoT's visual tokens where the latents will stand.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rot_anchor import read
from rot_data.edit_distance import edit_distance
from rot_data.records import load_records
from rot_render.render import RenderSettings, line_text, render_line

TOKEN_PX = 32


def reading_scores(predictions: list[str], references: list[str]) -> dict:
    errors = sum(edit_distance(p, r) for p, r in zip(predictions, references))
    characters = sum(len(r) for r in references)
    return {"lines": len(references), "characters": characters, "char_accuracy": max(0.0, 1 - errors / characters),
            "line_accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references)}


def _records(name: str, split: str, data_dir: Path, limit: int | None):
    records, _ = load_records(name, split, data_dir=data_dir)
    return records[:limit] if limit else records


def _visual(model, cots: list[str], chunk: int = 512) -> list[torch.Tensor]:
    settings, out = RenderSettings(), []
    for start in range(0, len(cots), chunk):
        out += read.embed_images(model, [render_line(c, settings, TOKEN_PX) for c in cots[start:start + chunk]])
    return out


def _answer(text: str) -> str:
    return " ".join(text.rsplit("####", 1)[-1].split())


@torch.no_grad()
def evaluate(model, tokenizer, data_dir: Path, limit: int | None = None, batch_size: int = 256) -> dict:
    model.eval()
    results = {"reading": {}, "cot_from_text": {}, "answer_from_image": {}}
    reading_sets = [("icot_mult_4x4", "test"), ("icot_mult_5x5", "test"), ("gsm8k", "test")]
    for name, split in reading_sets:
        records = _records(name, split, data_dir, limit)
        references = [line_text(r.cot, RenderSettings()) for r in records]
        longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 8
        predictions = read.transcribe(model, tokenizer, _visual(model, [r.cot for r in records]), longest, batch_size)
        results["reading"][f"{name}-{split}"] = reading_scores(predictions, references)
    for name in ("icot_mult_4x4", "icot_mult_5x5"):
        records = _records(name, "valid", data_dir, limit)
        golds = [" ".join(r.answer.split()) for r in records]
        prompts = [read.question_prompt(tokenizer, r.question) for r in records]
        texts = read.generate(model, tokenizer, prompts, [None] * len(records), 256, batch_size)
        results["cot_from_text"][f"{name}-valid"] = _accuracy([_answer(t) for t in texts], golds)
        visual = _visual(model, [r.cot for r in records])
        prompts = [read.answer_prompt(tokenizer, r.question, len(v)) for r, v in zip(records, visual)]
        texts = read.generate(model, tokenizer, prompts, visual, 32, batch_size)
        results["answer_from_image"][f"{name}-valid"] = _accuracy([" ".join(t.split()) for t in texts], golds)
    return results


def _accuracy(predictions: list[str], golds: list[str]) -> dict:
    correct = sum(p == g for p, g in zip(predictions, golds))
    return {"examples": len(golds), "accuracy": correct / len(golds), "sample": predictions[:2]}
