"""Where a Stage I / Stage II step of the RoT trainer spends its time (GPU), at the anchor's size (issue 13.6).

Batches come from real shards through the trainer's own loader, the model from the trainer's own ``build_model``;
the steps run in plain torch (no DeepSpeed) so each part can be timed alone: the loader, the no-grad rollout
(eager with a KV cache, and replayed as a CUDA graph), the whole step, then a profiled step (ATen operations).

python benchmarks/rot_step_profile.py --shards shards/ --backbone anchor --micro-batch 256
"""

from __future__ import annotations

import time

import torch
import typer

from rot_train.batches import RoTCollator
from rot_train.backbone import IMG_BEGIN, IMG_END
from rot_train.shard_stream import ShardSet, ShardStream
from rot_train.train import TrainConfig, build_model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Seconds per call, the GPU drained before and after."""
    fn()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - started) / repeats


def main(shards: str = typer.Option(...), backbone: str = typer.Option("anchor"), micro_batch: int = typer.Option(256),
         repeats: int = typer.Option(5), init: str = typer.Option(None, help="a Stage I export, for the Stage II rows")) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: only to check the script runs
    shard_set = ShardSet.open(shards)
    started = time.perf_counter()
    for stage in (1, 2):
        if stage == 2 and not init:
            break
        cfg = TrainConfig(stage=stage, shards=shards, backbone=backbone, out="/tmp/unused", init=init,
                          micro_batch=micro_batch, head_width=512, full_finetune=True)
        model, tokenizer, token_ids = build_model(cfg, device, torch.bfloat16, shard_set)
        model.train()
        if stage == 1:
            stream = ShardStream(shard_set, RoTCollator(tokenizer, token_ids[IMG_BEGIN], token_ids[IMG_END]), micro_batch)
            started = time.perf_counter()
            cpu_batches = [batch for _, batch in zip(range(4), stream)]
            print(f"loader, one process: {4 * micro_batch / (time.perf_counter() - started):.0f} samples/s")
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cpu_batches[0].items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda")

        def step():
            losses = model(batch, stage=stage, vision_weight=cfg.vision_weight, lm_weight=cfg.lm_weight)
            losses["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        slots = batch["targets"].shape[1]

        def rollout():
            return model.rollout_hidden(batch["prefix_ids"], batch["prefix_mask"], slots)

        for graphs in (False, True) if device.type == "cuda" else (False,):
            model.use_cuda_graphs = graphs
            if graphs:
                started = time.perf_counter()
                rollout()  # a new shape rolls out on the decoding engine; the same shape again is captured whole
                graphed = rollout()
                sync()
                model.use_cuda_graphs = False
                difference = (graphed.float() - rollout().float()).abs().max().item()
                model.use_cuda_graphs = True
                print(f"stage {stage}: CUDA-graph capture {time.perf_counter() - started:.2f} s; largest difference "
                      f"from the eager rollout {difference:.3g} (bf16 hidden states)")
            name = "CUDA graph" if graphs else "eager, KV cache"
            print(f"stage {stage}, micro-batch {micro_batch}, {slots} latents, rollout {name}: {timed(rollout, repeats) * 1e3:.1f} ms; "
                  f"step {(whole := timed(step, repeats)) * 1e3:.1f} ms = {micro_batch / whole:.0f} samples/s (gradient checkpointing on)")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync()
        averages = prof.key_averages()
        print(f"stage {stage}: {sum(a.count for a in averages if a.key.startswith('aten::'))} ATen operations per step; "
              f"GPU busy {sum(a.self_device_time_total for a in averages) / 1e3:.1f} ms")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
        print(averages.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50))


if __name__ == "__main__":
    typer.run(main)
