"""Where a pretraining step of the anchor spends its time (GPU): data loading alone, then a profiled step.

python benchmarks/anchor_step_profile.py --data-dir ../shared/data
"""

from __future__ import annotations

import time

import torch
import typer

from rot_vision import read
from rot_anchor.model import build_anchor
from rot_data.tokens import IMAGE_PAD
from rot_anchor.pretrain import StepBatches, micro_batch_loss, _one_thread
from rot_anchor.tasks import PretrainData


def main(data_dir: str = typer.Option(..., help="the shared data folder"), workers: int = typer.Option(12),
         steps: int = typer.Option(8)) -> None:
    model, tokenizer = build_anchor("anchor")
    read.prepare_tower(model)
    device = torch.device("cuda")
    model.to(device).train()
    data = PretrainData(tokenizer, data_dir, 0)
    loader = torch.utils.data.DataLoader(StepBatches(data, 1000), batch_size=None, num_workers=workers,
                                         prefetch_factor=4, worker_init_fn=_one_thread)
    iterator = iter(loader)
    next(iterator)
    started = time.perf_counter()
    batches = [next(iterator) for _ in range(30)]
    print(f"data loader alone: {30 / (time.perf_counter() - started):.1f} steps/s with {workers} workers")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def step(micro_batches):
        for micro_batch in micro_batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _, _ = micro_batch_loss(model, micro_batch, image_token, device)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for micro_batches in batches[:5]:
        step(micro_batches)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for micro_batches in batches[5:5 + steps]:
        step(micro_batches)
    torch.cuda.synchronize()
    print(f"GPU steps alone (batches in memory): {steps / (time.perf_counter() - started):.2f} steps/s")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for micro_batches in batches[5 + steps:5 + steps + 3]:
            step(micro_batches)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=45))
    print(averages.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=45))


if __name__ == "__main__":
    typer.run(main)
