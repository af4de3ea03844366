"""Every failure a user meets is one line naming the file, folder, flag or model and the fix."""

from __future__ import annotations

import os
import subprocess

import pytest

from rot_data import locks
from rot_data.hub import ModelNotFound
from tests.conftest import invoke


@pytest.mark.parametrize("load", ["encoder", "backbone"])
def test_an_unreachable_hub_id_names_the_model_and_says_offline(monkeypatch, tmp_path, load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    if load == "encoder":
        from rot_vision.tower import read_encoder_source as read
    else:
        from rot_model.backbone import checkpoint_dir as read
    with pytest.raises(ModelNotFound) as error:
        read("Qwen/Qwen3-VL-4B-Instruct")
    message = str(error.value)
    assert message.startswith(f"--{load} Qwen/Qwen3-VL-4B-Instruct: ") and "offline" in message
    assert "local checkpoint folder" in message and "\n" not in message


def test_one_writer_per_folder_and_a_dead_holder_frees_it(tmp_path):
    out = tmp_path / "out"
    with locks.exclusive(out, "first build"):
        with pytest.raises(locks.FolderBusy, match=r"--out .*/out is in use by first build \(pid \d+"):
            with locks.exclusive(out, "second build"):
                pass
        # another process is refused too (flock is per open file, across processes)
        other = subprocess.run(["python", "-c", "from pathlib import Path; from rot_data import locks\n"
                                f"with locks.exclusive(Path({str(out)!r}), 'other'): pass"], capture_output=True, text=True)
        assert other.returncode == 1 and "is in use by first build" in other.stderr
    assert locks.holder(out) is None  # released and removed at the end of the block
    with locks.exclusive(out, "after"):
        assert "after" in locks.holder(out)
    # a holder killed with SIGKILL leaves the file but not the lock
    holder = subprocess.Popen(["python", "-c", "import time; from pathlib import Path; from rot_data import locks\n"
                               f"with locks.exclusive(Path({str(out)!r}), 'killed'):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(locks.FolderBusy):
        with locks.exclusive(out, "too early"):
            pass
    holder.kill()
    holder.wait()
    with locks.exclusive(out, "taken over"):
        assert "taken over" in locks.holder(out)


def test_an_out_that_is_a_file_or_not_writable_is_refused_before_any_work(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("x")
    assert locks.out_folder_problem(file) == f"--out {file} is a file, not a folder; choose a folder path"
    if os.geteuid() != 0:  # root writes everywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        assert "is not writable" in locks.out_folder_problem(locked / "sub")


def test_a_training_run_refuses_a_folder_another_run_holds(tmp_path):
    from rot_train.train import TrainConfig, run

    out = tmp_path / "run"
    with locks.exclusive(out, "rot-train rot stage 1"):
        with pytest.raises(ValueError, match=r"--out .*/run is in use by rot-train rot stage 1 \(pid"):
            run(TrainConfig(stage=1, shards=str(tmp_path / "no-shards"), backbone="anchor", out=str(out)))


def test_a_taken_launcher_port_is_named_with_the_flag_that_frees_it():
    """Two trainings on one machine: the second's process group cannot bind the launcher's port (29500 by default)."""
    import socket
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   DS_ACCELERATOR="cpu")
        result = subprocess.run([sys.executable, "-c", "from rot_train.train import init_distributed; init_distributed()"],
                                env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert (f"ValueError: port {port} is in use (another training on this machine?): give this one another, "
            "e.g. deepspeed --master_port 29501 ...") in result.stderr


def _anchor_error(args: list[str]) -> str:
    """What `rot-anchor ARGS` prints to stderr, run in this process; it must exit 1, no traceback."""
    from rot_anchor.cli import app

    return invoke(app, args, exit_code=1).stderr.strip()


def test_rot_anchor_evaluate_answers_bad_input_in_one_line(tmp_path):
    """A data folder without the evaluation files, a model folder that does not exist, a count below 1."""
    cases = [(["--data-dir", str(tmp_path), "--limit", "2"],
              f"error: {tmp_path}/icot_mult_4x4/test_bigbench.txt does not exist; check --data-dir"),
             ([str(tmp_path / "nowhere"), "--limit", "2"],
              f"error: the VLM {tmp_path / 'nowhere'}: no such checkpoint folder; pass the path of a local checkpoint folder"),
             (["--batch-size", "0"], "error: --batch-size 0: use at least 1")]
    for args, message in cases:
        assert _anchor_error(["evaluate", *args, "--out", str(tmp_path / "eval.json")]) == message


def test_rot_anchor_pretrain_answers_bad_input_in_one_line(tmp_path):
    """Values below their bound, an unknown size, a file as --out, an --init that is no checkpoint."""
    from rot_anchor.pretrain import PretrainConfig

    out = str(tmp_path / "run")
    for field, value, message in (("steps", 0, "--steps 0: use at least 1"), ("batch", 0, "--batch 0: use at least 1"),
                                  ("lr", -1e-3, "--lr -0.001: use 0 or more"), ("workers", -1, "--workers -1: use 0 or more"),
                                  ("train_seconds", 0.0, "--train-seconds 0: use a number of seconds > 0"),
                                  ("size", "huge", "--size huge: use anchor or micro")):
        with pytest.raises(ValueError) as error:
            PretrainConfig(out=out, **{field: value})
        assert str(error.value).startswith(message)
    (tmp_path / "file").write_text("")
    cases = [(["--out", str(tmp_path / "file")], f"error: --out {tmp_path / 'file'} is a file; give a folder for the run"),
             (["--out", out, "--init", str(tmp_path / "nowhere")],
              f"error: --init {tmp_path / 'nowhere'}: no such checkpoint folder; pass the path of a local checkpoint folder")]
    for args, message in cases:
        assert _anchor_error(["pretrain", "--size", "micro", "--steps", "1", "--workers", "0", "--no-evaluate", *args]) == message


def test_an_export_without_its_weights_is_one_line_naming_the_folder(tmp_path):
    """A copy of rot-4x4 that lost model/delta.safetensors: rot-eval says which folder is incomplete, no OSError."""
    import shutil

    from rot_data import registry

    broken = tmp_path / "broken"
    shutil.copytree(registry.SHIPPED[registry.ROT_4X4], broken)
    (broken / "model" / "delta.safetensors").unlink()
    result = subprocess.run(["rot-eval", "run", "--checkpoint", str(broken), "--dataset", "icot_mult_4x4", "--limit", "2",
                             "--out", str(tmp_path / "ev")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: {broken / 'model'} holds no weights (model.safetensors or delta.safetensors): if it is part of an export, "
        "the export is incomplete; copy the whole export folder again, or export the run again"), result.stderr[-2000:]
