"""Inference and evaluation on a tiny backbone: budget, dynamic stop, batch = single, cache = no cache, table, viz."""

import json
import subprocess

import pytest
import torch

from rot_data.records import load_records
from rot_data.tokens import IMG_BEGIN, IMG_END
from rot_model.backbone import add_latent_tokens, load_backbone
from rot_model.export import export, load_export
from rot_eval.generate import generate_rot, generate_text
from rot_model.model import RoTModel
from rot_model.shard_stream import ShardSet
from rot_train.train import TrainConfig
from tests.conftest import invoke

QUESTIONS = ["What is 3 + 4?", "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many?",
             "Tom has 5 apples.", "How many legs do 3 cats have?"]


@pytest.fixture(scope="module")
def exported(tiny_qwen3_vl, tiny_shards, tmp_path_factory):
    """An export of a tiny RoT model (random head, scaled so latents are not negligible)."""
    torch.manual_seed(0)
    lm, tokenizer = load_backbone(str(tiny_qwen3_vl), dtype=torch.float32)
    ids = add_latent_tokens(lm, tokenizer)
    model = RoTModel(lm, 64, ids[IMG_BEGIN], ids[IMG_END], head_width=32)
    with torch.no_grad():
        model.head.fc_out.weight.mul_(20)
    folder = tmp_path_factory.mktemp("export") / "export"
    config = TrainConfig(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out="x", head_width=32)
    export(model, tokenizer, folder, config, ShardSet.open(tiny_shards), ids)
    return folder


def test_a_lora_export_is_decoded_on_merged_weights_with_the_same_outputs(exported, tiny_shards, tiny_qwen3_vl, tmp_path):
    """rot-eval merges a Stage II LoRA adapter into the weights (one weight read per step, no adapter matmuls): the
    same tokens and latents as the adapter-wrapped model."""
    from peft import LoraConfig, get_peft_model

    from rot_eval.generate import load_for_inference

    model, tokenizer, config = load_export(exported)
    torch.manual_seed(1)  # adapters that change the outputs (peft starts lora_B at zero)
    model.lm = get_peft_model(model.lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path / "lora-export"
    stage2 = TrainConfig(stage=2, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out="x", head_width=32)
    export(model, tokenizer, folder, stage2, ShardSet.open(tiny_shards), config["tokens"])
    wrapped, _, _ = load_export(folder)
    merged, _, _ = load_for_inference(folder)
    assert hasattr(wrapped.lm, "peft_config") and not hasattr(merged.lm, "peft_config")
    assert not any("lora_" in name for name, _ in merged.lm.named_parameters())
    reference = generate_rot(wrapped, tokenizer, QUESTIONS, latents=5, max_answer_tokens=6)
    decoded = generate_rot(merged, tokenizer, QUESTIONS, latents=5, max_answer_tokens=6)
    assert [g.token_ids for g in decoded] == [g.token_ids for g in reference]
    for a, b in zip(decoded, reference):
        torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
    base = generate_rot(load_export(exported)[0], tokenizer, QUESTIONS, latents=5, max_answer_tokens=6)
    assert any(not torch.allclose(a.latents, b.latents, atol=1e-3) for a, b in zip(base, reference))  # the adapter acts


def test_rot_eval_decodes_on_fused_projections_with_the_same_outputs_and_export_refuses_them(exported, tiny_shards,
                                                                                           tiny_qwen3_vl, tmp_path):
    """``load_for_inference`` fuses q/k/v and gate/up (one product each): the same tokens and latents as the model as
    exported; a fused model is not exported (its weights would not load back into the separate projections)."""
    from rot_eval.generate import load_for_inference
    from rot_model.fused import FusedInput

    model, tokenizer, config = load_export(exported)
    fused, _, _ = load_for_inference(exported)
    assert all(isinstance(layer.self_attn, FusedInput) and isinstance(layer.mlp, FusedInput) for layer in fused.decoder.layers)
    reference = generate_rot(model, tokenizer, QUESTIONS, latents=5, max_answer_tokens=6)
    decoded = generate_rot(fused, tokenizer, QUESTIONS, latents=5, max_answer_tokens=6)
    assert [g.token_ids for g in decoded] == [g.token_ids for g in reference]
    for a, b in zip(decoded, reference):
        torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)
    stage2 = TrainConfig(stage=2, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out="x", head_width=32,
                         full_finetune=True)
    with pytest.raises(ValueError, match="fused for inference .* export the model as trained, before fusing"):
        export(fused, tokenizer, tmp_path / "fused-export", stage2, ShardSet.open(tiny_shards), config["tokens"])
    assert not (tmp_path / "fused-export").exists()


def test_export_round_trip_gives_the_same_model(exported):
    a, tokenizer, config = load_export(exported)
    b, _, _ = load_export(exported)
    assert config["latent_dim"] == 64 and config["tokens"][IMG_END] == tokenizer.convert_tokens_to_ids(IMG_END)
    first, second = generate_rot(a, tokenizer, QUESTIONS[:1], latents=4), generate_rot(b, tokenizer, QUESTIONS[:1], latents=4)
    torch.testing.assert_close(first[0].latents, second[0].latents)


def test_delta_quantization_stays_within_half_a_step_per_row():
    from rot_model.delta import dequantize, quantize

    torch.manual_seed(0)
    delta = torch.randn(6, 11) * torch.tensor([1e-4, 1e-2, 1.0, 3.0, 0.0, 1e-3])[:, None]
    for bits in (8, 4):
        q, scale = quantize(delta, bits)
        back = dequantize(q, scale, bits, delta.shape[1])
        assert back.shape == delta.shape and q.numel() == 6 * ((11 * bits + 7) // 8)  # 4 bits: two to a byte
        assert torch.all((back - delta).abs() <= scale[:, None] / 2 + 1e-9)
        assert torch.equal(back[4], torch.zeros(11))  # an unchanged row stays exactly unchanged


def test_4_bit_differences_keep_a_scale_per_64_weights_and_come_back_within_half_a_step_of_their_group(tmp_path):
    """At 4 bits one scale per row (1 024 weights of an MLP row) cost rot-5x5 2.2 points on test; a scale per group of
    64 weights (bf16) keeps it: a small change beside a large one in the same row is no longer rounded away."""
    from safetensors import safe_open

    from rot_model import delta

    torch.manual_seed(0)
    base = {"w": torch.randn(4, 256), "norm": torch.ones(256)}
    change = torch.randn(4, 256) * 1e-3
    change[:, :64] *= 100  # one group of each row moved far more than the others
    tuned = {"w": base["w"] + change, "norm": torch.full((256,), 2.0)}
    for bits in (4, 8):
        path = tmp_path / f"d{bits}.safetensors"
        delta.write(tuned, base, "base", path, bits)
        back = delta.add(path, base)
        assert torch.equal(back["norm"], tuned["norm"])  # kept whole
        with safe_open(str(path), framework="pt") as handle:
            scales = handle.get_tensor("w.scale").float()
            assert handle.metadata()["group"] == ("64" if bits == 4 else "0")
        if bits == 4:  # 16 scales of 64 weights, each bounding its own group's error
            assert scales.shape == (16,)
            bound = scales.repeat_interleave(64).reshape(4, 256) / 2 + 1e-7
        else:
            assert scales.shape == (4,)
            bound = scales[:, None] / 2 + 1e-7
        assert torch.all((back["w"] - tuned["w"]).abs() <= bound)
    small = (back["w"] - tuned["w"])[:, 64:].abs().max()  # 8 bits, a scale per row: the small groups lose more
    grouped = (delta.add(tmp_path / "d4.safetensors", base)["w"] - tuned["w"])[:, 64:].abs().max()
    assert grouped < small


def test_a_compact_export_is_a_quarter_of_the_size_and_decodes_the_same(exported, tiny_shards, tiny_qwen3_vl, tmp_path):
    """rot-train compact: a full fine-tuning export as int8 differences from its base loads everywhere an export
    does and decodes the same tokens; a base with other weights is refused in one line."""
    import shutil

    from rot_fixtures.tiny import save_tiny_vlm
    from rot_model.export import compact

    base = tmp_path / "base"
    shutil.copytree(tiny_qwen3_vl, base)
    model, tokenizer, config = load_export(exported)
    torch.manual_seed(2)
    with torch.no_grad():  # what fine-tuning does: every weight moved a little
        for parameter in model.lm.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02 * parameter.abs().mean())
    full = tmp_path / "full"
    stage2 = TrainConfig(stage=2, shards=str(tiny_shards), backbone=str(base), out="x", head_width=32, full_finetune=True)
    export(model, tokenizer, full, stage2, ShardSet.open(tiny_shards), config["tokens"])
    result = subprocess.run(["rot-train", "compact", str(full), "--out", str(tmp_path / "small"), "--base", str(base)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "weights as 8-bit differences" in result.stdout, result.stderr
    sizes = {kind: (tmp_path / kind / "model" / name).stat().st_size
             for kind, name in (("full", "model.safetensors"), ("small", "delta.safetensors"))}
    assert sizes["small"] < 0.3 * sizes["full"]  # fp32 weights -> int8 (and a scale per row)
    reference = generate_rot(load_export(full)[0], tokenizer, QUESTIONS, latents=5, max_answer_tokens=6)
    decoded = generate_rot(load_export(tmp_path / "small")[0], tokenizer, QUESTIONS, latents=5, max_answer_tokens=6)
    assert [g.token_ids for g in decoded] == [g.token_ids for g in reference]
    for a, b in zip(decoded, reference):
        torch.testing.assert_close(a.latents, b.latents, atol=0.05, rtol=0.02)  # bf16 head, int8 differences
    with pytest.raises(ValueError, match="--out .* exists"):
        compact(full, tmp_path / "small", str(base))
    save_tiny_vlm(base, seed=1)  # another version of the base
    with pytest.raises(ValueError, match="has other weights"):
        load_export(tmp_path / "small")


def test_fixed_budget_and_dynamic_termination(exported):
    model, tokenizer, _ = load_export(exported)
    fixed = generate_rot(model, tokenizer, QUESTIONS, latents=6, max_answer_tokens=3)
    assert [len(g.latents) for g in fixed] == [6] * 4 and all(g.answer_tokens == 3 for g in fixed)
    assert [len(g.latents) for g in generate_rot(model, tokenizer, QUESTIONS, latents=6, dynamic_threshold=1e9)] == [0] * 4
    assert [len(g.latents) for g in generate_rot(model, tokenizer, QUESTIONS, latents=6, dynamic_threshold=0.0)] == [6] * 4
    # a threshold just above the smallest distance of row 1 stops that row exactly there
    end = model.embed(torch.tensor([model.img_end_id]))
    distances = (model.latent_inputs(fixed[1].latents) - end).pow(2).mean(-1)
    stop = int(distances.argmin())
    dynamic = generate_rot(model, tokenizer, QUESTIONS[1:2], latents=6, dynamic_threshold=float(distances[stop]) + 1e-6)
    assert len(dynamic[0].latents) == stop


def test_the_learned_stop_ends_a_row_where_img_end_passes_one_half(exported):
    """The LM head's <img_end> logit pushed up stops every row before its first latent; pushed down, every row reasons
    to the budget; the two stops together are refused."""
    model, tokenizer, _ = load_export(exported)
    for push, expected in ((1e4, [0] * 4), (-1e4, [6] * 4)):
        bias = torch.zeros(model.output_layer.out_features)
        bias[model.img_end_id] = push
        hook = model.output_layer.register_forward_hook(lambda module, inputs, output: output + bias)
        try:
            stopped = generate_rot(model, tokenizer, QUESTIONS, latents=6, max_answer_tokens=2, learned_stop=True)
        finally:
            hook.remove()
        assert [len(g.latents) for g in stopped] == expected
    with pytest.raises(ValueError, match="--dynamic-threshold and --learned-stop"):
        generate_rot(model, tokenizer, QUESTIONS, latents=6, dynamic_threshold=0.1, learned_stop=True)


def test_a_budget_per_question_gives_each_row_its_own_latent_count(exported):
    """The oracle of a stop: each row reasons for exactly its own budget, and its latents are those it reasons with a
    fixed budget (a row does not change what the others compute)."""
    model, tokenizer, _ = load_export(exported)
    budgets = torch.tensor([2, 5, 1, 3])
    each = generate_rot(model, tokenizer, QUESTIONS, latents=budgets, max_answer_tokens=3)
    assert [len(g.latents) for g in each] == budgets.tolist()
    fixed = generate_rot(model, tokenizer, QUESTIONS, latents=5, max_answer_tokens=3)
    for own, full, n in zip(each, fixed, budgets.tolist()):
        torch.testing.assert_close(own.latents, full.latents[:n], atol=1e-4, rtol=1e-4)


def test_left_padded_batch_equals_batch_of_one_and_cache_equals_no_cache(exported):
    model, tokenizer, _ = load_export(exported)
    batched = generate_rot(model, tokenizer, QUESTIONS, latents=5, max_answer_tokens=6)
    for question, together in zip(QUESTIONS, batched):
        (alone,) = generate_rot(model, tokenizer, [question], latents=5, max_answer_tokens=6)
        assert alone.token_ids == together.token_ids and alone.text == together.text
        torch.testing.assert_close(alone.latents, together.latents, atol=1e-4, rtol=1e-4)
    uncached = generate_rot(model, tokenizer, QUESTIONS, latents=5, max_answer_tokens=6, use_cache=False)
    assert [g.token_ids for g in uncached] == [g.token_ids for g in batched]
    for a, b in zip(uncached, batched):
        torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
    assert all(len(g.token_ids) == 6 for g in batched)  # a random model never says end-of-turn
    assert not torch.allclose(batched[0].latents, batched[1].latents)  # different questions, different latents


def test_text_baseline_generation_stops_and_decodes(exported):
    model, tokenizer, _ = load_export(exported)
    results = generate_text(model, tokenizer, QUESTIONS[:2], max_new_tokens=5)
    assert all(g.answer_tokens <= 5 for g in results)


def test_the_static_cache_engine_decodes_text_exactly_as_hugging_face_generate(exported):
    """The baselines' tokens from the engine (static cache, bucketed prefill, in-place mask and positions) are Hugging
    Face's greedy `generate` tokens, row for row, in a left-padded batch; a row that says end-of-turn stops there."""
    from rot_data.tokens import user_turn_ids
    from rot_model.batches import pad, pad_token_id

    model, tokenizer, _ = load_export(exported)
    ids, mask = pad([user_turn_ids(tokenizer, q) for q in QUESTIONS], pad_token_id(tokenizer), left=True)
    reference = model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=pad_token_id(tokenizer))[:, ids.shape[1]:].tolist()
    assert [g.token_ids for g in generate_text(model, tokenizer, QUESTIONS, max_new_tokens=12)] == reference
    again = generate_text(model, tokenizer, QUESTIONS, max_new_tokens=12)  # the same shape: the engine is reused
    assert [g.token_ids for g in again] == reference
    eos = reference[1][4]  # make row 1's fifth token its end-of-turn: it stops there, the others go on
    tokenizer.eos_token_id = eos
    cut = generate_text(model, tokenizer, QUESTIONS, max_new_tokens=12)
    assert cut[1].token_ids == reference[1][:reference[1].index(eos) + 1]
    assert all(g.token_ids == r[:r.index(eos) + 1] if eos in r else g.token_ids == r for g, r in zip(cut, reference))


def _rot_eval(args: list[str]):
    """`rot-eval ARGS` in this process, which must succeed: its result (``.stdout``)."""
    from rot_eval.cli import app

    return invoke(app, args)


def test_eval_run_writes_predictions_summary_and_the_table(exported, shared_data, tmp_path):
    runs = []
    for dataset in ("svamp", "multiarith"):
        out = tmp_path / dataset
        result = _rot_eval(["run", "--checkpoint", str(exported), "--dataset", dataset, "--data-dir", str(shared_data),
                            "--out", str(out), "--limit", "6", "--latents", "4", "--max-answer-tokens", "3", "--batch-size", "4"])
        assert f"RoT on {dataset} [test]: accuracy" in result.stdout
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and all(r["latents"] == 4 and isinstance(r["correct"], bool) for r in rows)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["examples"] == 6 and summary["mean_reasoning_tokens"] == 4.0
        low, high = summary["accuracy_95ci"]
        assert low <= summary["accuracy"] <= high and "95% interval" in result.stdout
        correct_first = sum(r["extracted"].split()[:1] == r["gold"].split()[:1] for r in rows) / 6  # a number per answer
        assert summary["per_answer_token"] == [correct_first]
        runs.append(out)
    # the README's layout: a control run beside the real ones; it must be its own row, never the model's cell
    control = tmp_path / "eval" / "zeros"
    result = _rot_eval(["run", "--checkpoint", str(exported), "--dataset", "svamp", "--data-dir", str(shared_data),
                        "--out", str(control), "--limit", "6", "--latents", "4", "--max-answer-tokens", "3", "--batch-size", "4",
                        "--control", "zeros"])
    assert "RoT on svamp [test] with the zeros control: accuracy" in result.stdout
    picture = tmp_path / "compression.png"
    table = _rot_eval(["table", *map(str, runs), str(control), "--plot", str(picture)]).stdout
    lines = table.strip().splitlines()
    assert lines[0] == "| run | model | dataset | split | control | n | accuracy % | 95% interval | mean #L | s/question |"
    rows = [line.split(" | ") for line in lines[2:5]]
    assert [(r[0], r[2], r[4], r[5]) for r in rows] == [(f"| {runs[0]}", "svamp", "-", "6"), (f"| {runs[1]}", "multiarith", "-", "6"),
                                                       (f"| {control}", "svamp", "zeros", "6")]
    svamp = json.loads((runs[0] / "summary.json").read_text())["accuracy"]
    assert rows[0][6] == f"{100 * svamp:.1f}"  # the real run's accuracy, not the control's
    grid = lines[lines.index("Paper layout (runs without a control, one per cell):") + 1:]
    assert grid[0] == "| model | svamp | multiarith | Avg | Avg #L |" and "| 4.0 |" in grid[2]
    from PIL import Image

    assert Image.open(picture).size[0] > 500 and f"picture: {picture}" in table

    # two runs of one model on one dataset (a --limit run beside the full one): both rows, the cell left out, and said
    from rot_eval.evaluate import evaluate
    from rot_eval.table import load_runs, paper_table, runs_table

    again = tmp_path / "svamp-3"
    evaluate(str(exported), "svamp", again, data_dir=shared_data, limit=3, latents=4, max_answer_tokens=3, batch_size=4)
    summaries = load_runs([*runs, again])
    assert len(runs_table(summaries).splitlines()) == 2 + 3
    grid, notes = paper_table(summaries)
    assert grid.splitlines()[0] == "| model | multiarith | Avg | Avg #L |"
    assert notes == [f"RoT ({exported.parent.name}) on svamp: 2 runs ({runs[0]}, {again}), not in the grid"]


def test_viz_writes_the_three_pictures_and_nearest_text(exported, tiny_shards, tmp_path):
    result = subprocess.run(["rot-eval", "viz", "--checkpoint", str(exported), "--question", QUESTIONS[1], "--out",
                             str(tmp_path), "--latents", "8", "--shards", str(tiny_shards)], capture_output=True, text=True, check=True)
    assert "after 8 latents" in result.stdout
    from PIL import Image

    for name in ("heatmap.png", "similarity.png", "stats.png"):
        assert Image.open(tmp_path / name).size[0] > 300
    nearest = (tmp_path / "nearest.md").read_text().splitlines()
    assert len([line for line in nearest if line.startswith("| ") and line[2].isdigit()]) == 8


def test_controls_feed_the_given_latents(exported, tiny_shards, shared_data, tmp_path):
    from rot_eval.evaluate import evaluate

    model, tokenizer, _ = load_export(exported)
    own = generate_rot(model, tokenizer, QUESTIONS, latents=4, max_answer_tokens=3)
    zeros = generate_rot(model, tokenizer, QUESTIONS, max_answer_tokens=3, given_latents=torch.zeros(4, 4, 64))
    assert all(g.latents.abs().sum() == 0 and len(g.latents) == 4 for g in zeros)
    assert all(g.latents.abs().sum() > 0 for g in own)
    stacked = torch.stack([g.latents for g in own])
    again = generate_rot(model, tokenizer, QUESTIONS, max_answer_tokens=3, given_latents=stacked.roll(1, 0))
    for fed, original in zip(again, [own[-1]] + own[:-1]):  # the latents fed are another question's, as given
        torch.testing.assert_close(fed.latents, original.latents)
    for control in ("zeros", "shuffled"):
        summary = evaluate(str(exported), "svamp", tmp_path / control, data_dir=shared_data, latents=4, batch_size=4,
                           max_answer_tokens=3, limit=4, control=control)
        assert summary["control"] == control and summary["mean_reasoning_tokens"] == 4.0
    truth = evaluate(str(exported), "gsm8k", tmp_path / "truth", split="train", batch_size=1, max_answer_tokens=3, limit=3,
                     control="truth", truth_shards=tiny_shards)
    stored = ShardSet.open(tiny_shards)
    lengths = [row["n_tokens"] for row in stored.read_rows(0)[:3]]
    assert truth["mean_reasoning_tokens"] == sum(lengths) / 3  # one latent per stored visual token
    with pytest.raises(ValueError, match="--truth-shards"):
        evaluate(str(exported), "svamp", tmp_path / "x", data_dir=shared_data, control="truth")


def test_readback_scores_latents_per_position(exported, tiny_shards, micro_anchor, tmp_path):
    from rot_eval.readback import read_back

    summary = read_back(str(exported), "gsm8k", tiny_shards, tmp_path, split="train", reader=str(micro_anchor),
                        latents=6, limit=2, batch_size=2)
    assert summary["examples"] == 2 and len(summary["per_position"]) == 6
    assert all(s is None or 0 <= s <= 1 for s in summary["per_position"])
    assert (tmp_path / "readback.png").stat().st_size > 0 and json.loads((tmp_path / "readback.json").read_text())["samples"]


def test_position_scores_place_characters_under_their_token():
    from rot_eval.readback import position_scores

    render = {"font_size": 20, "padding": 4, "font_file": "DejaVuSans.ttf"}
    cot = "5 5 5 6 1 + 0 0 6 4 9 0"
    assert position_scores(cot, cot, render, 32, 8) == [(2, 2), (1, 1), (2, 2), (1, 1), (2, 2), (2, 2), (2, 2), (0, 0)]
    assert position_scores(cot, "5 5 5 6 1", render, 32, 8)[:5] == [(2, 2), (1, 1), (2, 2), (0, 1), (0, 2)]


def test_wilson_interval_known_values():
    from rot_eval.evaluate import wilson_interval

    assert wilson_interval(0, 1000) == [0.0, pytest.approx(0.00383, abs=1e-5)]
    assert wilson_interval(50, 100) == [pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4)]
    assert wilson_interval(1000, 1000)[1] == 1.0 and wilson_interval(1000, 1000)[0] == pytest.approx(0.99617, abs=1e-5)


def test_eval_command_line_defaults_are_the_function_defaults():
    """`rot-eval run` with no option evaluates as evaluate() does from the API (one source of defaults)."""
    import inspect

    import typer

    from rot_eval.cli import app
    from rot_eval.evaluate import evaluate

    options = {p.name: p.default for p in typer.main.get_command(app).commands["run"].params}
    signature = {name: p.default for name, p in inspect.signature(evaluate).parameters.items()
                 if p.default is not inspect.Parameter.empty and name != "device"}
    assert {name: options[name] for name in signature} == signature


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode step is captured as a CUDA graph on a GPU only")
@pytest.mark.parametrize("compile_step", [False, True], ids=["graph", "compiled-graph"])
def test_on_a_gpu_the_captured_decode_step_gives_the_reference_tokens_and_latents(exported, compile_step):
    """On CUDA the engine runs the prefill and the step eagerly once, records them as CUDA graphs and replays them:
    the first and the replayed calls give the same tokens and latents as the no-cache reference (RoT) and as Hugging
    Face's generate (text), and no fallback warning; also with the step compiled before its capture."""
    import warnings

    from rot_data.tokens import user_turn_ids
    from rot_model.batches import pad, pad_token_id
    from rot_model.decoding import Engines

    model, tokenizer, _ = load_export(exported, device="cuda")
    model.engines = Engines(compile_step=compile_step)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="decode .* not captured")  # a failed capture warns and runs eagerly: fail instead
        first, replayed = [generate_rot(model, tokenizer, QUESTIONS, latents=5, max_answer_tokens=6) for _ in range(2)]
        texts = [generate_text(model, tokenizer, QUESTIONS, max_new_tokens=12) for _ in range(2)]
    reference = generate_rot(model, tokenizer, QUESTIONS, latents=5, max_answer_tokens=6, use_cache=False)
    for captured in (first, replayed):
        assert [g.token_ids for g in captured] == [g.token_ids for g in reference]
        for a, b in zip(captured, reference):
            torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
    ids, mask = pad([user_turn_ids(tokenizer, q) for q in QUESTIONS], pad_token_id(tokenizer), left=True)
    expected = model.lm.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=pad_token_id(tokenizer))[:, ids.shape[1]:].tolist()
    assert [[g.token_ids for g in text] for text in texts] == [expected, expected]


def test_an_export_with_merged_latents_evaluates_merged_truth_and_refuses_read_back(exported, tiny_shards, micro_anchor,
                                                                                    tmp_path):
    """--merge-latents 2: the truth control feeds the stored visual embeddings averaged in pairs (one latent per two
    visual tokens, as trained), the oracle budget is half the tokens, and read-back (one visual token per position)
    is refused in one line."""
    import shutil

    from rot_eval.evaluate import evaluate
    from rot_eval.readback import read_back

    merged = tmp_path / "merged"
    shutil.copytree(exported, merged)
    config = json.loads((merged / "rot_config.json").read_text())
    (merged / "rot_config.json").write_text(json.dumps({**config, "merge_latents": 2}))
    lengths = [row["n_tokens"] for row in ShardSet.open(tiny_shards).read_rows(0)[:3]]
    truth = evaluate(str(merged), "gsm8k", tmp_path / "truth", split="train", batch_size=1, max_answer_tokens=3, limit=3,
                     control="truth", truth_shards=tiny_shards)
    oracle = evaluate(str(merged), "gsm8k", tmp_path / "oracle", split="train", batch_size=3, max_answer_tokens=3, limit=3,
                      oracle_latents=True, truth_shards=tiny_shards)
    halves = sum(-(-n // 2) for n in lengths) / 3
    assert truth["mean_reasoning_tokens"] == oracle["mean_reasoning_tokens"] == halves
    with pytest.raises(ValueError, match=r"^.*merged was trained with --merge-latents 2: .* read back an export trained "
                                         r"with one latent per visual token$"):
        read_back(str(merged), "gsm8k", tiny_shards, tmp_path / "rb", split="train", reader=str(micro_anchor), limit=1)


def test_the_stop_signals_say_where_each_stop_ends_a_row(exported, tiny_shards, tmp_path):
    """`rot-eval stops` reads, per latent step, the two signals the stops read: for any threshold, the dynamic stop
    ends each row at the first step whose distance is under it, and the learned stop at the first step whose
    p(<img_end>) passes one half; the separating window's thresholds end every row at its length (the export's
    budget, or with --truth-shards each question's own visual-token count)."""
    from rot_eval import stops
    from rot_eval.cli import app

    model, tokenizer, _ = load_export(exported)
    distances, _ = stops.stop_signals(model, tokenizer, QUESTIONS, steps=6)
    for threshold in torch.quantile(distances.flatten(), torch.tensor([0.1, 0.3, 0.6])).tolist():
        under = distances < threshold
        expected = torch.where(under.any(1), under.float().argmax(1), torch.full((4,), 6)).tolist()
        ended = generate_rot(model, tokenizer, QUESTIONS, latents=6, max_answer_tokens=2, dynamic_threshold=threshold)
        assert [len(g.latents) for g in ended] == expected
    # the learned stop, with <img_end>'s logit shifted so that some steps pass one half and others do not
    _, probabilities = stops.stop_signals(model, tokenizer, QUESTIONS, steps=6)
    log_odds = (probabilities / (1 - probabilities)).log().flatten()
    bias = torch.zeros(model.output_layer.out_features)
    hook = model.output_layer.register_forward_hook(lambda module, inputs, output: output + bias)
    seen = set()
    try:
        for shift in torch.quantile(log_odds, torch.tensor([0.5, 0.8, 0.97])).tolist():
            bias[model.img_end_id] = -shift
            _, probabilities = stops.stop_signals(model, tokenizer, QUESTIONS, steps=6)
            passed = probabilities > 0.5
            expected = torch.where(passed.any(1), passed.float().argmax(1), torch.full((4,), 6)).tolist()
            ended = generate_rot(model, tokenizer, QUESTIONS, latents=6, max_answer_tokens=2, learned_stop=True)
            assert [len(g.latents) for g in ended] == expected
            seen.update(expected)
    finally:
        hook.remove()
    assert len(seen) > 1, seen  # the stops ended rows at different steps: the comparison means something
    low, high = stops.separating_window(distances, torch.full((4,), 3))
    assert low == float(distances[:, 3].max()) and high == float(distances[:, :3].min())
    low, high = stops.separating_window(distances, torch.tensor([1, 2, 4, 5]))  # each row its own length
    assert low == max(float(distances[row, length]) for row, length in enumerate([1, 2, 4, 5]))
    assert high == min(float(distances[row, :length].min()) for row, length in enumerate([1, 2, 4, 5]))

    result = invoke(app, ["stops", "--checkpoint", str(exported), "--dataset", "gsm8k", "--split", "train",
                          "--limit", "3", "--out", str(tmp_path / "stops")])
    summary = json.loads((tmp_path / "stops" / "stops.json").read_text())
    (budget,) = summary["lengths"]
    assert summary["questions"] == 3 and summary["steps"] == budget + 8 == len(summary["p_img_end"]["median"])
    assert (tmp_path / "stops" / "stops.png").stat().st_size > 10_000
    assert f"the export's budget, {budget} latents: " in result.stdout
    refused = invoke(app, ["stops", "--checkpoint", str(exported), "--dataset", "gsm8k", "--split", "train",
                           "--steps", str(budget), "--out", str(tmp_path / "refused")], exit_code=1)
    assert f"--steps {budget}: the stops are read past the export's budget ({budget} latents): pass at least {budget + 1}" in refused.output
    assert not (tmp_path / "refused").exists()

    # a mixed-length set: each question's length is its own CoT's visual-token count, read from the split's shards
    result = invoke(app, ["stops", "--checkpoint", str(exported), "--dataset", "gsm8k", "--split", "train", "--limit", "3",
                          "--truth-shards", str(tiny_shards), "--out", str(tmp_path / "own")])
    summary = json.loads((tmp_path / "own" / "stops.json").read_text())
    stored = {row["question"]: row["n_tokens"] for row in ShardSet.open(tiny_shards).read_rows(0, with_embeddings=False)}
    questions = [record.question for record in load_records("gsm8k", "train")[0][:3]]
    lengths = torch.tensor([stored[question] for question in questions])
    assert len(set(lengths.tolist())) > 1  # the three CoTs differ in length: one budget would not describe them
    assert summary["lengths"] == sorted(set(lengths.tolist())) and summary["steps"] == int(lengths.max()) + 8
    distances, _ = stops.stop_signals(model, tokenizer, questions, steps=summary["steps"])
    low, high = stops.separating_window(distances, lengths)
    assert summary["dynamic_window"] == {"low": round(low, 6), "high": round(high, 6), "separates": low < high}
    assert f"each question's own length, {'/'.join(map(str, summary['lengths']))} latents: " in result.stdout
    refused = invoke(app, ["stops", "--checkpoint", str(exported), "--dataset", "gsm8k", "--split", "train", "--limit", "3",
                           "--truth-shards", str(tiny_shards), "--steps", str(int(lengths.max())), "--out", str(tmp_path / "x")],
                     exit_code=1)
    assert f"past each question's own length ({int(lengths.max())} latents): pass at least {int(lengths.max()) + 1}" in refused.output
