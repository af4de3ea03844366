"""Training speed at the 4B shape (issue 34): the trainer's defaults against the earlier ones, in the same run.

    python benchmarks/train_speed.py --size 4b --out train_speed.json     # one GPU
    python benchmarks/train_speed.py --size tiny                          # the same runs on this CPU (gloo)

A random Qwen3-VL-4B-shaped checkpoint (multi_gpu.py's), GSM8k rows encoded by its tower, then Stage I and Stage II
through the user's command (``deepspeed --module rot_train stage1|stage2``), each setting for a few optimizer steps:
- ``before``: the earlier defaults, micro-batch 4 x accumulation 4 (global batch 16);
- ``defaults``: today's, global batch 128 with the micro-batch the trainer probes for.
Per run: steady samples/s (from the end of the first step), the model FLOPs per sample the trainer counts
(rot_train.flops), MFU at the steady rate, the micro-batch chosen, peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from multi_gpu import GPU, build, command, free_port, random_checkpoint, read_run, reuse_only_if_made_with

SETTINGS = {"before": ["--global-batch", "16", "--micro-batch", "4"], "defaults": [],
            "checkpointing": ["--gradient-checkpointing"], "no-checkpointing": ["--no-gradient-checkpointing"]}


def train(stage: int, name: str, common: list[str], work: Path, steps: int, timeout: int) -> dict:
    out = work / f"stage{stage}-{name}"
    shutil.rmtree(out, ignore_errors=True)  # a kept run (say, of other --latents) is refused and its figures read as this one's
    args = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
            "--module", "rot_train", f"stage{stage}", *common, *SETTINGS[name], "--max-steps", str(steps), "--out", str(out)]
    result = command(args, work / f"stage{stage}-{name}.log", timeout)
    result.update(read_run(out))
    summary = result.get("summary", {})
    if result.get("steady_samples_per_s") and summary.get("model_tflop_per_sample"):
        result["steady_model_tflops_per_s"] = result["steady_samples_per_s"] * summary["model_tflop_per_sample"]
        if summary.get("peak_bf16_tflops_per_gpu"):
            result["steady_mfu"] = result["steady_model_tflops_per_s"] / summary["peak_bf16_tflops_per_gpu"]
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=["4b", "tiny"], default="4b")
    parser.add_argument("--out", default="train_speed.json")
    parser.add_argument("--work", default="/tmp/rot-train-speed")
    parser.add_argument("--train-rows", type=int, default=1024)
    parser.add_argument("--latents", default="32", help="--max-latents of the runs ('none': uncapped, the official count)")
    parser.add_argument("--steps", default="before=6,defaults=4,checkpointing=4,no-checkpointing=4", help="optimizer steps per setting")
    parser.add_argument("--settings", default="before,defaults")
    parser.add_argument("--stages", default="1,2")
    args = parser.parse_args()
    work = Path(args.work)
    steps = dict(item.split("=") for item in args.steps.split(","))
    results = {"device": torch.cuda.get_device_name() if GPU else "cpu (gloo)", "size": args.size,
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "args": vars(args), "runs": {}}

    def save():
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    reuse_only_if_made_with(work, {"size": args.size, "train_rows": args.train_rows})
    checkpoint = work / "vlm"
    if not (checkpoint / "config.json").exists():
        random_checkpoint(checkpoint, args.size)
    timeout = 300 if args.size == "4b" else 600
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        results["shards"] = build(shards, str(checkpoint), args.train_rows, 512, work, timeout, gpus=1 if GPU else None)
    common = ["--shards", str(shards), "--backbone", str(checkpoint), "--lr", "1e-4", "--warmup-steps", "1", "--epochs", "1"]
    common += [] if args.latents == "none" else ["--max-latents", args.latents]
    common += [] if GPU else ["--head-width", "32"]
    for stage in map(int, args.stages.split(",")):
        for name in args.settings.split(","):
            extra = [] if stage == 1 else ["--init", str(work / f"stage1-{name}" / "export")]
            run = results["runs"][f"stage{stage}_{name}"] = train(stage, name, common + extra, work, int(steps[name]), timeout)
            save()
            if run["returncode"] != 0:  # no figure from a failed run, and no Stage II without its Stage I
                raise SystemExit(f"stage {stage} ({name}) failed: {run['log_tail'].strip()[-400:]} "
                                 f"(log: {work}/stage{stage}-{name}.log)")
    for stage in map(int, args.stages.split(",")):
        runs = [results["runs"].get(f"stage{stage}_{n}", {}).get("steady_samples_per_s") for n in ("before", "defaults")]
        if all(runs):
            results[f"stage{stage}_defaults_vs_before"] = runs[1] / runs[0]
    save()
    for name, run in results["runs"].items():
        summary = run.get("summary", {})
        mfu = run.get("steady_mfu")
        print(f"{name}: {run.get('steady_samples_per_s', 0):.2f} samples/s steady, micro-batch {summary.get('micro_batch')} x "
              f"{summary.get('grad_accum')}, {summary.get('model_tflop_per_sample', 0):.3g} TFLOP/sample"
              + (f", MFU {100 * mfu:.1f}%" if mfu else "") + f", peak {summary.get('peak_gpu_gib') or 0:.1f} GiB")


if __name__ == "__main__":
    main()
