"""Options declared once (rot_train.config): a run given as a YAML file or as an earlier run's run.json trains as the same
flags do; flags override the file; a key that is no option of the command is one line naming it and the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rot_train.config import COMMANDS, CONFIGS, TrainConfig, from_file
from rot_train.launch import app


def _train(*args: str):
    return CliRunner().invoke(app, list(args))


def _error(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output[-2000:]
    return result.stderr.strip()


@pytest.mark.parametrize("stage", [1, 2])
def test_the_official_qwen3_vl_4b_configurations_ship_as_config_files(stage):
    command = COMMANDS[f"stage{stage}"]
    values = from_file(CONFIGS / f"qwen3-vl-4b-stage{stage}.yaml", command)
    config = TrainConfig(stage=stage, shards="s", out="o", init="i", **values)
    assert (config.backbone, config.global_batch, config.epochs, config.lr, config.warmup_steps, config.head_width) == (
        "Qwen/Qwen3-VL-4B-Instruct", 128, 2, 2e-5, 20, 2048)
    assert (config.vision_weight, config.lm_weight, config.deepspeed_file) == (
        10.0 if stage == 1 else 0.0, 1.0, str(CONFIGS / "zero2.json"))
    if stage == 2:
        assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets, config.train_head) == (
            16, 32, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"], False)


def test_a_config_file_is_read_with_the_flags_types_and_flags_override_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 2e-5\nmax_steps: 0\nshards: nowhere\nout: " + str(tmp_path / "out") + "\n")  # '2e-5' is a YAML string
    assert _error(_train("stage1", "--config", str(config))) == "error: --max-steps 0: use at least 1 (leave it out for the default)"
    # the flag wins over the file: the next problem is the missing shard folder, named from the file
    assert _error(_train("stage1", "--config", str(config), "--max-steps", "1")).startswith("error: nowhere does not exist")
    config.write_text("lr: fast\n")
    assert _error(_train("stage1", "--config", str(config), "--shards", "s", "--out", "o")).startswith(
        f"error: --config {config}: lr: ")
    assert _error(_train("stage1", "--config", str(tmp_path / "none.yaml"))) == f"error: --config {tmp_path / 'none.yaml'}: no such file"
    assert _error(_train("stage1", "--out", "o")) == "error: --shards is required: give it on the command line or in --config"


def test_a_key_that_is_no_option_of_the_command_is_named_with_its_file(tmp_path):
    config = tmp_path / "stage2.yaml"
    config.write_text("global_batch: 8\nlora_r: 4\n")
    assert _error(_train("stage1", "--config", str(config), "--shards", "s", "--out", "o")) == (
        f"error: --config {config}: 'lora_r' is not an option of rot-train stage1 (it is an option of rot-train stage2 and sft)")
    config.write_text("global-batch: 8\n")
    assert _error(_train("stage2", "--config", str(config), "--shards", "s", "--out", "o")) == (
        f"error: --config {config}: 'global-batch' is not an option of rot-train stage2 (the keys are the option names "
        "with underscores, e.g. global_batch)")
    assert _error(_train("sft", "--mode", "rot", "--shards", "s", "--out", "o")).startswith(
        "error: --mode rot: rot-train sft trains sft-cot (or sft-nocot)")


def test_run_json_fed_back_as_the_config_trains_the_same_run(tiny_shards, tiny_qwen3_vl, tmp_path):
    """A Stage I run from a YAML file plus flags; its run.json given back as --config (with another --out) trains the
    same losses; given to another command it is refused."""
    config = tmp_path / "stage1.yaml"
    config.write_text(f"shards: {tiny_shards}\nbackbone: {tiny_qwen3_vl}\nglobal_batch: 8\nmicro_batch: 4\nhead_width: 32\n"
                      "max_latents: 12\nwarmup_steps: 1\nnum_workers: 0\nlr: 1e-3\n")
    first = _train("stage1", "--config", str(config), "--max-steps", "3", "--out", str(tmp_path / "first"))
    assert first.exit_code == 0, first.output[-3000:]
    recorded = json.loads((tmp_path / "first" / "run.json").read_text())
    assert recorded["command"] == "stage1" and recorded["config"]["lr"] == 1e-3 and recorded["config"]["max_steps"] == 3
    assert set(recorded["config"]) == {f.name for f in COMMANDS["stage1"].fields()}
    again = _train("stage1", "--config", str(tmp_path / "first" / "run.json"), "--out", str(tmp_path / "again"))
    assert again.exit_code == 0, again.output[-3000:]

    def losses(out: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "again") == losses(tmp_path / "first") and len(losses(tmp_path / "first")) == 3
    assert _error(_train("stage2", "--config", str(tmp_path / "first" / "run.json"), "--out", str(tmp_path / "x"))) == (
        f"error: --config {tmp_path / 'first' / 'run.json'} is the run.json of a rot-train stage1 run: give it to rot-train "
        "stage1, or write the options this one should take in a YAML file")


def test_the_render_commands_take_their_defaults_from_render_settings():
    """`rot-render build` and `show` write no render default of their own (font_size 20 was written three times)."""
    import typer

    from rot_render.cli import app as render
    from rot_vision.render import RenderSettings

    settings = RenderSettings()
    for name in ("build", "show"):
        defaults = {p.name: p.default for p in typer.main.get_command(render).commands[name].params}
        assert (defaults["height"], defaults["font_size"], defaults["padding"], defaults["font"], defaults["thought_tags"]) == (
            settings.height, settings.font_size, settings.padding, settings.font_path, settings.thought_tags), name
    assert {p.name: p.default for p in typer.main.get_command(render).commands["build"].params}["max_tokens"] == settings.max_tokens
