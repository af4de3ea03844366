"""How the global batch is split: samples per GPU per micro step (the micro-batch) times accumulation steps.

The global batch is what the optimizer sees and stays the same on any number of GPUs. The micro-batch only decides
speed: the rollout is one decode step per latent for the whole micro-batch, so small micro-batches accumulated pay
it again and again (on one H200 at the 4B shape, 16 x 1 ran twice as fast as 4 x 4). So by default the trainer takes
the largest micro-batch whose step fits the GPU's memory on the longest rows of the shards, found by trying it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MEMORY_MARGIN = 0.10  # of the GPU's memory, left free for what a probe step does not allocate (CUDA graphs, fragments)
OPTIMIZER_BYTES = 16  # per trainable parameter, split over the ranks: fp32 master copy, Adam's two moments, fp32 gradient


@dataclass
class BatchPlan:
    micro_batch: int
    grad_accum: int
    world_size: int
    chosen_by: str  # how: "given" (--micro-batch), the probe's finding (a GPU), "no accumulation on a CPU"
    checkpointing: str = "given"  # activation checkpointing: "given" (--[no-]gradient-checkpointing) or on/off and why

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def describe(self) -> str:
        return (f"micro-batch {self.micro_batch} x accumulation {self.grad_accum} x {self.world_size} "
                f"rank{'s' if self.world_size > 1 else ''} = global batch {self.global_batch} ({self.chosen_by}); "
                f"activation checkpointing {self.checkpointing}")


def per_rank(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ValueError(f"--global-batch {global_batch} does not split over {world_size} ranks: use a multiple of {world_size}")
    return global_batch // world_size


def divisors(n: int) -> list[int]:
    """Every micro-batch that splits ``n`` samples evenly, largest first."""
    return [d for d in range(n, 0, -1) if n % d == 0]


def given(global_batch: int, world_size: int, micro_batch: int) -> BatchPlan:
    samples = per_rank(global_batch, world_size)
    if samples % micro_batch:
        raise ValueError(f"--micro-batch {micro_batch} does not divide the {samples} samples per rank of --global-batch "
                         f"{global_batch} on {world_size} rank(s): use one of {', '.join(map(str, divisors(samples)[:8]))}")
    return BatchPlan(micro_batch, samples // micro_batch, world_size, "given")


def worst_case_row(shard_set) -> tuple[dict, int]:
    """A row as long as the longest the shards hold in each part (question, CoT, answer, visual tokens): the
    micro-batch that fits it fits every batch of the run. Reads the text columns only. Its visual tokens are not capped
    here: the collator merges and caps them as it does every training row (``--merge-latents``, then ``--max-latents``)."""
    longest = {"question": "", "cot": "", "answer": ""}
    tokens = 1
    for index in range(len(shard_set.manifest["shards"])):
        for row in shard_set.read_rows(index, with_embeddings=False):
            tokens = max(tokens, row["n_tokens"])
            for key in longest:
                if len(row[key]) > len(longest[key]):
                    longest[key] = row[key]
    return {"id": "memory-probe", **longest, "n_tokens": tokens}, tokens


def worst_case_batch(collate, worst: tuple[dict, int], dim: int, micro: int) -> dict:
    """``micro`` copies of the worst-case row (``worst_case_row``), collated as training collates its rows (latents
    merged by ``--merge-latents``, then capped by ``--max-latents``): the longest batch training will see."""
    row, tokens = worst
    batch = collate([row] * micro, [torch.zeros(tokens, dim)] * micro)
    batch["weights"] = torch.ones(micro)
    return batch


def fits(step, batch: dict, ballast_bytes: int, device: torch.device) -> bool:
    """Whether one forward and backward of ``batch`` fits beside ``ballast_bytes`` held for the optimizer state."""
    ballast = None
    try:
        ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device=device)
        step(batch)
        torch.cuda.synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del ballast
        torch.cuda.empty_cache()


def probe(model, collate, shard_set, global_batch: int, world_size: int, device: torch.device, forward_kwargs: dict,
          only: int | None = None) -> BatchPlan | None:
    """The largest micro-batch (a divisor of the per-rank samples) whose step on the worst-case row fits; the model
    is left as it was (gradients dropped, random state restored). ``only``: try that micro-batch alone (None if it
    does not fit)."""
    samples = per_rank(global_batch, world_size)
    worst = worst_case_row(shard_set)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = torch.cuda.get_device_properties(device).total_memory
    ballast = int(trainable * OPTIMIZER_BYTES / world_size + MEMORY_MARGIN * total)

    def step(batch):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        try:
            model(batch, **forward_kwargs)["loss"].backward()
        finally:
            model.zero_grad(set_to_none=True)

    rng = torch.get_rng_state(), torch.cuda.get_rng_state(device)
    try:
        for micro in [only] if only else divisors(samples):
            batch = worst_case_batch(collate, worst, shard_set.dim, micro)
            if fits(step, batch, ballast, device):
                return BatchPlan(micro, samples // micro, world_size, f"the largest that fits the GPU's memory on the "
                                 f"longest rows: {batch['targets'].shape[1]} latents, probed")
    finally:
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state(rng[1], device)
        torch.cuda.reset_peak_memory_stats(device)
    if only:
        return None
    raise ValueError(f"not even a micro-batch of 1 fits this GPU's memory beside the optimizer state of {trainable:,} "
                     "trainable parameters: use ZeRO-3 (--zero 3), more GPUs, LoRA, or --max-latents")
