"""Issue 14.6, faults: real processes killed with real signals while the build and the trainer work."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from rot_data.records import load_records
from rot_data import shards
from rot_render.pipeline import BuildConfig, build

pytestmark = pytest.mark.slow  # Ray builds and trainer processes: pytest -m 'not slow' skips them


def _config(out: Path, **overrides) -> BuildConfig:
    return BuildConfig(**dict(dict(encoder="tiny", dataset="gsm8k", out=out, limit=200, shard_size=20, batch_size=10), **overrides))


def _encoder_pids() -> list[int]:
    """PIDs of the live Ray Data actors that hold the encoder (Ray's GCS actor table; no dashboard needed)."""
    import ray

    return [actor["Pid"] for actor in ray._private.state.actors().values()
            if "EncodeBatch" in actor["ActorClassName"] and actor["State"] == "ALIVE" and actor["Pid"]]


def _kill_session(session: int, timeout: float = 60) -> None:
    """SIGKILL every process of ``session`` (a build started with ``start_new_session``) until none is left: Ray's
    workers sit in process groups of their own, and one still alive could finish writing a shard after the check."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for entry in os.scandir("/proc"):
            try:  # /proc/PID/stat after the name in parentheses: state, parent, group, session; a zombie is dead
                state, _, _, in_session = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[:4]
                if entry.name.isdigit() and int(in_session) == session and state != "Z":
                    alive.append(int(entry.name))
            except (OSError, IndexError, ValueError):  # the process ended while being read
                continue
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"processes of the killed build's session {session} still alive after {timeout} s")


class _Killer(threading.Thread):
    """Beside a build: SIGKILLs the encoder actors' processes, ``times`` kills at most, once ``ready()`` is true."""

    def __init__(self, times: int, ready=lambda: True, deadline: float = 120):
        super().__init__(daemon=True)
        self.times, self.ready, self.deadline, self.killed, self.stop = times, ready, time.time() + deadline, [], threading.Event()

    def run(self):
        while not self.stop.is_set() and len(self.killed) < self.times and time.time() < self.deadline:
            if self.ready():
                for pid in _encoder_pids():
                    if pid not in self.killed:
                        try:
                            os.kill(pid, signal.SIGKILL)
                            self.killed.append(pid)
                        except ProcessLookupError:
                            pass
            time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The 200-row shard set of _config, built without a fault."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    build(_config(out), progress=False)
    return out


def _planned_ids(limit: int = 200, shard_size: int = 20) -> list[list[str]]:
    records, _ = load_records("gsm8k")
    return [[r.id for r in records[i:i + shard_size]] for i in range(0, limit, shard_size)]


def _same_shards(out: Path, reference: Path) -> None:
    """Every planned row once, in order, and the files bit-identical to the build without a fault."""
    manifest = shards.read_manifest(out)
    assert shards.verify(out) == [] and manifest["rows"] == 200
    for name, ids in zip([s["name"] for s in manifest["shards"]], _planned_ids()):
        assert shards.read_back(out / name, ids) is None, name
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in shards.read_manifest(reference)["shards"]]
    assert not list(out.glob(".*tmp*"))


def test_an_encoder_actor_killed_mid_build_is_restarted_and_no_row_is_lost_or_repeated(reference, tmp_path):
    """Already right before issue 14.6 (Ray restarts the actor and retries its batch): shown, not changed."""
    out = tmp_path / "shards"
    killer = _Killer(times=1, ready=lambda: any(out.glob("shard-*.parquet")))  # once the first shard is written
    killer.start()
    manifest = build(_config(out), progress=False)
    killer.join()
    assert len(killer.killed) == 1 and manifest["run"]["encoded_rows"] == 200 and manifest["run"]["resumed_shards"] == 0
    _same_shards(out, reference)


def test_a_build_killed_while_writing_a_shard_resumes_to_the_same_shards(reference, tmp_path):
    """SIGKILL to the whole build (the driver and every Ray process it started) the moment a shard's temporary file
    is seen after a first shard was written, or else once two shards are written: no half-written file carries a
    shard's name, and the same command finishes with shards identical to a build that was never killed."""
    import subprocess

    out = tmp_path / "shards"
    process = subprocess.Popen(["rot-render", "build", "--encoder", "tiny", "--dataset", "gsm8k", "--out", str(out),
                                "--limit", "200", "--shard-size", "20", "--batch-size", "10"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, during_write = time.time() + 120, False
    while time.time() < deadline and process.poll() is None:
        names = [entry.name for entry in os.scandir(out)] if out.exists() else []
        during_write, written = any(".rot-partial-" in name for name in names), sum(name.startswith("shard-") for name in names)
        if (during_write and written >= 1) or written >= 2:
            break
        time.sleep(0.001)
    _kill_session(process.pid)
    process.wait(timeout=30)
    assert not (out / shards.MANIFEST).exists()
    finished = sorted(out.glob("shard-*.parquet"))
    assert 0 < len(finished) < 10
    planned = dict(zip([shards.shard_name(i) for i in range(10)], _planned_ids()))
    assert all(shards.read_back(path, planned[path.name]) is None for path in finished)  # each a whole shard
    manifest = build(_config(out), progress=False)
    assert manifest["run"]["resumed_shards"] == len(finished) and manifest["run"]["reencoded_damaged"] == []
    assert (out / "build-stats.txt").read_text().count("Operator") >= 2  # the resumed build's time per stage
    _same_shards(out, reference)  # every planned row once, in order, bit-identical to the build never killed
    print("killed during a write:", during_write)


# Run as a script: a Ray cluster whose workers' disk is full after a few kB for the shard writers (each worker, before
# any task, swaps pyarrow's write_table for one writing through a file that raises ENOSPC, the one stand-in here) or
# for the encoders' pieces (pyarrow's OSFile swapped the same way), then the CLI.
FULL_DISK = """
import errno, io, os, sys
import ray

def full_disk():
    import pyarrow as pa
    import pyarrow.parquet as pq
    real = pq.write_table

    class Full(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 4000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    def write_table(table, where, **options):
        with Full(where, "w") as file:
            real(table, pa.PythonFile(file, mode="w"), **options)
    if os.environ["FULL_FOR"] == "shards":
        pq.write_table = write_table
    else:
        pa.OSFile = lambda where, mode: pa.PythonFile(Full(where, "w"), mode="w")

ray.init(runtime_env={"worker_process_setup_hook": full_disk, "env_vars": {"FULL_FOR": sys.argv[1]}}, log_to_driver=False,
         include_dashboard=False)
from rot_render.cli import app
app(sys.argv[2:], prog_name="rot-render")
"""


@pytest.mark.parametrize("full_for", ["shards", "pieces"])
def test_a_full_disk_ends_the_build_in_one_line_and_leaves_nothing_half_written(tmp_path, full_for):
    """The disk fills while a shard is written, or while an encoder actor leaves its pack's rows on the disk."""
    import subprocess
    import sys

    out = tmp_path / "shards"
    args = ["build", "--encoder", "tiny", "--dataset", "gsm8k", "--out", str(out), "--limit", "40", "--shard-size", "20",
            "--batch-size", "10"]
    result = subprocess.run([sys.executable, "-c", FULL_DISK, full_for, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no space left on the device of {out} (No space left on device); the finished shards are kept and nothing "
        "half-written is: free space, then re-run the same command to resume")
    assert sorted(p.name for p in out.iterdir() if p.name != "build-stats.txt") == []  # no shard, no temporary file, no manifest
    if full_for == "shards":  # space again: the same command finishes
        manifest = build(_config(out, limit=40), progress=False)
        assert manifest["rows"] == 40 and shards.verify(out) == []


ROOT = Path(__file__).resolve().parents[1]
TINY = dict(global_batch=8, micro_batch=4, head_width=32, max_latents=12, warmup_steps=1, num_workers=1, epochs=2, lr=1e-3)


def _trainer(shards_path, backbone, out, *extra, **options):
    """`python -m rot_train stage1 ...` as its own process (a one-process group), in its own session."""
    import subprocess
    import sys

    args = ["--shards", str(shards_path), "--backbone", str(backbone), "--out", str(out)]
    for key, value in dict(TINY, **options).items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.Popen([sys.executable, "-m", "rot_train", "stage1", *args, *extra],
                            env=dict(env, DS_ACCELERATOR="cpu"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _steps_and_losses(out: Path) -> list[tuple[int, float]]:
    import json

    return [(row["step"], row["loss"]) for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_a_trainer_killed_while_saving_a_checkpoint_resumes_from_the_last_complete_one(tiny_shards, tiny_qwen3_vl, tmp_path):
    """SIGKILL the moment the next checkpoint's folder appears (DeepSpeed is writing it, `latest` still names the one
    before): `latest` names a whole checkpoint, and --resume from it repeats the killed step's loss exactly."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    process = _trainer(tiny_shards, tiny_qwen3_vl, out, save_every=1, max_steps=12, keep_checkpoints=2)
    deadline, caught = time.time() + 240, None
    while time.time() < deadline and process.poll() is None and caught is None:
        try:
            latest = int((checkpoints / "latest").read_text().removeprefix("step"))
        except (FileNotFoundError, ValueError):
            latest = None
        if latest is not None and (checkpoints / f"step{latest + 1}").exists():
            os.killpg(process.pid, signal.SIGKILL)
            caught = latest
        time.sleep(0.001)
    output = process.communicate(timeout=60)[0]
    assert caught is not None, output[-3000:]
    assert (checkpoints / "latest").read_text() == f"step{caught}"
    kept = {p.name for p in checkpoints.glob("step*")}
    assert f"step{caught}" in kept and f"step{caught + 1}" in kept and len(kept) <= 3  # 2 whole + the one cut short
    before = dict(_steps_and_losses(out))  # the killed run logged step caught + 1 before saving it

    resumed = _trainer(tiny_shards, tiny_qwen3_vl, out, "--resume", save_every=1, max_steps=caught + 2, keep_checkpoints=2)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    after = dict(_steps_and_losses(out))
    assert [step for step, _ in _steps_and_losses(out)] == list(range(1, caught + 3))  # each step once: the killed line dropped
    assert abs(after[caught + 1] - before[caught + 1]) <= 1e-6 * abs(before[caught + 1])  # retrained to the same loss
    assert {p.name for p in checkpoints.glob("step*")} == {f"step{caught + 1}", f"step{caught + 2}"}


def test_keep_checkpoints_rotates_old_ones_and_zero_keeps_all(tiny_shards, tiny_qwen3_vl, tmp_path):
    from rot_train.train import TrainConfig, run

    def names(out):
        return sorted(p.name for p in (out / "checkpoints").glob("step*")), (out / "checkpoints" / "latest").read_text()

    common = dict(stage=1, shards=str(tiny_shards), backbone=str(tiny_qwen3_vl), out=str(tmp_path / "run"), save_every=1, **TINY)
    run(TrainConfig(**common, max_steps=3, keep_checkpoints=0))
    assert names(tmp_path / "run") == (["step1", "step2", "step3"], "step3")
    assert TrainConfig(stage=1, shards="s", backbone="b", out="o").keep_checkpoints == 2  # the default
    run(TrainConfig(**common, max_steps=5, resume=True))
    assert names(tmp_path / "run") == (["step4", "step5"], "step5")
    with pytest.raises(ValueError, match="--keep-checkpoints -1: use 0 or more"):
        run(TrainConfig(**common, max_steps=5, keep_checkpoints=-1))


def test_encoder_actors_that_keep_dying_end_the_build_in_one_line_and_resume(reference, tmp_path):
    """Restarts are bounded (issue 14.6): actors killed again and again end the build with a message instead of being
    restarted forever (a build on an exhausted node); the same command then resumes to the same shards."""
    import ray

    from rot_render.pipeline import ENCODER_RESTARTS, STARTS, BuildError

    out = tmp_path / "shards"
    killer = _Killer(times=50, ready=ray.is_initialized, deadline=240)
    killer.start()
    with pytest.raises(BuildError) as error:
        build(_config(out), progress=False)
    killer.stop.set()
    killer.join()
    # the first start and its restarts die; the next start refuses (the killer may catch that one too before it raises,
    # and Ray's one more start refuses at once): bounded, where an unbounded build would lose all 50 kills
    assert ENCODER_RESTARTS + 1 <= len(killer.killed) <= ENCODER_RESTARTS + 3
    assert str(error.value) == (
        f"the encoder actors died {ENCODER_RESTARTS + 1} times in this build (memory? the GPU? see Ray's lines above); "
        f"the finished shards in {out} are kept: fix the cause, then re-run the same command to resume")
    assert not (out / STARTS).exists()
    build(_config(out), progress=False)
    _same_shards(out, reference)
