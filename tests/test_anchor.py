"""The anchor's recipe at micro scale on the CPU: data, pretraining that learns and resumes, the exported
checkpoint read back by the build's encoder, the trainer's backbone loader and rot-render read."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from rot_anchor.evaluate import reading_scores
from rot_data.edit_distance import edit_distance
from rot_anchor.model import byte_tokenizer
from rot_data import multiplication


@pytest.mark.parametrize("n", [4, 5])
def test_generator_reproduces_every_shared_line(shared_data, n):
    for name in ("valid.txt", "test_bigbench.txt"):
        for text in (shared_data / f"icot_mult_{n}x{n}" / name).read_text().splitlines():
            left, right = text.split("||")[0].split(" * ")
            a, b = (int("".join(reversed(side.split()))) for side in (left, right))
            assert multiplication.line(a, b, n) == text.strip()


def test_generated_lines_avoid_the_held_out_questions(shared_data):
    held_out = [shared_data / "icot_mult_4x4" / f for f in ("valid.txt", "test_bigbench.txt")]
    excluded = multiplication.excluded_questions(held_out)
    assert len(excluded) == 2000
    first = multiplication.question_of(held_out[0].read_text().splitlines()[0])
    lines = multiplication.generate(4, 3000, seed=1, exclude=excluded | {first})
    questions = [multiplication.question_of(t) for t in lines]
    assert len(set(questions)) == 3000 and not set(questions) & excluded


def test_edit_distance_matches_dynamic_programming():
    def reference(a, b):
        previous = list(range(len(b) + 1))
        for i, char_a in enumerate(a, 1):
            current = [i]
            for j, char_b in enumerate(b, 1):
                current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
            previous = current
        return previous[-1]

    rng = random.Random(0)
    for _ in range(500):
        a, b = ("".join(rng.choice("01 +(") for _ in range(rng.randint(0, 40))) for _ in range(2))
        assert edit_distance(a, b) == reference(a, b)
    assert reading_scores(["1 2 3", "4 5"], ["1 2 3", "4 6"]) == {"lines": 2, "characters": 8, "char_accuracy": 1 - 1 / 8,
                                                                  "line_accuracy": 0.5,
                                                                  "worst": [{"errors": 1, "line": "4 6", "read": "4 5"}]}


def test_sample_prompts_are_the_chat_template_the_trainer_uses(shared_data):
    from rot_anchor.tasks import SampleMaker
    from rot_data.tokens import user_turn_ids

    tokenizer = byte_tokenizer()
    maker = SampleMaker(tokenizer)
    question = "5 6 3 2 * 7 4 3 4"
    assert maker.prompt(maker.encode(question)) == user_turn_ids(tokenizer, question)
    sample = maker.make("answer", question, "5 5 5 6 1 + 0 0 6 4 9 0", "5 5 6 0 8 2 0 1")
    n_visual = sample["ids"].count(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    assert n_visual * 4 == len(sample["patches"]) and n_visual == 8  # 8 tokens of 32 px for this line
    target = tokenizer.decode(sample["ids"][sample["loss_from"]:])
    assert target == "<img_end>5 5 6 0 8 2 0 1<|im_end|>"


def test_every_sample_counts_equally_so_each_task_gets_its_share_of_the_loss(shared_data):
    from rot_anchor.tasks import TASKS, Mixture, PretrainData

    data = PretrainData(byte_tokenizer(), None, seed=3, mixture=Mixture(batch=40, text_batch=8, group_weights=(1.0, 0.5)))
    micro_batches = data.batch(0)
    per_task = torch.zeros(len(TASKS))
    rows, text_tokens, text_weight = 0, 0, 0.0
    for micro in micro_batches:
        predicted = micro["loss_mask"][:, 1:]  # the tokens micro_batch_loss predicts (each row's weight is constant)
        weight_per_row = (micro["token_weight"][:, 1:] * predicted).sum(1)
        per_task.index_add_(0, micro["task"], weight_per_row)
        rows += len(weight_per_row)
        text = micro["task"] >= TASKS.index("ocr_english")
        text_tokens += int(predicted[text].sum())
        text_weight += float(micro["token_weight"][text][:, 0].sum())
    assert rows == 48 and per_task.sum().item() == pytest.approx(1.5)  # each group's weights sum to the group weight
    answer_rows = sum(int((m["task"] == TASKS.index("answer")).sum()) for m in micro_batches)
    assert answer_rows and per_task[TASKS.index("answer")].item() >= answer_rows * 1.0 / 40 - 1e-6  # by samples
    assert text_weight / 8 == pytest.approx(0.5 / text_tokens)  # the text group: every character weighs the same


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, shared_data):
    from rot_anchor.pretrain import PretrainConfig, run

    out = tmp_path_factory.mktemp("anchor-micro")
    cfg = PretrainConfig(out=str(out), size="micro", steps=30, batch=24, text_batch=8,
                         lr=3e-3, warmup_steps=5, workers=0, log_every=10, save_every=15)
    run(cfg)
    return out, cfg


def test_micro_pretraining_learns_and_writes_its_records(micro_run):
    out, _ = micro_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    for task, drop in (("cot", 0.8), ("answer", 0.8), ("ocr", 0.8), ("ocr_random", 0.8), ("ocr_english", 0.9)):
        assert rows[-1][f"loss/{task}"] < drop * rows[0][f"loss/{task}"], task  # English: ~3 lines a step, 1 in 5 long
    assert (out / "loss.png").stat().st_size > 0 and list((out / "tensorboard").iterdir())
    assert (out / "model" / "config.json").exists() and (out / "model" / "preprocessor_config.json").exists()


def test_pretraining_resumes_where_it_stopped(micro_run, tmp_path):
    import shutil

    from rot_anchor.pretrain import PretrainConfig, run
    from rot_anchor.tasks import PretrainData

    out, cfg = micro_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    state = torch.load(copy / "resume.pt", weights_only=False)
    assert state["step"] == 30
    longer = PretrainConfig(**{**cfg.__dict__, "out": str(copy), "steps": 40})
    run(longer)
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]  # steps 31-40 only: nothing trained twice
    data = PretrainData(byte_tokenizer(), cfg.data_dir, cfg.seed)
    first, again = data.batch(7), data.batch(7)  # a step's batch is a pure function of (seed, step)
    assert all(torch.equal(a["ids"], b["ids"]) and torch.equal(a["patches"], b["patches"]) for a, b in zip(first, again))


def test_export_is_read_by_the_build_encoder_the_backbone_loader_and_hf_generate(micro_run):
    import numpy as np
    from transformers import Qwen3VLForConditionalGeneration

    from rot_vision import read
    from rot_vision.tower import VisionEncoder
    from rot_vision.render import RenderSettings, render_line
    from rot_data.tokens import IMG_BEGIN, user_turn_ids
    from rot_model.backbone import add_latent_tokens, load_backbone

    folder = micro_run[0] / "model"
    image = render_line("1 2 3 + 4 5 6 ( 7 8 9 )", RenderSettings(), 32)
    vlm, tokenizer = read.load(str(folder))
    read.prepare_tower(vlm)
    with torch.no_grad():
        ours = read.embed_images(vlm, [image])[0]
        built = VisionEncoder.from_pretrained(str(folder)).encode([image])[0]
    torch.testing.assert_close(built, ours)
    lm, lm_tokenizer = load_backbone(str(folder), dtype=torch.float32)
    prompt = torch.tensor([user_turn_ids(tokenizer, "1 2 * 3 4")])
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=prompt).logits, vlm(input_ids=prompt).logits, atol=1e-5, rtol=1e-4)
    before = lm.get_input_embeddings().weight.detach().clone()
    ids = add_latent_tokens(lm, lm_tokenizer)
    assert len(lm_tokenizer) == before.shape[0]  # the anchor's own <img_begin>/<img_end>: nothing added ...
    torch.testing.assert_close(lm.get_input_embeddings().weight[ids[IMG_BEGIN]], before[ids[IMG_BEGIN]])  # ... nor re-drawn
    patches, grid = VisionEncoder.from_pretrained(str(folder)).patchify(image)
    reading = torch.tensor([read.reading_prompt(tokenizer, len(ours))])
    generated = Qwen3VLForConditionalGeneration.generate(vlm, input_ids=reading, pixel_values=patches,
                                                         image_grid_thw=torch.tensor([grid]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, reading.shape[1] + 4) and np.isfinite(ours.numpy()).all()


def test_rot_render_read_transcribes_with_a_given_checkpoint(micro_run, tmp_path):
    from typer.testing import CliRunner

    from rot_render.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["show", "1 2 3", "-o", str(tmp_path / "line.png")]).exit_code == 0
    result = runner.invoke(app, ["read", str(tmp_path / "line.png"), "--text", "4 5 6", "--model", str(micro_run[0] / "model")])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'line.png'}: " in result.output and "\n--text: " in result.output, result.output
    missing = runner.invoke(app, ["read", str(tmp_path / "nope.png"), "--model", str(micro_run[0] / "model")])
    assert missing.exit_code == 1 and "nope.png does not exist" in missing.output


def test_the_shipped_anchor_is_the_default_and_reads_a_rendered_line(tmp_path):
    """The trained checkpoint in the package: `rot-render read` transcribes a rendered CoT line and a PNG exactly,
    and it is what `rot-render build` encodes with unless told otherwise."""
    from rot_data import registry
    from typer.testing import CliRunner

    from rot_render.cli import app
    from rot_render.pipeline import BuildConfig

    assert BuildConfig(dataset="gsm8k", out=tmp_path).encoder == registry.ANCHOR
    assert (registry.SHIPPED[registry.ANCHOR] / "README.md").exists()  # the model card
    line = "1 2 3 4 5 + 0 6 7 8 9 1 ( 1 8 0 3 5 2 )"  # random digits in the CoT layout: reading, not recall
    cot = "8 9 7 5 3 + 0 2 4 9 3 2 ( 8 1 2 5 7 2 )"
    runner = CliRunner()
    assert runner.invoke(app, ["show", cot, "-o", str(tmp_path / "cot.png")]).exit_code == 0
    result = runner.invoke(app, ["read", str(tmp_path / "cot.png"), "--text", line])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'cot.png'}: {cot}\n" in result.output and f"--text: {line}\n" in result.output, result.output


@pytest.mark.parametrize("name,digits,latents", [("rot-4x4", 4, 28), ("rot-5x5", 5, 44)])
def test_the_shipped_rot_models_multiply_questions_they_never_saw(tmp_path, name, digits, latents):
    """`rot-eval run --checkpoint rot-4x4` (or rot-5x5) on a file of fresh rows: the shipped RoT model answers from its
    own latents (no vision tower, no CoT text) and gets nearly all of them right; a name that is not shipped fails in
    one line."""
    from rot_data import registry
    from typer.testing import CliRunner

    from rot_eval.cli import app

    assert (registry.SHIPPED[name] / "README.md").exists()  # the model card
    rows = tmp_path / "fresh.txt"
    rows.write_text("\n".join(multiplication.generate(digits, 48, seed=20261127)) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--checkpoint", name, "--dataset", str(rows), "--out", str(tmp_path / "ev"),
                                 "--batch-size", "48"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["examples"] == 48 and summary["mean_reasoning_tokens"] == latents
    assert summary["accuracy"] >= 0.95, summary  # on the 1000 test rows: rot-4x4 100%, rot-5x5 99.7%
    missing = runner.invoke(app, ["run", "--checkpoint", "rot-6x6", "--dataset", str(rows), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "rot-6x6/rot_config.json is missing" in missing.output, missing.output


def test_reading_lines_cover_every_printable_character_and_the_calculator_layout():
    """The text group's generators: random strings reach every printable character (all drawable in the default
    font, so no glyph is unseen), equation lines are calculator notes, and long lines are cut where the build cuts."""
    from rot_anchor import texts
    from rot_anchor.tasks import PretrainData, SampleMaker
    from rot_vision.render import drawing_problem

    rng = random.Random(0)
    drawn = "".join(texts.printable_line(rng, 200) for _ in range(200))
    assert set(texts.PRINTABLE) <= set(drawn) and drawing_problem(texts.PRINTABLE) is None
    for _ in range(50):
        line = texts.equation_line(rng)
        assert re.fullmatch(r"<<[^<>]+=[^<>]+>>( <<[^<>]+=[^<>]+>>)*", line), line
    assert texts.heldout_english() and not set(texts.heldout_english()) & set(texts.english_paragraphs())
    maker = SampleMaker(byte_tokenizer())
    sample = maker.make("ocr_english", "", texts.long_line(rng, texts.english_line, 3000), "")
    n_visual = sample["ids"].count(maker.pad)
    target = maker.tokenizer.decode(sample["ids"][sample["loss_from"]:-1])
    assert n_visual == 512 and 1000 < len(target) < 3000  # cut at --max-tokens 512, the target is what was drawn
    data = PretrainData(byte_tokenizer(), None, seed=0)
    assert {t for m in data.batch(1) for t in m["task"].tolist()} == set(range(7))  # every task in one step
