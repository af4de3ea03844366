"""Where a Stage I / Stage II step of the RoT trainer spends its time (GPU), part by part.

Batches come from real shards through the trainer's own loader and collator, the model from the trainer's own
``build_model`` with the trainer's defaults (LoRA in Stage II, head width 2048) unless told otherwise; the steps run in
plain torch (no DeepSpeed, no launcher) so each part can be timed alone, the GPU drained around it:
- the rollout (no grad: prefill + one decode step per latent, the trainer's engine with its CUDA graphs),
- the forward of the rest of the step (head, the teacher-forced pass(es), the losses),
- the backward, the optimizer step;
for each setting (activation checkpointing on/off, micro-batch, latents capped at ``--max-latents`` or uncapped),
and for each backbone attention and packing setting given (``--attention rot_sdpa --attention sdpa``, ``--packing on
--packing off``: every pair takes its turn on every batch; sdpa runs padded only, packing needs rot_sdpa),
with the model FLOPs the trainer counts (``rot_train.flops``) as MFU, the padding of the teacher-forced pass, peak
memory, and one profiled step (the kernels that take the GPU's time, by family).

    python benchmarks/rot_step_profile.py --shards S --backbone B --init <stage1 export> --micro-batch 128 --out p.json
    python benchmarks/rot_step_profile.py --shards S --backbone anchor --head-width 512 --full-finetune   # the miniature
    python benchmarks/rot_step_profile.py ... --checkpointing on --packing on --packing off   # packed vs padded passes
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import typer

from rot_train import flops
from rot_data.tokens import IMG_BEGIN, IMG_END
from rot_data.transformers_compat import checkpoint_activations, stop_checkpointing_activations
from rot_model.batches import RoTCollator
from rot_model.shard_stream import ShardSet, ShardStream
from rot_model.attention import NAME as ATTENTION
from rot_model.decoding import Engines
from rot_train.train import TrainConfig, build_model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock(fn):
    """(result, seconds) of ``fn()``, the GPU drained before and after."""
    sync()
    started = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - started


def kernel_families(averages) -> dict:
    """GPU milliseconds of one profiled step by kernel family (matrix products, attention, the rest)."""
    families = {"matmul": ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas"), "attention": ("fmha", "flash", "attention"),
                "copy/cat/index": ("copy", "cat", "index", "gather", "scatter"), "norm/elementwise": ("elementwise", "reduce", "norm")}
    totals = {name: 0.0 for name in (*families, "other")}
    for event in averages:
        if event.device_type != torch.autograd.DeviceType.CUDA or not event.self_device_time_total:
            continue
        key = event.key.lower()
        family = next((name for name, words in families.items() if any(w in key for w in words)), "other")
        totals[family] += event.self_device_time_total / 1e3
    return {k: round(v, 1) for k, v in totals.items()}


def timed_step(model, optimizer, batch: dict, options: dict) -> tuple[float, ...]:
    """Seconds of one training step's parts: rollout, forward, backward, optimizer (the GPU drained around each)."""
    slots = batch["targets"].shape[1]
    hidden, t_roll = clock(lambda: model.rollout_hidden(batch["prefix_ids"], batch["prefix_mask"], slots))
    losses, t_fwd = clock(lambda: model(batch, hidden_roll=hidden, **options))
    _, t_bwd = clock(lambda: losses["loss"].backward())
    _, t_opt = clock(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    return t_roll, t_fwd, t_bwd, t_opt


def profiled_step(model, optimizer, batch: dict, options: dict) -> dict:
    """One whole step under torch's profiler: wall and GPU-busy time, kernel count, GPU time by kernel family."""
    from torch.profiler import ProfilerActivity, profile

    def whole_step():
        losses = model(batch, **options)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _, wall = clock(whole_step)
    averages = prof.key_averages()
    cuda = [a for a in averages if a.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(a.self_device_time_total for a in cuda) / 1e3
    result = {"wall_ms": round(wall * 1e3, 1), "gpu_busy_ms": round(busy, 1), "kernels": sum(a.count for a in cuda),
              "by_family_ms": kernel_families(averages)}
    print(f"  profiled step: wall {wall * 1e3:.0f} ms, GPU busy {busy:.0f} ms; by kernel family (ms): {result['by_family_ms']}")
    print(averages.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    return result


def main(shards: str = typer.Option(...), backbone: str = typer.Option("anchor"),
         init: str = typer.Option(None, help="a Stage I export, for Stage II"),
         micro_batch: list[int] = typer.Option([128], help="micro-batches to time (repeat the option)"),
         max_latents: list[int] = typer.Option([32], help="latent caps to time; 0: uncapped (repeat the option)"),
         checkpointing: list[str] = typer.Option(["on", "off"], help="activation checkpointing settings to time"),
         attention: list[str] = typer.Option([ATTENTION], help=f"the backbone's attention: {ATTENTION} (the trainer's: decode "
                                             "steps read the grouped KV cache in place), sdpa (transformers' own); several take "
                                             "turns on every batch"),
         packing: list[str] = typer.Option(["off"], help="the teacher-forced passes packed (on) or padded (off); several "
                                           "take turns on every batch"),
         head_width: int = typer.Option(2048), full_finetune: bool = typer.Option(False),
         stages: str = typer.Option("1,2"), repeats: int = typer.Option(3), profile_step: bool = typer.Option(True),
         out: str = typer.Option("rot_step_profile.json")) -> None:
    if set(packing) - {"on", "off"}:
        raise typer.BadParameter(f"--packing {' '.join(packing)}: give on and/or off")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: only to check the script runs
    gpu = device.type == "cuda"
    shard_set = ShardSet.open(shards)
    results = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "runs": []}
    peak_name, peak = flops.peak_tflops(device)
    for stage in map(int, stages.split(",")):
        if stage == 2 and not init:
            print("stage 2 skipped: give --init <a Stage I export>")
            continue
        cfg = TrainConfig(stage=stage, shards=shards, backbone=backbone, out="/tmp/unused", init=init,
                          head_width=head_width, full_finetune=full_finetune, gradient_checkpointing=True)
        model, tokenizer, token_ids = build_model(cfg, device, torch.bfloat16, shard_set)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=gpu)
        counter = flops.Counter(model, cfg)
        base = model.lm.get_base_model() if hasattr(model.lm, "get_base_model") else model.lm
        options = {"stage": stage, "vision_weight": cfg.vision_weight, "lm_weight": cfg.lm_weight}
        for cap in max_latents:
            collate = RoTCollator(tokenizer, token_ids[IMG_BEGIN], token_ids[IMG_END], cap or None)
            for size in micro_batch:
                stream = ShardStream(shard_set, collate, size, by_length=False)  # batches of mixed lengths, as always measured
                loaded = time.perf_counter()
                batches = [b for _, b in zip(range(repeats + 1), stream)]
                loader_rate = len(batches) * size / (time.perf_counter() - loaded)
                batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
                batch = batches[1]
                model_tflop = sum(counter.of_batch(b, None) for b in batches[1:]) / len(batches[1:]) / 1e12
                real = int(batch["prefix_mask"].sum() + batch["n_latents"].sum() + batch["suffix_mask"].sum())
                padded = batch["prefix_ids"].numel() + batch["targets"].shape[:2].numel() + batch["suffix_ids"].numel()
                for setting in checkpointing:
                    (checkpoint_activations if setting == "on" else stop_checkpointing_activations)(base)
                    where = f"stage {stage}, micro-batch {size}, latents {cap or 'uncapped'}, checkpointing {setting}"
                    # the settings take turns on every batch, each attention with its own engines (its captured steps
                    # stay its own): a difference between them is not the order they ran in
                    engines = {name: Engines(graphs=gpu) for name in attention}  # graphs: the trainer's rollout (ZeRO-2)
                    settings = [(name, packed) for name in attention for packed in packing if packed == "off" or name == ATTENTION]
                    times = {each: [] for each in settings}
                    peaks = dict.fromkeys(settings, 0)
                    try:
                        for index, each in enumerate(batches):  # the first is a warm-up (captures, allocations)
                            for name, packed in settings:
                                base.config._attn_implementation = name  # read by every layer at each call
                                model.engines, model.packing = engines[name], packed == "on"
                                torch.cuda.reset_peak_memory_stats() if gpu else None
                                seconds = timed_step(model, optimizer, each, options)
                                peaks[name, packed] = max(peaks[name, packed], torch.cuda.max_memory_allocated() if gpu else 0)
                                times[name, packed] += [seconds] if index else []
                    except torch.OutOfMemoryError:
                        optimizer.zero_grad(set_to_none=True)
                        torch.cuda.empty_cache()
                        print(f"{where}: out of GPU memory")
                        results["runs"].append({"name": where, "out_of_memory": True})
                        continue
                    for name, packed in settings:
                        median = {part: statistics.median(t[i] for t in times[name, packed])
                                  for i, part in enumerate(("rollout", "forward", "backward", "optimizer"))}
                        step = sum(median.values())
                        run = {"name": f"{where}, attention {name}, packing {packed}", "stage": stage, "micro_batch": size,
                               "max_latents": cap or None, "checkpointing": setting, "attention": name, "packing": packed,
                               "seconds": {k: round(v, 4) for k, v in median.items()}, "step_s": round(step, 4),
                               "samples_per_s": round(size / step, 2), "model_tflop_per_step": round(model_tflop, 2),
                               "mfu": model_tflop / step / peak if peak else None, "latent_slots": batch["targets"].shape[1],
                               "question_columns": batch["prefix_ids"].shape[1], "tokens_real_of_padded": [real, padded],
                               "loader_samples_per_s": round(loader_rate, 1), "peak_gib": peaks[name, packed] / 2**30 if gpu else None}
                        results["runs"].append(run)
                        print(f"{run['name']}: step {step * 1e3:.0f} ms = {run['samples_per_s']} samples/s, "
                              + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in median.items())
                              + (f"; MFU {100 * run['mfu']:.1f}% of the {peak_name}'s {peak:g}" if peak else "")
                              + f"; real tokens {real} of {padded} in the passes' columns; peak {run['peak_gib'] or 0:.1f} GiB"
                              + f"; loader {loader_rate:.0f} samples/s")
                        if profile_step and gpu and setting == checkpointing[0] and size == micro_batch[0] and (name, packed) == settings[0]:
                            base.config._attn_implementation, model.engines, model.packing = name, engines[name], packed == "on"
                            run["profiled"] = profiled_step(model, optimizer, batch, options)
                    with open(out, "w") as handle:
                        json.dump(results, handle, indent=2)
                del batches
        model = optimizer = None  # free the stage's model before the next one loads
        torch.cuda.empty_cache() if gpu else None


if __name__ == "__main__":
    typer.run(main)
