"""Fuzz of the command-line options (issue 31.8): zeros, negatives and small values for the numeric options of
`rot-eval run`, `rot-train stage1` and `rot-render build`. Every draw ends in one of two ways: exit 0 with the
command's summary line, or exit 1 with one line that starts with "error:" and names a flag, never a traceback."""

import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from rot_data.records import PACKAGE_DATA

pytestmark = pytest.mark.slow  # each draw that passes the checks runs the real command

SMALL = st.integers(-1, 3)
MAYBE = st.one_of(st.none(), SMALL)
FUZZ = settings(max_examples=6, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def options(values: dict) -> list[str]:
    args = []
    for name, value in values.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def check(result, done: str) -> None:
    """Exit 0 and the summary line, or exit 1 and one error line naming a flag or a file."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        assert done in result.stdout, result.output[-2000:]
        return
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]  # e.g. the tiny tower's
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output[-2000:]
    assert "--" in lines[0] or "/" in lines[0], lines[0]
    assert "Traceback" not in result.output


@FUZZ
@given(values=st.fixed_dictionaries({"limit": MAYBE, "latents": MAYBE, "batch_size": SMALL,
                                     "max_answer_tokens": SMALL, "dynamic_threshold": st.one_of(st.none(), st.floats(-1, 1))}))
def test_rot_eval_run_answers_any_small_option_values(values):
    from rot_eval.cli import app

    with tempfile.TemporaryDirectory() as out:  # three shipped test rows: without --limit every row is decoded
        rows = Path(out) / "three.txt"
        rows.write_text("".join(open(PACKAGE_DATA / "icot_mult_4x4" / "test_bigbench.txt").readlines()[:3]))
        result = CliRunner().invoke(app, ["run", "--checkpoint", "rot-4x4", "--dataset", str(rows), "--out", str(Path(out) / "ev"),
                                          *options(values)])
        check(result, f"RoT on {rows} [test]")


@FUZZ
@given(values=st.fixed_dictionaries({"global_batch": st.integers(-1, 9), "micro_batch": MAYBE, "max_steps": st.integers(-1, 2),
                                     "epochs": SMALL, "warmup_steps": SMALL, "max_latents": MAYBE,
                                     "head_width": st.sampled_from([-1, 0, 8]), "lr": st.sampled_from([-1e-3, 0.0, 1e-3])}))
def test_rot_train_stage1_answers_any_small_option_values(values, tiny_shards, tiny_qwen3_vl):
    from rot_train.launch import app

    with tempfile.TemporaryDirectory() as out:
        result = CliRunner().invoke(app, ["stage1", "--shards", str(tiny_shards), "--backbone", str(tiny_qwen3_vl),
                                          "--out", str(Path(out) / "run"), "--num-workers", "0", *options(values)])
    check(result, "stage 1 done:")


@FUZZ
@given(values=st.fixed_dictionaries({"limit": SMALL, "shard_size": SMALL, "batch_size": SMALL, "max_tokens": MAYBE,
                                     "num_encoders": MAYBE, "height": st.sampled_from([None, -1, 0, 16]),
                                     "font_size": st.sampled_from([None, 0, 12]), "padding": st.sampled_from([None, -1, 0, 2])}))
def test_rot_render_build_answers_any_small_option_values(values):
    """As its own process, as a user runs it (Ray starts and stops with it); a draw that hangs fails the test."""
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run(["rot-render", "build", "--dataset", "mult_3x3", "--split", "test", "--encoder", "tiny",
                                 "--out", str(Path(out) / "shards"), *options(values)], capture_output=True, text=True,
                                timeout=180)
    check(SimpleNamespace(exit_code=result.returncode, exception=None, stdout=result.stdout, stderr=result.stderr,
                          output=result.stdout + result.stderr), "done:")
