"""The anchor's pretraining data: every sample is one chat turn, made on the fly from a seeded generator.

Tasks, all in the layouts that the rest of the project feeds the model:
- ``cot``: question -> ``cot #### answer`` as text (the SFT-CoT layout);
- ``answer``: question, then ``<img_begin>`` [the rendered CoT's visual tokens] ``<img_end>`` -> answer
  (exactly where RoT's latents stand: the upper bound RoT aims at, and what makes the LM read its tower);
- ``ocr``: ``<img_begin>`` [a rendered line] ``<img_end>`` -> the line's text, for multiplication CoTs;
- ``ocr_random``: the same with the digits of a multiplication CoT replaced by random ones, so the
  language model must read rather than recompute;
- ``ocr_english``, ``ocr_equation``, ``ocr_printable``: reading English prose (GSM8k train, the Python
  documentation), calculator-note equation lines and random printable strings (``texts.py``), some joined
  into long lines up to the build's ``--max-tokens``.
Lines are rendered by the project's renderer with the build's default settings and patchified by the
build's own patchifier. No question of a shipped valid/test file is ever generated, and no held-out text read.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rot_anchor import texts
from rot_data import multiplication
from rot_data.records import PACKAGE_DATA
from rot_data.tokens import IM_END, IM_START, IMAGE_PAD, IMG_BEGIN, IMG_END
from rot_vision.tower import QWEN3_VL_PATCHIFIER
from rot_vision.render import RenderSettings, fit_line, render_line

TOKEN_PX = 32  # Qwen3-VL: patch 16 with a 2x2 merge
TASKS = ("cot", "answer", "ocr", "ocr_random", "ocr_english", "ocr_equation", "ocr_printable")
HELD_OUT = ["icot_mult_4x4/valid.txt", "icot_mult_4x4/test_bigbench.txt", "icot_mult_5x5/valid.txt",
            "icot_mult_5x5/test_bigbench.txt", "mult_3x3/valid.txt", "mult_3x3/test.txt", "mult_6x6/valid.txt",
            "mult_6x6/test.txt"]  # under the shipped data folder (or --data-dir)


@dataclass
class Mixture:
    """What one optimizer step sees: an arithmetic group and a text group, each with task weights."""

    batch: int = 256  # arithmetic samples per step
    text_batch: int = 128  # text-reading samples per step
    sizes: dict = field(default_factory=lambda: {3: 0.1, 4: 0.3, 5: 0.4, 6: 0.2})  # n x n for cot / answer
    ocr_sizes: tuple = (3, 4, 5, 6)
    arithmetic_tasks: dict = field(default_factory=lambda: {"cot": 0.15, "answer": 0.45, "ocr": 0.2, "ocr_random": 0.2})
    text_tasks: dict = field(default_factory=lambda: {"ocr_english": 0.4, "ocr_equation": 0.25, "ocr_printable": 0.35})
    span_fraction: float = 0.3  # multiplication OCR lines cut to a random run of words
    long_fraction: float = 0.2  # text lines joined to a random length up to the line's cap (--max-tokens)
    run_fraction: float = 0.1  # words of random printable lines that are one character repeated (rules, tables)
    group_weights: tuple = (1.0, 1.0)  # arithmetic (every sample counts equally), text (every character counts equally)
    micro_batch_tokens: int = 98304  # padded tokens per forward pass (fewer passes: a step is bound by launch overhead)


def _pick(rng: random.Random, weights: dict):
    return rng.choices(list(weights), weights=list(weights.values()))[0]


class SampleMaker:
    """Turns (task, question, cot, answer) into token ids, a loss mask and an optional image."""

    def __init__(self, tokenizer, settings: RenderSettings = RenderSettings()):
        self.tokenizer, self.settings = tokenizer, settings
        ids = tokenizer.convert_tokens_to_ids
        self.im_start, self.im_end, self.pad = ids(IM_START), ids(IM_END), ids(IMAGE_PAD)
        self.img_begin, self.img_end = ids(IMG_BEGIN), ids(IMG_END)
        self.user, self.assistant, self.newline = self.encode("user\n"), self.encode("assistant\n"), self.encode("\n")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, user_ids: list[int]) -> list[int]:
        """The chat template's user turn and assistant prompt, as ids (a test checks it equals apply_chat_template)."""
        return [self.im_start] + self.user + user_ids + [self.im_end] + self.newline + [self.im_start] + self.assistant

    def image(self, text: str) -> tuple[np.ndarray, int, str]:
        """(uint8 patches of the rendered line, its number of visual tokens, the text drawn: cut at --max-tokens)."""
        drawn = fit_line(text, self.settings, TOKEN_PX)[0]
        patches, (_, h, w) = QWEN3_VL_PATCHIFIER.grey_patches(render_line(drawn, self.settings, TOKEN_PX))
        return patches, h * w // 4, drawn

    def make(self, task: str, question: str, cot: str, answer: str) -> dict:
        patches = None
        if task == "cot":
            prompt, target = self.prompt(self.encode(question)), self.encode(f"{fit_line(cot, self.settings, TOKEN_PX)[0]} #### {answer}")
        elif task == "answer":
            patches, n, _ = self.image(cot)
            prompt = self.prompt(self.encode(question)) + [self.img_begin] + [self.pad] * n
            target = [self.img_end] + self.encode(answer)
        else:  # every reading task: the text drawn is the target
            patches, n, drawn = self.image(cot)
            prompt = self.prompt([self.img_begin] + [self.pad] * n + [self.img_end])
            target = self.encode(drawn)
        ids = prompt + target + [self.im_end]
        return {"ids": ids, "loss_from": len(prompt), "patches": patches, "task": TASKS.index(task)}


def random_span(text: str, rng: random.Random) -> str:
    words = text.split()
    start = rng.randrange(len(words))
    return " ".join(words[start:rng.randint(start + 1, len(words))])


def scramble_digits(text: str, rng: random.Random) -> str:
    return "".join(str(rng.randrange(10)) if c.isdigit() else c for c in text)


class PretrainData:
    """``batch(step)``: the samples of one optimizer step, a pure function of (seed, step), so a resumed run
    sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, tokenizer, data_dir: Path | None, seed: int, mixture: Mixture = Mixture()):
        self.maker, self.seed, self.mixture = SampleMaker(tokenizer), seed, mixture
        base = Path(data_dir) if data_dir else PACKAGE_DATA
        held_out = [base / f for f in HELD_OUT]
        missing = [str(p) for p in held_out if not p.exists()]
        if missing:
            raise FileNotFoundError(f"the valid/test files to exclude are missing: {', '.join(missing)}; "
                                    "leave --data-dir out to use the shipped ones")
        self.excluded = multiplication.excluded_questions(held_out)
        self.max_characters = RenderSettings().max_tokens * 4  # long lines are drawn up to the cap, then cut
        texts.gsm8k_train(), texts.english_paragraphs()  # loaded once here, shared by the loader's workers

    def _multiplication(self, n: int, rng: random.Random) -> tuple[str, str, str]:
        while True:
            text = multiplication.random_line(n, rng)
            if multiplication.question_of(text) not in self.excluded:
                question, rest = text.split("||")
                cot, answer = rest.split(" #### ")
                return question, cot, answer

    def arithmetic_sample(self, rng: random.Random) -> dict:
        task = _pick(rng, self.mixture.arithmetic_tasks)
        n = rng.choice(self.mixture.ocr_sizes) if task.startswith("ocr") else _pick(rng, self.mixture.sizes)
        question, cot, answer = self._multiplication(n, rng)
        if task == "ocr_random":
            cot = scramble_digits(cot, rng)
        if task.startswith("ocr") and rng.random() < self.mixture.span_fraction:
            cot = random_span(cot, rng)
        return self.maker.make(task, question, cot, answer)

    def text_sample(self, rng: random.Random) -> dict:
        task = _pick(rng, self.mixture.text_tasks)
        pieces = {"ocr_english": texts.english_line, "ocr_equation": texts.equations_text,
                  "ocr_printable": lambda r: texts.printable_line(r, int(round(300 ** r.random())), self.mixture.run_fraction)}[task]
        if rng.random() < self.mixture.long_fraction:
            line = texts.long_line(rng, pieces, rng.randint(200, self.max_characters))
        else:
            line = pieces(rng)
        return self.maker.make(task, "", line, "")

    def batch(self, step: int) -> list[dict]:
        """The step's micro-batches. In the arithmetic group every sample counts equally, whatever its length: a
        sample's tokens carry ``group weight / (samples in the group x the sample's target tokens)``, so a task's
        share of the loss is its share of the mixture (counted per token, a 10-digit answer would weigh a tenth of a
        100-character CoT, and the answer task would barely be trained). In the text group every target token counts
        equally (reading is measured per character)."""
        rng = random.Random(self.seed * 1_000_003 + step)
        groups = [[self.arithmetic_sample(rng) for _ in range(self.mixture.batch)],
                  [self.text_sample(rng) for _ in range(self.mixture.text_batch)]]
        micro_batches = []
        for index, (weight, group) in enumerate(zip(self.mixture.group_weights, groups)):
            group_tokens = sum(len(s["ids"]) - s["loss_from"] for s in group)
            for sample in group:
                targets = len(sample["ids"]) - sample["loss_from"]
                sample["weight"] = weight / (len(group) * targets) if index == 0 else weight / group_tokens
            for chunk in by_length(group, self.mixture.micro_batch_tokens):
                micro_batches.append(collate(chunk, self.maker.tokenizer.pad_token_id))
        return [m for m in micro_batches if len(m["ids"])]


def by_length(samples: list[dict], max_tokens: int) -> list[list[dict]]:
    """Samples sorted by length, cut into chunks of at most ``max_tokens`` padded tokens (little padding)."""
    chunks, chunk = [], []
    for sample in sorted(samples, key=lambda s: len(s["ids"])):
        if chunk and (len(chunk) + 1) * len(sample["ids"]) > max_tokens:
            chunks.append(chunk)
            chunk = []
        chunk.append(sample)
    return chunks + [chunk] if chunk else chunks


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-padded ids and loss mask; the images' patches packed in row order, rows sorted by image width
    (equal widths sit together, so the tower's attention runs one batched call per width)."""
    import torch

    samples = sorted(samples, key=lambda s: 0 if s["patches"] is None else len(s["patches"]))
    width = -(-max(len(s["ids"]) for s in samples) // 32) * 32  # few distinct shapes: the GPU allocator reuses blocks
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(samples), width), dtype=torch.bool)
    token_weight = torch.zeros((len(samples), width))
    for row, sample in enumerate(samples):
        ids[row, :len(sample["ids"])] = torch.tensor(sample["ids"])
        loss_mask[row, sample["loss_from"]:len(sample["ids"])] = True
        token_weight[row] = sample.get("weight", 1.0)
    images = [s["patches"] for s in samples if s["patches"] is not None]
    patches = torch.from_numpy(np.concatenate(images)) if images else torch.zeros(0, QWEN3_VL_PATCHIFIER.patch_size**2, dtype=torch.uint8)
    grids = torch.tensor([(1, 2, len(p) // 2) for p in images], dtype=torch.long).reshape(-1, 3)
    return {"ids": ids, "loss_mask": loss_mask, "token_weight": token_weight, "patches": patches, "grids": grids,
            "task": torch.tensor([s["task"] for s in samples])}
