"""Several GPUs (issue 6): the build job on 1, 2, ... GPUs (and 1 GPU with one encoder actor), and Stage I / Stage II with ZeRO-2 and
ZeRO-3 on 2 GPUs against 1 GPU at the same global batch, with checkpoints moved 2 -> 1 and 1 -> 2 GPUs.

    python benchmarks/multi_gpu.py --size 4b --out multi_gpu.json     # on a 2-GPU machine
    python benchmarks/multi_gpu.py --size tiny                         # the same runs on CPU ranks (gloo)

Everything goes through the user's commands (``rot-render build``, ``deepspeed --module rot_train stage1`` /
``stage2``). The 4b size is the Qwen3-VL-4B configuration with random
weights (see gpu_bench.py). JSON is rewritten after every part, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import torch

from gpu_bench import build_rates, operator_stats, qwen3_vl_4b_config
from rot_data.records import load_records
from rot_fixtures.tiny import bpe_tokenizer, save_random_vlm, tiny_vlm_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "packages"  # the project is installed (pip install -e .) or on PYTHONPATH (pipelines/device_env.sh)

GPU = torch.cuda.is_available()


def environment(packages: Path = PACKAGES) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(packages)])),
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    if not GPU:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


STARTED = time.perf_counter()
BUDGET = [float("inf")]  # seconds this script may run; set by --budget


def command(args: list[str], log: Path, timeout: int, gpus: int | None = None, packages: Path = PACKAGES) -> dict:
    """Run ``args`` (on the first ``gpus`` GPUs only, if given) and keep its output in ``log``. ``packages``: the
    project tree it runs (its working directory, which ``python -m`` puts first on the path, and on PYTHONPATH)."""
    started = time.perf_counter()
    left = BUDGET[0] - (started - STARTED)
    if left < 30:
        log.write_text("skipped: --budget spent\n")
        return {"returncode": "skipped: --budget spent"}
    timeout = int(min(timeout, left))
    try:
        env = environment(packages) | ({"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))} if GPU and gpus else {})
        result = subprocess.run(args, cwd=packages, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        code, output = "timeout", (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
    log.write_text(output)
    return {"returncode": code, "seconds": round(time.perf_counter() - started, 1), "log_tail": output[-1200:] if code else ""}


def reuse_only_if_made_with(work: Path, settings: dict) -> None:
    """What a later call on the same machine reuses from ``work`` (the random checkpoint, the training shards, Stage I
    heads to start Stage II from) is kept only if it was made with these ``settings`` (size, rows); otherwise the
    whole folder is emptied: a 4B run must not train on a tiny checkpoint, nor a 1024-row run on 128 rows."""
    record = work / "made-with.json"
    if record.exists() and json.loads(record.read_text()) == settings:
        return
    if work.exists() and any(work.iterdir()) and not record.exists():
        raise SystemExit(f"--work {work} holds files this benchmark did not make: give an empty or new folder")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    record.write_text(json.dumps(settings))


# ---------------------------------------------------------------- the build job on 1, 2, 4 GPUs
def build(out: Path, encoder: str, limit: int | None, shard_size: int, work: Path, timeout: int, dataset: str = "gsm8k",
          gpus: int | None = None, encoders: int | None = None, packages: Path = PACKAGES) -> dict:
    """``rot-render build`` on the first ``gpus`` GPUs (all: None) with ``encoders`` actors (None: the job's default),
    into an emptied ``out``: a folder kept from an earlier run would be resumed or refused, and its files read as this
    run's."""
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, "-m", "rot_render.cli", "build", "--dataset", dataset, "--out", str(out), "--encoder", encoder,
            "--shard-size", str(shard_size)] + (["--limit", str(limit)] if limit else [])
    args += ["--num-encoders", str(encoders)] if encoders else []
    result = command(args, work / f"build-{out.name}.log", timeout, gpus, packages)
    output = (work / f"build-{out.name}.log").read_text()
    result["summary"] = [line.strip() for line in output.splitlines() if line.startswith(("done:", "      "))]  # start-up too
    rates = build_rates(output)
    if rates:
        result["images_per_s_with_startup"], result["images_per_s_steady"] = rates
    if (out / "build-stats.txt").exists():
        result["operators"] = operator_stats((out / "build-stats.txt").read_text())
    return result


def compare_shards(a: Path, b: Path) -> dict:
    """Same ids in the same order, same token counts; embeddings bit-equal or how far apart (bf16). Shard files whose
    checksums in the two manifests agree are the same bytes: only the others are read (8.5 GB took ~1 min a side)."""
    names = sorted(p.name for p in a.glob("shard-*.parquet"))
    same_ids = bool(names) and names == sorted(p.name for p in b.glob("shard-*.parquet"))
    sums = [{s["name"]: s for s in json.loads((side / "manifest.json").read_text())["shards"]} for side in (a, b)]
    identical = {n for n in names if n in sums[0] and n in sums[1] and sums[0][n]["sha256"] == sums[1][n]["sha256"]}
    rows = bit_equal = 0
    largest = 0.0
    for name in names:
        if name in identical:  # the same file: same ids, token counts and embeddings
            rows += sums[0][name]["rows"]
            bit_equal += sums[0][name]["rows"]
            continue
        x, y = (pq.read_table(side / name, columns=["id", "n_tokens", "embedding"]) for side in (a, b))
        same_ids &= x["id"].equals(y["id"]) and x["n_tokens"].equals(y["n_tokens"])
        rows += x.num_rows
        if x["embedding"].equals(y["embedding"]):  # whole shard bit-equal (a C++ comparison of the buffers)
            bit_equal += x.num_rows
            continue
        for ex, ey in zip(x["embedding"].to_pylist(), y["embedding"].to_pylist()):
            bit_equal += ex == ey
            if ex != ey and len(ex) == len(ey):  # (other lengths: other token counts, reported by same_ids)
                fx, fy = (torch.frombuffer(bytearray(e), dtype=torch.bfloat16).float() for e in (ex, ey))
                largest = max(largest, float((fx - fy).abs().max() / fx.abs().max().clamp(min=1e-12)))
    return {"same_ids_order_and_token_counts": bool(same_ids), "rows": rows, "rows_bit_equal": int(bit_equal),
            "largest_difference_relative_to_row_max": largest, "shard_files_identical": len(identical)}


# ---------------------------------------------------------------- training runs
def launch(stage: int, gpus: int, zero: int, out: Path, common: list[str], work: Path, timeout: int, device: int | None = None,
           extra: list[str] = ()) -> dict:
    """One `deepspeed --module rot_train stage<N>` run; ``device`` pins a 1-GPU run to that GPU (two can run side by side).
    A run that does not ``--resume`` starts from an emptied ``out``: the trainer refuses a kept folder, and its
    metrics would be read as this run's."""
    if "--resume" not in extra:
        shutil.rmtree(out, ignore_errors=True)
    micro = (16 if GPU else 4) // gpus  # global batch 32 (GPU) / 8 (CPU) in 2 accumulation steps
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port())]
    launcher += ["--include", f"localhost:{device}"] if GPU and device is not None else ["--num_gpus", str(gpus)]
    args = launcher + ["--module", "rot_train", f"stage{stage}", *common, "--global-batch", str(2 * micro * gpus), "--micro-batch", str(micro),
                       "--zero", str(zero), "--out", str(out), *extra]
    result = command(args, work / f"{out.parent.name}-{out.name}.log", timeout)
    result.update(read_run(out))
    return result


def read_run(out: Path) -> dict:
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
    run = {"losses": {k: [m[k] for m in metrics if k in m] for k in ("loss", "mse", "lm")}}
    run["losses"] = {k: v for k, v in run["losses"].items() if v}
    info = out / "run.json"
    if len(metrics) >= 3 and info.exists():  # steady rate: from the end of the first logged step to the last
        batch = json.loads(info.read_text())["global_batch"]
        start = metrics[0]["step"] - 1  # a resumed run counts its samples from its first step
        # each line holds the mean rate since the loop started: recover the time at every step from it
        times = [(m["step"] - start) * batch / m["samples_per_s"] for m in metrics]
        run["steady_samples_per_s"] = (len(metrics) - 1) * batch / (times[-1] - times[0])
    if (out / "summary.json").exists():
        run["summary"] = json.loads((out / "summary.json").read_text())
    ids = [i for f in sorted(out.glob("ids-rank*.jsonl")) for l in f.read_text().splitlines() for i in json.loads(l)["ids"]]
    run["ids_consumed"], run["ids_distinct"] = len(ids), len(set(ids))
    return run


def differences(a: list[float], b: list[float]) -> list[float] | None:
    """Relative difference at every step between two loss sequences (None if their lengths differ)."""
    if not a or len(a) != len(b):
        return None
    return [abs(x - y) / max(abs(y), 1e-8) for x, y in zip(a, b)]


def close(a: list[float], b: list[float]) -> float | None:
    """Largest relative difference between two loss sequences (None if their lengths differ)."""
    steps = differences(a, b)
    return max(steps) if steps else None


def resume_from(source: Path, target: Path, tag: str) -> None:
    (target / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "checkpoints" / tag, target / "checkpoints" / tag)
    (target / "checkpoints" / "latest").write_text(tag)


def repeated_gsm8k(path: Path, repeat: int) -> Path:
    """GSM8k train ``repeat`` times as a .jsonl: enough work that both actors' steady state dominates the timing."""
    records, _ = load_records("gsm8k", "train")
    with open(path, "w") as file:
        for _ in range(repeat):
            for r in records:
                file.write(json.dumps({"question": r.question, "cot": r.cot, "answer": r.answer}) + "\n")
    return path


def random_checkpoint(folder: Path, size: str) -> None:
    """The benchmarks' Qwen3-VL of the 4B shape (or a tiny one) with random weights and a GSM8k-trained BPE tokenizer."""
    records, _ = load_records("gsm8k", "train")
    tokenizer = bpe_tokenizer([r.question + " " + r.cot for r in records], vocab_size=8000)
    config = qwen3_vl_4b_config() if size == "4b" else tiny_vlm_config("qwen3_vl", hidden_size=64, vocab_size=8192)
    save_random_vlm(folder, config, tokenizer, seed=0, device="cuda" if GPU else "cpu")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["4b", "tiny"], default="4b")
    parser.add_argument("--out", default="multi_gpu.json")
    parser.add_argument("--work", default="/tmp/rot-multi-gpu")
    parser.add_argument("--parts", default="build,stage1,stage2,resume,scaling")
    parser.add_argument("--build-repeat", type=int, default=1, help="the 1 vs 2 actor builds encode GSM8k train this many times")
    parser.add_argument("--build-rows", type=int, default=None, help="only the first N rows in the 1 vs 2 actor builds")
    parser.add_argument("--train-rows", type=int, default=192, help="rows of the training shard set (one epoch)")
    parser.add_argument("--latents", type=int, default=32, help="--max-latents of the training runs")
    parser.add_argument("--zero-stages", default="2,3", help="ZeRO stages of the stage1/stage2/resume parts")
    parser.add_argument("--gpu-counts", default="1,2", help="GPU counts of the stage1/stage2 parts (resume uses what exists)")
    parser.add_argument("--build-gpus", default="1,2", help="GPU counts of the build part (the default encoder actors per GPU); a count given twice is built twice")
    parser.add_argument("--build-one-actor", action="store_true", help="the build part also runs 1 GPU with one encoder actor")
    parser.add_argument("--scaling-gpus", type=int, default=2, help="GPU count of the scaling part, against 1 GPU")
    parser.add_argument("--scaling-stages", default="1,2", help="stages of the scaling part (Stage II alone: a 1-step Stage I "
                                                               "makes its head)")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds for the whole script: a run is stopped when they are spent, later runs skipped")
    args = parser.parse_args()
    BUDGET[0] = args.budget
    work = Path(args.work)
    parts = args.parts.split(",")
    zeros = [int(z) for z in args.zero_stages.split(",")]
    counts = [int(n) for n in args.gpu_counts.split(",")]
    build_gpus = [int(n) for n in args.build_gpus.split(",")]
    results = {"device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if GPU else "cpu (gloo ranks)",
               "size": args.size, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "args": vars(args)}

    def save():
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    reuse_only_if_made_with(work, {"size": args.size, "train_rows": args.train_rows})
    checkpoint = work / "vlm"
    if not (checkpoint / "config.json").exists():
        started = time.perf_counter()
        random_checkpoint(checkpoint, args.size)
        results["checkpoint_seconds"] = round(time.perf_counter() - started, 1)
    timeout = 300 if args.size == "4b" else 600
    pool = ThreadPoolExecutor(2)

    def side_by_side(*jobs):  # two 1-GPU runs at once, one on each GPU
        return [f.result() for f in [pool.submit(*job) for job in jobs]]

    train = results.setdefault("train", {})

    def record(name, result):
        train[name] = result
        save()

    def stage_runs(stage, runs, extra=()):  # the 1-GPU runs side by side (one per GPU), then the 2-GPU runs
        if 1 in counts:  # a 1-GPU run an earlier part made (noise) is not run again into the same folder
            todo = [z for z in zeros if f"stage{stage}_zero{z}_1gpu" not in train]
            jobs = [(launch, stage, 1, z, runs[z] / "one", common + list(extra), work, timeout, i) for i, z in enumerate(todo)]
            for z, result in zip(todo, side_by_side(*jobs)):
                record(f"stage{stage}_zero{z}_1gpu", result)
        if 2 in counts:
            for z in zeros:
                record(f"stage{stage}_zero{z}_2gpu", launch(stage, 2, z, runs[z] / "two", common + list(extra), work, timeout))

    shards = work / "shards-train"
    steps = args.train_rows // 32 if GPU else args.train_rows // 8  # one epoch at global batch 32 (GPU) / 8 (CPU)
    half = f"step{steps // 2}"
    common = ["--shards", str(shards), "--backbone", str(checkpoint), "--epochs", "1", "--lr", "1e-3", "--warmup-steps", "1",
              "--save-every", str(steps // 2), "--log-ids", "--max-latents", str(args.latents)]
    common += [] if GPU else ["--head-width", "32"]
    s1 = {z: work / f"s1-z{z}" for z in (2, 3)}
    s2 = {z: work / f"s2-z{z}" for z in (2, 3)}
    init = ["--init", str(s1[2] / "one" / "export")]  # every Stage II run starts from the same head
    # "prepare": only the checkpoint and the training shards (a later call of the script on the same machine uses them)
    if any(part in parts for part in ("stage1", "stage2", "scaling", "prepare")) and not (shards / "manifest.json").exists():
        results["train_shards"] = build(shards, str(checkpoint), args.train_rows, args.train_rows // 2, work, timeout, gpus=1)

    for part in parts:
        if part == "build":  # GSM8k train (x --build-repeat): 1 GPU with one encoder actor, then the default (three per GPU)
            # on 1, 2, ... GPUs (--build-gpus); every shard set compared with the first
            source = str(repeated_gsm8k(work / "gsm8k-repeated.jsonl", args.build_repeat)) if args.build_repeat > 1 else "gsm8k"
            runs = {"1gpu_1actor": (1, 1)} if args.build_one_actor else {}
            for n in build_gpus:  # a count given again is run again: "4gpu", "4gpu_run2", ...
                again = sum(1 for m, encoders in runs.values() if m == n and encoders is None)
                runs[f"{n}gpu" + (f"_run{again + 1}" if again else "")] = (n, None)
            built = results["build"] = {"dataset": source}
            for name, (n, encoders) in runs.items():
                built[name] = build(work / f"shards-{name}", str(checkpoint), args.build_rows, 1024, work, timeout, source, n, encoders)
                reference = next(work / f"shards-{r}" for r in ("1gpu_1actor", "1gpu", name) if (work / f"shards-{r}").exists())
                if reference.name != f"shards-{name}":  # same rows, same bits, whatever the number of actors and GPUs
                    built[name][f"same_contents_as_{reference.name}"] = compare_shards(reference, work / f"shards-{name}")
                save()
            first = built.get("1gpu_1actor", {}).get("images_per_s_steady")
            for name in runs:
                if first and built[name].get("images_per_s_steady"):
                    built[name]["steady_vs_1gpu_1actor"] = built[name]["images_per_s_steady"] / first
            one = built.get("1gpu", {}).get("images_per_s_steady")
            for name, (_, encoders) in runs.items():
                if one and encoders is None and built[name].get("images_per_s_steady"):
                    built[name]["steady_vs_1gpu"] = built[name]["images_per_s_steady"] / one
            save()
        elif part == "noise":  # the noise of batch shapes alone: 1 GPU, the same global batch in micro-batches of the 2-GPU size
            halved = ["--micro-batch", "8" if GPU else "2"]  # the same global batch in 4 accumulation steps
            jobs = [(launch, 1, 1, 2, s1[2] / "one", common, work, timeout, 0),
                    (launch, 1, 1, 2, s1[2] / "one-halved", common, work, timeout, 1, halved)]
            for name, result in zip(("stage1_zero2_1gpu", "stage1_zero2_1gpu_halved_micro_batch"), side_by_side(*jobs)):
                record(name, result)
        elif part == "stage1":  # 1 GPU vs 2 GPUs, same global batch
            stage_runs(1, s1)
        elif part == "stage2":
            if not (s1[2] / "one" / "export" / "rot_config.json").exists():  # a head to start from
                record("stage1_for_init", launch(1, 1, 2, s1[2] / "one", common + ["--max-steps", "1"], work, timeout))
            stage_runs(2, s2, init)
        elif part == "resume":  # Stage II checkpoints from the middle of the epoch: 2 -> 1 GPU, then 1 -> 2
            ready = [z for z in zeros if (s2[z] / "two" / "checkpoints" / half).exists()]
            for z in ready:
                resume_from(s2[z] / "two", s2[z] / "two-to-one", half)
            for z, r in zip(ready, side_by_side(*[(launch, 2, 1, z, s2[z] / "two-to-one", common + init, work, timeout, i,
                                                    ["--resume"]) for i, z in enumerate(ready)])):
                record(f"stage2_zero{z}_resume_2to1", r)
            for z in zeros:
                if (s2[z] / "one" / "checkpoints" / half).exists():
                    resume_from(s2[z] / "one", s2[z] / "one-to-two", half)
                    record(f"stage2_zero{z}_resume_1to2", launch(2, 2, z, s2[z] / "one-to-two", common + init, work, timeout,
                                                                extra=["--resume"]))
        elif part == "scaling":  # the same micro-batch per GPU on N GPUs (N times the global batch), ZeRO-2, Stages I and II
            micro = ["--micro-batch", "16" if GPU else "4"]
            common = common + ["--save-every", "1000000"]  # no mid-run checkpoint inside the timed steps
            n, stages = args.scaling_gpus, args.scaling_stages.split(",")
            # each run alone on the machine: 1-GPU runs side by side share the host, which slows them
            if "1" in stages:
                record("stage1_zero2_1gpu_alone", launch(1, 1, 2, s1[2] / "one-alone", common, work, timeout))
                record(f"stage1_zero2_{n}gpu_same_micro_batch", launch(1, n, 2, s1[2] / f"n{n}-same-micro", common, work,
                                                                       timeout, extra=micro))
            elif not (s1[2] / "one-alone" / "export" / "rot_config.json").exists():
                record("stage1_for_init", launch(1, 1, 2, s1[2] / "one-alone", common + ["--max-steps", "1"], work, timeout))
            if "2" not in stages:
                continue
            alone_init = ["--init", str(s1[2] / "one-alone" / "export")]
            record("stage2_zero2_1gpu_alone", launch(2, 1, 2, s2[2] / "one-alone", common + alone_init, work, timeout))
            record(f"stage2_zero2_{n}gpu_same_micro_batch", launch(2, n, 2, s2[2] / f"n{n}-same-micro", common + alone_init,
                                                                   work, timeout, extra=micro))
    results["checks"] = checks(train, args.train_rows, steps)
    save()
    print(json.dumps(results["checks"], indent=2))
    print(json.dumps({k: {x: y for x, y in v.items() if "images_per_s" in x or x == "returncode"} if isinstance(v, dict) else v
                      for k, v in results.get("build", {}).items()}, indent=2))


def checks(train: dict, rows: int, steps: int) -> dict:
    """2 GPUs vs 1 (losses, ids, speed), resumed vs uninterrupted, and the noise between two 1-GPU runs."""
    found = {}

    def losses(name):
        return train.get(name, {}).get("losses", {}).get("loss", [])

    for stage in (1, 2):
        for z in (2, 3):
            one, two = train.get(f"stage{stage}_zero{z}_1gpu", {}), train.get(f"stage{stage}_zero{z}_2gpu", {})
            if not two:
                continue
            found[f"stage{stage}_zero{z}_2gpu_vs_1gpu_loss"] = close(losses(f"stage{stage}_zero{z}_2gpu"), losses(f"stage{stage}_zero{z}_1gpu"))
            found[f"stage{stage}_zero{z}_2gpu_vs_1gpu_loss_per_step"] = differences(losses(f"stage{stage}_zero{z}_2gpu"), losses(f"stage{stage}_zero{z}_1gpu"))
            found[f"stage{stage}_zero{z}_2gpu_ids_once"] = two.get("ids_consumed") == two.get("ids_distinct") == rows
            if one.get("steady_samples_per_s") and two.get("steady_samples_per_s"):
                found[f"stage{stage}_zero{z}_2gpu_vs_1gpu_samples_per_s"] = two["steady_samples_per_s"] / one["steady_samples_per_s"]
        # bf16 noise floor: two 1-GPU runs on the same batches that differ only in how DeepSpeed reduces (ZeRO-2 vs 3)
        if losses(f"stage{stage}_zero2_1gpu") and losses(f"stage{stage}_zero3_1gpu"):
            found[f"stage{stage}_noise_zero3_vs_zero2_1gpu_loss"] = close(losses(f"stage{stage}_zero3_1gpu"), losses(f"stage{stage}_zero2_1gpu"))
    # the same weights at step 1 and the same global batch, only split into smaller micro-batches (as on 2 GPUs)
    if losses("stage1_zero2_1gpu_halved_micro_batch"):
        found["stage1_noise_halved_micro_batch_vs_1gpu_loss_per_step"] = differences(
            losses("stage1_zero2_1gpu_halved_micro_batch"), losses("stage1_zero2_1gpu"))
    for z in (2, 3):
        for direction, source in (("2to1", "2gpu"), ("1to2", "1gpu")):
            if f"stage2_zero{z}_resume_{direction}" in train:
                found[f"stage2_zero{z}_resume_{direction}_vs_uninterrupted"] = close(
                    losses(f"stage2_zero{z}_resume_{direction}"), losses(f"stage2_zero{z}_{source}")[steps // 2:])
    for stage in (1, 2):
        one = train.get(f"stage{stage}_zero2_1gpu_alone", {})
        for name in [n for n in train if n.startswith(f"stage{stage}_zero2_") and n.endswith(("gpu", "same_micro_batch"))]:
            if "1gpu" not in name and train[name].get("steady_samples_per_s") and one.get("steady_samples_per_s"):
                found[f"{name}_vs_1gpu_alone_samples_per_s"] = train[name]["steady_samples_per_s"] / one["steady_samples_per_s"]
    return found


if __name__ == "__main__":
    main()
