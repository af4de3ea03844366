"""Stage I and Stage II through DeepSpeed on this CPU (gloo): launcher runs, resume, what each stage may change."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rot_model.export import load_export
from rot_train.train import TrainConfig, run
from tests.conftest import invoke

pytestmark = pytest.mark.slow  # Ray / DeepSpeed launcher runs: pytest -m 'not slow' skips them

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(global_batch=8, micro_batch=4, head_width=32, max_latents=12, warmup_steps=1, num_workers=1, epochs=2)


def _clean_env(**extra):
    """This process may have joined a one-process group (in-process runs): children must not inherit it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, DS_ACCELERATOR="cpu", **extra)


def _launch(command, *args, ranks=1, cwd=None):
    """`deepspeed --module rot_train <command>` exactly as a user runs it, ``ranks`` processes, from a directory
    outside the project (the README's form); ``command`` ending in .py: `deepspeed rot_train/<command>` from packages/."""
    import socket
    import tempfile

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = _clean_env()
    launcher = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port)]
    if command.endswith(".py"):
        launcher, cwd = launcher + [f"rot_train/{command}"], ROOT / "packages"
    else:
        launcher, cwd = launcher + ["--module", "rot_train", command], cwd or tempfile.gettempdir()
    result = subprocess.run([*launcher, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _losses(out, key="loss"):
    return [json.loads(line)[key] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _args(shards, backbone, out, **extra):
    options = dict(TINY, lr=1e-3, **extra)
    args = ["--shards", str(shards), "--backbone", str(backbone), "--out", str(out)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_deepspeed_stage1_then_stage2_resume_continues_the_same_loss_sequence(tiny_shards, tiny_qwen3_vl, tmp_path):
    stage1 = tmp_path / "stage1"  # in this process: `deepspeed --module rot_train stage1` runs in test_multi_rank.py
    summary, _ = run(TrainConfig(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(stage1), lr=1e-3,
                                 max_steps=4, **TINY))
    assert summary["steps"] == 4
    assert (stage1 / "export" / "head.safetensors").exists() and (stage1 / "loss.png").exists()

    # the uninterrupted run through the API: with the same options it trains exactly as the command line (one source
    # of defaults: Stage II's vision weight was once 10 from the API and 0 from the command line)
    whole, part = tmp_path / "whole", tmp_path / "part"
    run(TrainConfig(stage=2, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(whole),
                    init=str(stage1 / "export"), lr=1e-3, max_steps=8, **TINY))
    run(TrainConfig(stage=2, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(part),
                    init=str(stage1 / "export"), lr=1e-3, max_steps=5, **TINY))  # "interrupted" after step 5
    assert _losses(part) == _losses(whole)[:5]
    # resumed by the launcher, in the script form (`--module rot_train stage2` runs in test_multi_rank.py)
    _launch("stage2.py", *_args(tiny_shards, tiny_qwen3_vl, part, max_steps=8), "--init", str(stage1 / "export"), "--resume")
    uninterrupted, resumed = _losses(whole), _losses(part)
    assert len(uninterrupted) == len(resumed) == 8
    assert resumed[:5] == uninterrupted[:5]
    torch.testing.assert_close(torch.tensor(resumed[5:]), torch.tensor(uninterrupted[5:]), rtol=1e-6, atol=0)
    assert len(set(uninterrupted)) > 1  # the losses move, so equality means something

    # export -> load round trip: the LoRA adapter, head and new tokens come back
    model, tokenizer, config = load_export(part / "export")
    assert config["stage"] == 2 and config["weights"] == "lora"
    assert "<img_end>" in tokenizer.get_vocab() and hasattr(model.lm, "peft_config")


def test_a_cpu_without_bf16_units_trains_in_fp32_and_a_checkpoint_resumes_only_in_its_precision(tiny_shards, tiny_qwen3_vl,
                                                                                               tmp_path):
    """The shipped DeepSpeed configs train in bf16, except on a CPU without bf16 units, where torch emulates bf16 more
    slowly than fp32: there they train in fp32 (run.json says which). A --ds-config of one's own is kept as written, and
    a checkpoint is resumed only in the precision it was trained in (one line naming the fix)."""
    from rot_train.train import cpu_without_bf16

    common = dict(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), max_steps=1, **TINY)
    _, model = run(TrainConfig(out=str(tmp_path / "default"), **common))
    expected = "fp32" if cpu_without_bf16(torch.device("cpu")) else "bf16"
    assert json.loads((tmp_path / "default" / "run.json").read_text())["precision"] == expected
    assert {p.dtype for p in model.parameters()} == {torch.float32 if expected == "fp32" else torch.bfloat16}

    shipped = json.loads((ROOT / "packages/rot_train/configs/zero2.json").read_text())
    configs = {}
    for bf16 in (True, False):
        configs[bf16] = tmp_path / f"zero2-bf16-{bf16}.json"
        configs[bf16].write_text(json.dumps(dict(shipped, bf16={"enabled": bf16})))
    out = tmp_path / "own"
    _, model = run(TrainConfig(out=str(out), ds_config=str(configs[True]), **common))
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16" and model.head.fc_out.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=re.escape(f'{out / "checkpoints" / "step1"} was trained in bf16, this run trains '
                                                   'in fp32: resume with a --ds-config whose bf16 "enabled" is true, or start a new --out')):
        run(TrainConfig(out=str(out), ds_config=str(configs[False]), resume=True, **dict(common, max_steps=2)))


def test_max_seconds_stops_at_an_optimizer_step_then_checkpoints_exports_and_resumes(tiny_shards, tiny_qwen3_vl, tmp_path,
                                                                                   capsys):
    """--max-seconds (time-limited GPU calls, SLURM jobs): a run planned far past the budget stops at the first optimizer
    step after it, ends as a finished run does (checkpoint, export, summary, loss picture) and says where it stopped, with
    the LR schedule still planned for every step; --resume continues from its checkpoint. A budget <= 0 is refused."""
    out = tmp_path / "run"
    common = dict(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(out), **dict(TINY, epochs=50))
    summary, _ = run(TrainConfig(max_seconds=2.0, **common))
    steps = summary["steps"]
    assert 1 <= steps < summary["planned_steps"] == 300 and summary["seconds"] >= 2.0, summary
    message = f"stopped by --max-seconds 2 at step {steps} of 300"
    assert summary["stopped_early"] == message == json.loads((out / "summary.json").read_text())["stopped_early"]
    assert f"stage 1 {message}: {steps} steps" in capsys.readouterr().out
    assert len(_losses(out)) == steps and (out / "loss.png").exists()
    assert (out / "checkpoints" / "latest").read_text() == f"step{steps}"
    assert json.loads((out / "export" / "rot_config.json").read_text())["train_config"]["max_seconds"] == 2.0
    assert json.loads((out / "run.json").read_text())["total_steps"] == 300  # the LR schedule is not rescaled

    first_samples = summary["samples"]
    with open(out / "metrics.jsonl", "a") as log:  # a killed run logged a step past its last checkpoint
        log.write(json.dumps({"step": steps + 1, "loss": 9.9}) + "\n")
    summary, _ = run(TrainConfig(max_steps=steps + 2, resume=True, **common))
    assert summary["steps"] == steps + 2 and summary["stopped_early"] is None
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, steps + 3))
    assert 9.9 not in [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["resumed_from_step"] == steps and summary["samples"] == first_samples + summary["samples_this_run"]
    assert summary["samples"] == (steps + 2) * summary["global_batch"] and summary["seconds"] > summary["seconds_this_run"]
    with pytest.raises(ValueError, match="--resume: .* holds no checkpoint"):
        run(TrainConfig(max_steps=2, resume=True, **dict(common, out=str(tmp_path / "never-ran"))))

    # under the launcher on 2 ranks (gloo): rank 0's clock decides for both, so both stop at the same step and export
    two = tmp_path / "two-ranks"
    result = _launch("stage1", *_args(tiny_shards, tiny_qwen3_vl, two, epochs=50, max_seconds=1), ranks=2)
    summary = json.loads((two / "summary.json").read_text())
    assert 1 <= summary["steps"] < summary["planned_steps"] == 300  # 48 rows / global batch 8 x 50 epochs
    assert f"stage 1 stopped by --max-seconds 1 at step {summary['steps']} of 300" in result.stdout
    assert (two / "export" / "head.safetensors").exists()

    refusal = "--max-seconds 0: use a number of seconds > 0 (leave it out for no time limit)"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        TrainConfig(max_seconds=0, **common)
    assert _cli_error(["--shards", str(tiny_shards), "--backbone", str(tiny_qwen3_vl), "--out", str(tmp_path / "x"),
                       "--max-seconds", "0"]) == f"error: {refusal}"


@pytest.fixture(scope="module")
def stage_runs(tiny_shards, tiny_qwen3_vl, tmp_path_factory):
    """In-process Stage I (LM loss off so the MSE is the whole signal) then Stage II, with the models."""
    from rot_model.backbone import load_backbone

    base = tmp_path_factory.mktemp("runs")
    original, _ = load_backbone(str(tiny_qwen3_vl), dtype=torch.float32)  # compared in the dtype the run trained in
    s1_summary, s1 = run(TrainConfig(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(base / "s1"),
                                     lr=3e-3, lm_weight=0.0, **dict(TINY, epochs=6)))
    s2_summary, s2 = run(TrainConfig(stage=2, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(base / "s2"),
                                     init=str(base / "s1" / "export"), lr=1e-3, max_steps=4, **TINY))
    return original, base, s1, s2


def test_stage1_drives_the_mse_down_and_leaves_the_llm_bit_identical(stage_runs):
    original, base, stage1_model, _ = stage_runs
    mse = _losses(base / "s1", "mse")
    assert len(mse) == 36
    assert sum(mse[-4:]) / 4 < 0.5 * sum(mse[:4]) / 4, mse
    trained = dict(stage1_model.lm.named_parameters())
    for name, parameter in original.named_parameters():
        if name != "model.embed_tokens.weight":  # its new-token rows are initialised by RoT, checked below
            assert torch.equal(trained[name].data, parameter.data.to(trained[name].dtype)), name
    old_rows, new_ids = original.get_input_embeddings().weight, [stage1_model.img_begin_id, stage1_model.img_end_id]
    keep = [i for i in range(old_rows.shape[0]) if i not in new_ids]
    new_rows = trained["model.embed_tokens.weight"]
    assert torch.equal(new_rows[keep], old_rows[keep].to(new_rows.dtype))


def test_stage2_changes_only_lora_weights(stage_runs, tiny_qwen3_vl):
    from safetensors.torch import load_file

    original, base, _, stage2_model = stage_runs
    head = load_file(base / "s1" / "export" / "head.safetensors")
    for name, value in stage2_model.head.state_dict().items():
        torch.testing.assert_close(value.float(), head[f"head.{name}"], atol=0, rtol=0)
    changed = [n for n, p in stage2_model.lm.named_parameters() if p.requires_grad]
    assert changed and all("lora_" in n for n in changed)
    lora_b = [p for n, p in stage2_model.lm.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: non-zero means it trained
    base_weights = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                    for n, p in stage2_model.lm.named_parameters() if "lora_" not in n}
    for name, parameter in original.named_parameters():
        if name != "model.embed_tokens.weight":
            assert torch.equal(base_weights[name].data, parameter.data.to(base_weights[name].dtype)), name


def test_one_shard_set_trains_two_backbones_of_different_sizes(tiny_shards, tiny_qwen2_5_vl, tmp_path):
    summary, model = run(TrainConfig(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen2_5_vl), out=str(tmp_path / "q25"),
                                     max_steps=2, **TINY))
    assert model.lm.config.hidden_size == 48 and isinstance(model.adapter, torch.nn.Linear)
    assert model.adapter.in_features == 64 and model.head.fc_out.out_features == 64
    assert summary["steps"] == 2 and all(v == v for v in _losses(tmp_path / "q25"))


def test_decay_by_deadline_anneals_the_learning_rate_to_zero_at_the_clock(tiny_shards, tiny_qwen3_vl, tmp_path):
    """--decay-by-deadline: a run planned far past its --max-seconds ends with its learning rate at 0 (the step schedule
    alone leaves it near the peak), never above the step schedule's and falling after the warm-up; without
    --max-seconds it is refused."""
    common = dict(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), lr=1e-3, max_seconds=6.0, **dict(TINY, epochs=50))
    rates = {}
    for decay in (False, True):
        out = tmp_path / f"decay-{decay}"
        summary, _ = run(TrainConfig(out=str(out), decay_by_deadline=decay, **common))
        assert summary["stopped_early"] and summary["steps"] >= 2, summary
        rates[decay] = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    capped, scheduled = rates[True], rates[False]
    assert scheduled[-1] >= 0.5e-3 and capped[-1] == 0.0, rates  # 300 planned steps: the step schedule has hardly begun
    assert all(c <= s for c, s in zip(capped, scheduled)), rates  # the same step schedule, capped by the clock
    peak = capped.index(max(capped))  # DeepSpeed's warm-up rises over at least two steps
    assert all(later <= earlier for earlier, later in zip(capped[peak:], capped[peak + 1:])), capped
    with pytest.raises(ValueError, match="--decay-by-deadline decays the learning rate to 0 at --max-seconds: give --max-seconds too"):
        TrainConfig(out=str(tmp_path / "x"), decay_by_deadline=True, **dict(common, max_seconds=None))


def _cli_error(args):
    """`rot_train stage1 ARGS`'s last line, run in this process: it must end in a one-line error."""
    from rot_train.launch import app

    return invoke(app, ["stage1", *args], exit_code=1).stderr.strip().splitlines()[-1]


def test_bad_shards_end_with_a_one_line_error(tiny_shards, tiny_qwen3_vl, tmp_path):
    import shutil

    from rot_data import shards as writer

    common = ["--backbone", str(tiny_qwen3_vl), "--out", str(tmp_path / "run")]
    missing = tmp_path / "missing"
    shutil.copytree(tiny_shards, missing)
    (missing / "shard-00002.parquet").unlink()
    assert _cli_error(["--shards", str(missing), *common]) == \
        f"error: {missing / 'shard-00002.parquet'} is missing; re-run the same rot-render build command (--out {missing}) to remake it"

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_shards, corrupt)
    (corrupt / "shard-00000.parquet").write_bytes(b"PAR1 not really")
    assert "shard-00000.parquet does not match its checksum" in _cli_error(["--shards", str(corrupt), *common])

    empty = tmp_path / "empty"
    empty.mkdir()
    writer.write_manifest(empty, {"format": "rot-visual-embeddings/1", "rows": 0, "shards": []})
    assert _cli_error(["--shards", str(empty), *common]) == \
        f"error: {empty / 'manifest.json'} lists no rows: the shard set is empty; rebuild it from a dataset with rows"

    # a manifest from a different embedding size than the Stage I head that Stage II starts from
    other = tmp_path / "dim32"
    shutil.copytree(tiny_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["embedding"]["dim"] = 32
    (other / "manifest.json").write_text(json.dumps(manifest))
    head = tmp_path / "stage1"
    run(TrainConfig(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(head), max_steps=1, **TINY))
    env = _clean_env()
    result = subprocess.run([sys.executable, "rot_train/stage2.py", "--shards", str(other), "--init", str(head / "export"),
                             *common, "--head-width", "32"], cwd=ROOT / "packages", env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {other / 'manifest.json'} has embedding dim 32 but the head in {head / 'export'} was trained on dim 64; "
        f"use the shard set that the head in {head / 'export'} was trained on, or start again from Stage I")
    # resuming a run on shards of another embedding size (DeepSpeed's loader used to fail with a size mismatch)
    fingerprint = manifest["fingerprint"]
    assert _cli_error(["--shards", str(other), "--backbone", str(tiny_qwen3_vl), "--out", str(head), "--resume",
                       "--head-width", "32", "--global-batch", "8"]) == (
        f"error: {head / 'checkpoints'} was trained on shards {fingerprint} (dim 64), {other} are {fingerprint} (dim 32); "
        "resume with the same --shards or start a new --out")
    # a fresh run into the folder of an earlier one (its losses were appended to the earlier run's metrics.jsonl)
    assert _cli_error(["--shards", str(tiny_shards), "--backbone", str(tiny_qwen3_vl), "--out", str(head),
                       "--head-width", "32"]) == (
        f"error: {head} holds an earlier run (metrics.jsonl / checkpoints): pass --resume to continue it, "
        "or choose another --out (or delete that folder)")


@pytest.mark.parametrize("mode", ["sft-cot", "sft-nocot"])
def test_sft_baselines_train_with_the_same_trainer_and_evaluate(tiny_shards, tiny_qwen3_vl, tmp_path, mode):
    from rot_eval.evaluate import evaluate

    out = tmp_path / mode
    summary, model = run(TrainConfig(stage=2, mode=mode, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(out),
                                     max_steps=3, lr=1e-3, **TINY))
    losses = _losses(out, "lm")
    assert summary["steps"] == 3 and len(losses) == 3 and all(loss > 0 for loss in losses)
    assert all("lora_" in n for n, p in model.lm.named_parameters() if p.requires_grad)
    config = json.loads((out / "export" / "rot_config.json").read_text())
    assert config["mode"] == mode and config["weights"] == "lora"
    result = evaluate(str(out / "export"), "gsm8k", tmp_path / "eval", limit=3, batch_size=3, max_cot_tokens=4, device="cpu")
    assert result["method"] == {"sft-cot": "SFT with CoT", "sft-nocot": "SFT without CoT"}[mode] and result["examples"] == 3


def test_restored_optimizer_state_moves_beside_its_weights_even_when_zero3_empties_the_groups():
    """Fused CUDA AdamW refuses CPU step counters; ZeRO-3 lists no params in its groups between steps.
    The meta device stands in for the GPU: any device other than the CPU shows the move."""
    from types import SimpleNamespace

    from rot_train.train import _optimizer_state_beside_weights

    weight = torch.nn.Parameter(torch.zeros(4, device="meta"))
    adam = torch.optim.AdamW([weight])
    adam.state[weight] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4, device="meta")}
    adam.param_groups[0]["params"] = []  # what DeepSpeed's stage 3 leaves there outside optimizer.step()
    _optimizer_state_beside_weights(SimpleNamespace(optimizer=adam))
    assert {key: value.device.type for key, value in adam.state[weight].items()} == {"step": "meta", "exp_avg": "meta", "exp_avg_sq": "meta"}


@pytest.mark.parametrize("command", ["stage1", "stage2", "sft"])
def test_command_line_defaults_are_the_dataclass_defaults(command):
    """One source of defaults: a run from the API and from the command line train with the same settings (the Stage II
    vision weight was 10 from the API and 0 from the command line); each command shows its own options only."""
    import typer

    from rot_train.config import COMMANDS
    from rot_train.launch import app

    spec = COMMANDS[command]
    config = TrainConfig(stage=spec.stage, mode=spec.mode, shards="s", backbone="b", out="o")
    names = {f.name for f in spec.fields()} - {"shards", "backbone", "out"}
    shown = typer.main.get_command(app).commands[command]
    options = {p.name: p.default for p in shown.params if p.name in names}
    assert set(options) == names and {p.name for p in shown.params} == names | {"shards", "backbone", "out", "config", "local_rank"}
    for name, default in options.items():
        assert (list(default) if isinstance(default, tuple) else default) == getattr(config, name), name
    assert config.vision_weight == (10.0 if command == "stage1" else 0.0)
    assert ("lora_r" in names) == (command != "stage1") and ("curriculum_steps" in names) == (command == "stage2")
    assert ("mode" in names) == (command == "sft") and ("max_latents" in names) == (command != "sft")


def test_zero_stage_is_chosen_by_name_or_file():
    from rot_train.config import CONFIGS

    def config(**values):
        return TrainConfig(stage=1, shards="s", backbone="b", out="o", **values)

    assert config().deepspeed_file == str(CONFIGS / "zero2.json")
    assert config(zero=3).deepspeed_file == str(CONFIGS / "zero3.json")
    assert config(ds_config="mine.json").deepspeed_file == "mine.json"
    with pytest.raises(ValueError, match="--zero 1: use 2 or 3"):
        config(zero=1)
    with pytest.raises(ValueError, match="pass one of them"):
        config(zero=3, ds_config="mine.json")


def test_stage2_reader_loss_and_trained_head_are_logged_exported_and_leave_the_reader_untouched(micro_anchor, tiny_shards,
                                                                                             tiny_qwen3_vl, tmp_path):
    """Stage II with --reader-weight and --train-head (the miniature's recipe): the reader's loss is logged and falls,
    the head moves away from Stage I's and the export carries the moved head; the reader is the untouched backbone and
    no checkpoint or export holds it. The export trains on as a backbone. A backbone without the anchor's reading prompt
    is refused in one line."""
    from safetensors.torch import load_file

    from rot_model.backbone import load_backbone

    common = dict(shards=str(tiny_shards), backbone=str(micro_anchor), **dict(TINY, max_latents=None, epochs=4))
    run(TrainConfig(stage=1, out=str(tmp_path / "s1"), max_steps=1, **common))
    _, model = run(TrainConfig(stage=2, out=str(tmp_path / "s2"), init=str(tmp_path / "s1" / "export"), lr=3e-3,
                               full_finetune=True, train_head=True, reader_weight=1.0, curriculum_steps=1000, **common))
    read = _losses(tmp_path / "s2", "read")
    assert len(read) == 24 and sum(read[-4:]) < sum(read[:4]), read
    stage1_head = load_file(tmp_path / "s1" / "export" / "head.safetensors")
    exported_head = load_file(tmp_path / "s2" / "export" / "head.safetensors")
    assert not torch.equal(stage1_head["head.fc_out.weight"], exported_head["head.fc_out.weight"])
    torch.testing.assert_close(model.head.fc_out.weight.float(), exported_head["head.fc_out.weight"], atol=0, rtol=0)
    original, _ = load_backbone(str(micro_anchor), dtype=torch.float32)
    for (name, kept), (_, reader) in zip(original.named_parameters(), model.reader.named_parameters()):
        assert torch.equal(kept.to(reader.dtype), reader), name
    saved = [name for path in (tmp_path / "s2").rglob("*.pt") for name in torch.load(path, weights_only=False).get("module", {})]
    assert saved and not any(name.startswith("reader.") for name in saved)
    # a full fine-tuning export is a backbone to train on (--backbone <export> --init <export>); at lr 0 nothing moves
    _, continued = run(TrainConfig(stage=2, out=str(tmp_path / "s3"), init=str(tmp_path / "s2" / "export"), lr=0.0, max_steps=1,
                                   full_finetune=True, train_head=True, **dict(common, backbone=str(tmp_path / "s2" / "export"))))
    for (name, trained), (_, started) in zip(model.lm.named_parameters(), continued.lm.named_parameters()):
        assert torch.equal(trained, started), name
    with pytest.raises(ValueError, match="is a trained RoT export: continue it without the reader loss"):
        run(TrainConfig(stage=2, out=str(tmp_path / "s4"), init=str(tmp_path / "s2" / "export"), reader_weight=1.0,
                        full_finetune=True, **dict(common, backbone=str(tmp_path / "s2" / "export"))))
    with pytest.raises(ValueError, match=re.escape("tokenizer has no <|image_pad|> token")):
        run(TrainConfig(stage=2, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(tmp_path / "x"),
                        init=str(tmp_path / "s1" / "export"), reader_weight=1.0, **dict(TINY, max_latents=None)))


def test_the_recorded_inference_budget_is_the_shards_mean_or_the_training_cap_when_lower():
    """A model trained with --max-latents C puts its answer after latent C, so rot-eval must stop there too."""
    from types import SimpleNamespace

    from rot_model.export import inference_budget

    shards = SimpleNamespace(manifest={"tokens": 2816000, "rows": 64000})  # 5x5 multiplication: 44 visual tokens a row
    assert inference_budget(shards) == 44
    assert inference_budget(shards, max_latents=32) == 32
    assert inference_budget(shards, max_latents=64) == 44


def test_the_global_batch_gives_the_same_losses_however_it_is_split(tiny_shards, tiny_qwen3_vl, tmp_path):
    """--global-batch 8 as one micro-batch (the CPU default: no accumulation), 4 x 2 and 2 x 4: the same losses;
    run.json and the summary say how it was split, and the summary counts the model's FLOPs."""
    common = dict(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), max_steps=3, lr=1e-3,
                  **{k: v for k, v in TINY.items() if k != "micro_batch"})
    runs = {}
    for micro in (None, 4, 2):
        out = tmp_path / f"micro-{micro}"
        summary, _ = run(TrainConfig(out=str(out), micro_batch=micro, **common))
        runs[micro] = (_losses(out), json.loads((out / "run.json").read_text()), summary)
    assert [(r["micro_batch"], r["grad_accum"], r["micro_batch_chosen_by"]) for _, r, _ in runs.values()] == [
        (8, 1, "no accumulation on a CPU"), (4, 2, "given"), (2, 4, "given")]
    assert {r["rollout"] for _, r, _ in runs.values()} == {"eager"}  # the default on a CPU, recorded
    assert {r["activation_checkpointing"] for _, r, _ in runs.values()} == {"on (a CPU: memory is not probed)"}
    for losses, _, _ in runs.values():
        assert losses == pytest.approx(runs[None][0], rel=1e-3)  # fp32 sums of other shapes round differently
    summary = runs[None][2]
    assert summary["global_batch"] == 8 and summary["model_tflop_per_sample"] > 0 and summary["mfu"] is None


def test_packing_trains_with_the_same_losses_and_run_json_records_it(tiny_shards, tiny_qwen3_vl, tmp_path):
    """--packing (the teacher-forced passes on the real tokens only) through the whole loop: the same losses as the
    padded passes, step by step, and run.json's config says which ran."""
    common = dict(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), max_steps=2, lr=1e-3, **TINY)
    losses = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        run(TrainConfig(out=str(out), packing=packing, **common))
        losses[packing] = _losses(out)
        recorded = json.loads((out / "run.json").read_text())
        assert recorded["config"]["packing"] is packing and recorded["packing"] == f"{'on' if packing else 'off'} (given)"
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_packing_by_default_is_on_only_on_a_gpu_where_the_backbone_can_pack(tiny_qwen3_vl):
    """The default (--packing unset): off on a CPU; on a GPU on for the backbone's own attention, off with the reason
    where it cannot pack (another attention, sliding-window layers); a given --packing wins (a backbone that cannot
    pack then refuses in one line: test_model)."""
    from transformers import AutoConfig

    from rot_model import attention
    from rot_train.train import packing_choice

    config = AutoConfig.from_pretrained(tiny_qwen3_vl).get_text_config()
    config._attn_implementation = attention.NAME
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    unset = TrainConfig(stage=1, shards="shards", out="out")
    assert packing_choice(unset, config, cpu) == (False, "off (a CPU)")
    assert packing_choice(unset, config, gpu) == (True, "on (a GPU)")
    assert packing_choice(TrainConfig(stage=1, shards="shards", out="out", packing=False), config, gpu) == (False, "off (given)")
    config.layer_types = ["full_attention", "sliding_attention"]
    assert packing_choice(unset, config, gpu) == (
        False, "off: it has sliding-window layers, which packed attention does not run")
    config.layer_types, config._attn_implementation = None, "eager"
    assert packing_choice(unset, config, gpu) == (False, f"off: its attention is eager, not {attention.NAME}")


def test_a_batch_split_that_cannot_work_is_refused_in_one_line(tiny_shards, tiny_qwen3_vl, tmp_path):
    from rot_train.batch_size import given

    with pytest.raises(ValueError, match="--micro-batch 3 does not divide the 8 samples per rank of --global-batch 8 on 1 "
                                         "rank\\(s\\): use one of 8, 4, 2, 1"):
        given(8, 1, 3)
    with pytest.raises(ValueError, match="--global-batch 7 does not split over 2 ranks: use a multiple of 2"):
        given(7, 2, 1)
    with pytest.raises(ValueError, match="48 rows give no optimizer step of --global-batch 64; lower it \\(at most 48\\)"):
        run(TrainConfig(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(tmp_path / "r"),
                        **dict(TINY, global_batch=64)))


@pytest.mark.parametrize("stage", [1, 2])
def test_the_flop_count_agrees_with_torch_counting_the_step(tiny_shards, tiny_qwen3_vl, stage):
    """rot_train.flops counts a training step's matrix FLOPs from the batch's lengths; torch's FlopCounterMode
    counts the matrix products the step actually runs (rows of one length: no padding; no recomputation). Its CPU
    attention kernel is not among the ops it counts, so the comparison is of the weights' products."""
    from torch.utils.flop_counter import FlopCounterMode

    from rot_data.tokens import IMG_BEGIN, IMG_END
    from rot_model.backbone import add_latent_tokens, load_backbone
    from rot_train.batch_size import worst_case_row
    from rot_train.flops import Counter
    from rot_model.model import RoTModel
    from rot_model.shard_stream import ShardSet
    from rot_train.train import forward_options, make_collate

    shard_set = ShardSet.open(tiny_shards)
    cfg = TrainConfig(stage=stage, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out="o", full_finetune=True,
                      **dict(TINY, max_latents=None))
    lm, tokenizer = load_backbone(str(tiny_qwen3_vl), dtype=torch.float32)
    ids = add_latent_tokens(lm, tokenizer)
    model = RoTModel(lm, shard_set.dim, ids[IMG_BEGIN], ids[IMG_END], cfg.head_width)
    model.requires_grad_(stage == 2)
    model.head.requires_grad_(stage == 1)
    row, tokens = worst_case_row(shard_set)
    batch = make_collate(cfg, shard_set, tokenizer, ids)([row] * 4, [torch.randn(tokens, shard_set.dim)] * 4)
    batch["weights"] = torch.ones(4)
    with FlopCounterMode(display=False) as counted:
        model(batch, **forward_options(cfg, 0))["loss"].backward()
    counter = Counter(model, cfg)
    assert counter.of_batch(batch, None, with_attention=False) == pytest.approx(counted.get_total_flops(), rel=0.03)
    assert counter.of_batch(batch, None) > counter.of_batch(batch, None, with_attention=False)


def test_a_warm_up_longer_than_the_run_is_scaled_to_half_of_it(tiny_shards, tiny_qwen3_vl, tmp_path, capfd):
    """--max-steps 4 with --warmup-steps 20 reached a fifth of the peak learning rate; now it warms up over 2 steps,
    says so, and records it in run.json."""
    out = tmp_path / "short"
    run(TrainConfig(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(out), max_steps=4,
                    **dict(TINY, warmup_steps=20, lr=1e-3)))
    assert "note: --warmup-steps 20 is more than half of the 4 steps this run makes: warming up over 2" in capfd.readouterr().out
    assert json.loads((out / "run.json").read_text())["warmup_steps"] == 2
    assert max(_losses(out, "lr")) == pytest.approx(1e-3, rel=0.01)


def test_merged_latents_average_consecutive_visual_tokens_and_halve_the_budget(stage_runs, tiny_shards, tiny_qwen3_vl,
                                                                                tmp_path):
    """--merge-latents K (issue 33's compression curve): a latent's target is the mean of K visual embeddings, so a row
    takes ceil(tokens / K) latents; the budget is halved at K=2; the export records K, and Stage II refuses a Stage I
    trained with another K (its head predicts those means)."""
    import shutil
    from types import SimpleNamespace

    from rot_model.batches import RoTCollator, merged
    from rot_model.export import inference_budget
    from rot_model.backbone import load_backbone

    tokens = torch.arange(10.0).reshape(5, 2)  # 5 visual tokens: pairs (0,1), (2,3), then (4) alone
    assert merged(tokens, 2).tolist() == [[1.0, 2.0], [5.0, 6.0], [8.0, 9.0]]
    assert torch.equal(merged(tokens, 1), tokens)
    assert inference_budget(SimpleNamespace(manifest={"tokens": 2816000, "rows": 64000}), merge=4) == 11  # 44 / 4
    _, tokenizer = load_backbone(str(tiny_qwen3_vl))
    rows = [{"id": str(i), "question": "2*3", "answer": "6", "cot": "x"} for i in range(2)]
    batch = RoTCollator(tokenizer, 1, 2, merge=2)(rows, [tokens, tokens[:4]])
    assert batch["n_latents"].tolist() == [3, 2] and batch["targets"][1, :2].tolist() == [[1.0, 2.0], [5.0, 6.0]]

    _, base, _, _ = stage_runs
    assert json.loads((base / "s1" / "export" / "rot_config.json").read_text())["merge_latents"] == 1
    stage1 = tmp_path / "stage1-merged"  # the fixture's Stage I export, as if trained with --merge-latents 2
    shutil.copytree(base / "s1" / "export", stage1)
    config = json.loads((stage1 / "rot_config.json").read_text())
    (stage1 / "rot_config.json").write_text(json.dumps({**config, "merge_latents": 2}))
    with pytest.raises(ValueError, match=r"--merge-latents 1: the Stage I export .* was trained with --merge-latents 2"):
        run(TrainConfig(stage=2, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(tmp_path / "s2"),
                        init=str(stage1), lr=1e-3, max_steps=1, **TINY))
    with pytest.raises(ValueError, match=r"^--reader-weight .* one per visual token: .* drop --max-latents and --merge-latents$"):
        TrainConfig(stage=2, shards="s", out="o", init="i", reader_weight=1.0, merge_latents=2).validate()


def test_the_memory_probe_collates_the_longest_row_as_training_does(tiny_shards, tiny_qwen3_vl):
    """The micro-batch probe must see the longest batch of the run: with --merge-latents 2 and --max-latents 3 the
    longest row takes min(ceil(tokens / 2), 3) latent slots, as every training batch does (capping before merging
    would have probed fewer slots than training uses, and a probed micro-batch could run out of memory)."""
    from rot_model.backbone import add_latent_tokens, load_backbone
    from rot_model.shard_stream import ShardSet, ShardStream
    from rot_train.batch_size import worst_case_batch, worst_case_row
    from rot_train.train import make_collate

    shard_set = ShardSet.open(tiny_shards)
    lm, tokenizer = load_backbone(str(tiny_qwen3_vl))
    ids = add_latent_tokens(lm, tokenizer)
    for merge, cap in ((1, None), (2, None), (2, 3), (3, 2)):
        cfg = TrainConfig(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out="o",
                          **dict(TINY, max_latents=cap, merge_latents=merge))
        collate = make_collate(cfg, shard_set, tokenizer, ids)
        worst = worst_case_row(shard_set)
        probed = worst_case_batch(collate, worst, shard_set.dim, 2)["targets"].shape[1]
        trained = max(batch["targets"].shape[1] for batch in ShardStream(shard_set, collate, 4))
        expected = -(-worst[1] // merge)
        assert probed == trained == (min(expected, cap) if cap else expected), (merge, cap)
