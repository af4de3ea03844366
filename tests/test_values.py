"""A zero (and any explicit value) is a value: never read as "not given", and refused in one line when it makes no sense."""

from __future__ import annotations

import pytest

from rot_model.export import latent_budget
from rot_train.config import AT_LEAST_ONE, NOT_NEGATIVE, TrainConfig


def _config(**values) -> TrainConfig:
    return TrainConfig(stage=1, shards="s", backbone="b", out="o", **values)


@pytest.mark.parametrize("name", AT_LEAST_ONE)
def test_every_count_option_refuses_zero_and_negatives_naming_the_flag(name):
    for value in (0, -1):
        with pytest.raises(ValueError, match=rf"^--{name.replace('_', '-')} {value}: use at least 1"):
            _config(**{name: value})
    assert getattr(_config(**{name: 1}), name) == 1  # one is taken literally


@pytest.mark.parametrize("name", NOT_NEGATIVE)
def test_every_weight_and_count_that_may_be_zero_takes_zero_literally(name):
    assert getattr(_config(**{name: 0}), name) == 0  # not replaced by a default
    with pytest.raises(ValueError, match=rf"^--{name.replace('_', '-')} -1: use 0 or more"):
        _config(**{name: -1})


def test_the_rollout_setting_is_explicit_and_its_default_follows_the_machine():
    import torch

    from rot_train.train import rollout_mode

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert rollout_mode(_config(), cpu, 2) == "eager" and rollout_mode(_config(), gpu, 2) == "graphs"
    assert rollout_mode(_config(), gpu, 3) == "eager"  # ZeRO-3 moves the weights a graph reads
    assert rollout_mode(_config(rollout="eager"), gpu, 2) == "eager"
    for device, zero in ((cpu, 2), (gpu, 3)):
        with pytest.raises(ValueError, match=r"^--rollout graphs needs a GPU and ZeRO-2"):
            rollout_mode(_config(rollout="graphs"), device, zero)
    with pytest.raises(ValueError, match=r"^--rollout fast: use one of graphs, eager"):
        _config(rollout="fast")


def test_zero_vision_weight_in_stage_one_stays_zero():
    assert _config(vision_weight=0.0).vision_weight == 0.0 and _config().vision_weight == 10.0


def test_the_latent_budget_is_the_given_one_or_the_recorded_one():
    assert latent_budget({"inference_latents": 28}) == 28 and latent_budget({}) == 32
    assert latent_budget({"inference_latents": 28}, 5) == 5
    for value in (0, -3):
        with pytest.raises(ValueError, match=rf"^--latents {value}: "):
            latent_budget({"inference_latents": 28}, value)


@pytest.mark.parametrize("args, says", [
    (["--latents", "0"], "--latents 0: a RoT model decodes at least 1 latent"),
    (["--latents", "-2"], "--latents -2:"),
    (["--latents", "100000", "--batch-size", "1"], "more than the backbone's max_position_embeddings 4096"),
    (["--limit", "0"], "--limit 0: use at least 1"),
    (["--batch-size", "0"], "--batch-size 0: use at least 1"),
    (["--dynamic-threshold", "0.1", "--learned-stop"], "--dynamic-threshold and --learned-stop are two ways"),
    (["--oracle-latents"], "--oracle-latents gives each question its own CoT's visual-token count"),
])
def test_rot_eval_refuses_a_budget_it_cannot_decode_in_one_line(tmp_path, args, says):
    from typer.testing import CliRunner

    from rot_eval.cli import app

    result = CliRunner().invoke(app, ["run", "--checkpoint", "rot-4x4", "--dataset", "icot_mult_4x4", "--split", "test",
                                      "--limit", "1", "--out", str(tmp_path / "ev"), *args])
    assert result.exit_code == 1 and says in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "ev" / "summary.json").exists()


@pytest.mark.parametrize("command, args, says", [
    ("viz", ["--question", "1234 * 5678", "--latents", "0"], "--latents 0: a RoT model decodes at least 1 latent"),
    ("viz", ["--question", "1234 * 5678", "--latents", "100000"], "more than the backbone's max_position_embeddings 4096"),
    ("viz", ["--question", "1", "--checkpoint", "no-such-export"], "no-such-export"),
    ("readback", ["--dataset", "icot_mult_4x4", "--shards", "s", "--limit", "0"], "--limit 0: use at least 1"),
    ("readback", ["--dataset", "icot_mult_4x4", "--shards", "s", "--limit", "1", "--latents", "0"], "--latents 0:"),
    ("readback", ["--dataset", "icot_mult_4x4", "--shards", "s", "--limit", "1", "--latents", "100000"],
     "max_position_embeddings 4096"),
])
def test_rot_eval_viz_and_readback_check_their_budget_before_decoding(tmp_path, command, args, says):
    """The class of `rot-eval run --latents 0 / 100000` (issue 31.1, 31.3) in the other two commands that decode latents:
    one line naming the flag, before any decoding (100000 latents ran for minutes), and nothing written."""
    from typer.testing import CliRunner

    from rot_eval.cli import app

    checkpoint = [] if "--checkpoint" in args else ["--checkpoint", "rot-4x4"]
    result = CliRunner().invoke(app, [command, *checkpoint, "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 1 and says in result.output, result.output[-2000:]
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
