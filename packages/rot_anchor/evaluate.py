"""The anchor's three figures: reading rendered lines, multiplication CoT from text, answer from the true CoT image.

- reading: character accuracy (1 - edit distance / length, summed over lines) and exact-line accuracy
  on rendered lines never trained on: the CoTs of 4x4 and 5x5 ``test_bigbench``, GSM8k test's natural-language
  solutions, implicit-CoT GSM8k test's equation lines, 1000 fresh random printable strings and English lines
  of documentation topics held out from training;
- CoT from text: question -> ``cot #### answer`` greedy, the answer after ``####`` compared exactly;
- answer from image: RoT's layout with the true CoT's visual tokens where the latents will stand.
"""

from __future__ import annotations

from pathlib import Path

import torch

import random

from tqdm import tqdm

from rot_anchor import texts
from rot_vision import read
from rot_data.edit_distance import edit_distance
from rot_data.records import load_records
from rot_data.tokens import user_turn_ids
from rot_vision.render import RenderSettings, fit_line, render_line

TOKEN_PX = 32
READING_SETS = [("icot_mult_4x4", "test"), ("icot_mult_5x5", "test"), ("gsm8k", "test"), ("icot_gsm8k", "test")]
FRESH_PRINTABLE = 1000  # random printable lines, seeded apart from training's generator


WORST_LINES = 5  # the lines read worst, kept with each set's figures (where the errors are)


def reading_scores(predictions: list[str], references: list[str]) -> dict:
    distances = [edit_distance(p, r) for p, r in zip(predictions, references)]
    characters = sum(len(r) for r in references)
    worst = sorted(range(len(references)), key=lambda i: -distances[i])[:WORST_LINES]
    return {"lines": len(references), "characters": characters, "char_accuracy": max(0.0, 1 - sum(distances) / characters),
            "line_accuracy": sum(d == 0 for d in distances) / len(references),
            "worst": [{"errors": distances[i], "line": references[i], "read": predictions[i]} for i in worst if distances[i]]}


def _records(name: str, split: str, data_dir: Path | None, limit: int | None):
    records, _ = load_records(name, split, data_dir=data_dir, on_error="skip")  # icot_gsm8k test has 2 rows without a CoT
    return records[:limit] if limit is not None else records


def fresh_printable(count: int) -> list[str]:
    """``count`` random printable lines, lengths log-uniform from 1 to ~1000 characters."""
    rng = random.Random("anchor-eval-printable")
    return [texts.printable_line(rng, int(round(1000 ** rng.random()))) for _ in range(count)]


def reading_lines(data_dir: Path | None, limit: int | None) -> dict[str, list[str]]:
    """Set name -> the lines to read, as drawn (cut at --max-tokens like the build)."""
    sets = {f"{name}-{split}": [r.cot for r in _records(name, split, data_dir, limit)] for name, split in READING_SETS}
    sets["printable-fresh"] = fresh_printable(FRESH_PRINTABLE if limit is None else min(limit, FRESH_PRINTABLE))
    sets["english-heldout"] = texts.heldout_english()[:limit]
    settings = RenderSettings()
    return {name: [fit_line(line, settings, TOKEN_PX)[0] for line in lines] for name, lines in sets.items()}


def _visual(model, lines: list[str], chunk: int = 512) -> list[torch.Tensor]:
    settings, out = RenderSettings(), []
    for start in range(0, len(lines), chunk):
        out += read.embed_images(model, [render_line(c, settings, TOKEN_PX) for c in lines[start:start + chunk]])
    return out


def read_lines(model, tokenizer, lines: list[str], batch_size: int = 256) -> list[str]:
    """What the model reads in each rendered line (greedy). Lines go in batches of similar length, each generating
    up to its longest line's tokens + 8: a batch of short lines does not wait on the longest line of the set."""
    lengths = [len(tokenizer(line, add_special_tokens=False)["input_ids"]) for line in lines]
    order = sorted(range(len(lines)), key=lengths.__getitem__)
    read_as = [""] * len(lines)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        visual = _visual(model, [lines[i] for i in chunk])
        for i, text in zip(chunk, read.transcribe(model, tokenizer, visual, max(lengths[i] for i in chunk) + 8, batch_size)):
            read_as[i] = text
    return read_as


def _answer(text: str) -> str:
    return " ".join(text.rsplit("####", 1)[-1].split())


@torch.no_grad()
def evaluate(model, tokenizer, data_dir: Path | None = None, limit: int | None = None, batch_size: int = 256,
             after_each_set=None) -> dict:
    """Every figure; ``after_each_set(results)`` is called as each set finishes (so a cut-off run keeps what it measured)."""
    model.eval()
    results = {"reading": {}, "cot_from_text": {}, "answer_from_image": {}}
    reading = reading_lines(data_dir, limit)
    answer_sets = ("icot_mult_4x4", "icot_mult_5x5", "mult_6x6")
    bar = tqdm(total=len(reading) + 2 + len(answer_sets), desc="anchor figures", unit="set")
    for name, references in reading.items():
        bar.set_postfix_str(f"reading {name}")
        results["reading"][name] = reading_scores(read_lines(model, tokenizer, references, batch_size), references)
        bar.update()
        after_each_set and after_each_set(results)
    for name in answer_sets:
        records = _records(name, "valid", data_dir, limit)
        golds = [" ".join(r.answer.split()) for r in records]
        if name != "mult_6x6":
            bar.set_postfix_str(f"CoT from text {name}")
            prompts = [user_turn_ids(tokenizer, r.question) for r in records]
            texts_out = read.generate(model, tokenizer, prompts, [None] * len(records), 400, batch_size)
            results["cot_from_text"][f"{name}-valid"] = _accuracy([_answer(t) for t in texts_out], golds)
            bar.update()
            after_each_set and after_each_set(results)
        bar.set_postfix_str(f"answer from image {name}")
        visual = _visual(model, [r.cot for r in records])
        prompts = [read.answer_prompt(tokenizer, r.question, len(v)) for r, v in zip(records, visual)]
        texts_out = read.generate(model, tokenizer, prompts, visual, 32, batch_size)
        results["answer_from_image"][f"{name}-valid"] = _accuracy([" ".join(t.split()) for t in texts_out], golds)
        bar.update()
        after_each_set and after_each_set(results)
    bar.close()
    return results


def _accuracy(predictions: list[str], golds: list[str]) -> dict:
    correct = sum(p == g for p, g in zip(predictions, golds))
    return {"examples": len(golds), "accuracy": correct / len(golds), "sample": predictions[:2]}
