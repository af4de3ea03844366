"""Pretrain the anchor VLM from scratch: tower and language model together, on the mixture of ``tasks.py``.

Read it top to bottom: build the model -> (resume) -> for each step, the step's batches (a pure function
of seed and step, made by DataLoader workers) -> tower on the packed images -> visual tokens scattered into
the placeholders -> language model with 1-D positions (RoT's layout) -> cross-entropy on the answer part
-> AdamW step -> log, checkpoint -> export a Hugging Face checkpoint folder (bf16 safetensors).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rot_data import registry
from rot_vision import read
from rot_vision.tower import QWEN3_VL_PATCHIFIER
from rot_anchor.model import SIZES, build_anchor
from rot_anchor.tasks import TASKS, Mixture, PretrainData
from rot_data.ranges import refuse_out_of_range
from rot_data.tokens import IMAGE_PAD


@dataclass
class PretrainConfig:
    out: str
    data_dir: str | None = None  # another copy of the shipped data folder (the valid/test files to exclude)
    size: str = "anchor"
    steps: int = 4000
    batch: int = 256  # arithmetic samples per step
    text_batch: int = 128  # text-reading samples per step (English, equations, printable strings)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.05
    clip: float = 1.0
    seed: int = 0
    workers: int = 8
    log_every: int = 25
    save_every: int = 500
    init: str | None = None  # start from this checkpoint folder's weights (a fresh optimizer), e.g. to continue a run
    task_weights: dict | None = None  # task weights to change, in either group (default: Mixture's)
    train_seconds: float | None = None  # schedule by the clock: the cosine runs over this many seconds of training
    # (``steps`` is then only an upper bound; the steps reached are logged). Made for fixed-length GPU sessions.

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"--size {self.size}: use {' or '.join(SIZES)}")
        refuse_out_of_range(self, ("steps", "batch", "log_every", "save_every"),
                            ("text_batch", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "clip", "seed", "workers"))
        if self.train_seconds is not None and self.train_seconds <= 0:
            raise ValueError(f"--train-seconds {self.train_seconds:g}: use a number of seconds > 0 (leave it out to schedule by --steps)")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is a file; give a folder for the run")


def progress(cfg: PretrainConfig, step: int, seconds: float) -> float:
    """How far through the schedule (0..1): by steps, or by the clock with ``train_seconds``."""
    by_steps = step / cfg.steps
    return max(by_steps, seconds / cfg.train_seconds) if cfg.train_seconds else by_steps


def learning_rate(cfg: PretrainConfig, step: int, done: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` of the peak at ``done`` = 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = cfg.warmup_steps / cfg.steps if not cfg.train_seconds else 0.0
    decay = min(1.0, max(0.0, (done - start) / (1 - start)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * decay)))


class StepBatches(torch.utils.data.Dataset):
    """Index = optimizer step; item = that step's micro-batches."""

    def __init__(self, data: PretrainData, steps: int):
        self.data, self.steps = data, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, step: int):
        return self.data.batch(step)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers render with PIL; torch threads in 12 processes would oversubscribe the cores


def micro_batch_loss(model, group: dict, image_token: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the weighted sum of cross-entropy over the answer tokens, summed loss per task, tokens per task)."""
    ids = group["ids"].to(device, non_blocking=True)
    language_model = model.model.language_model
    inputs = language_model.embed_tokens(ids)
    if len(group["grids"]):
        visual = read.embed_lines(model, group["patches"].to(device, non_blocking=True), group["grids"])
        inputs = inputs.masked_scatter((ids == image_token)[..., None], visual.to(inputs.dtype))
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)  # right padding: no mask needed (causal)
    hidden = language_model(inputs_embeds=inputs, position_ids=positions, use_cache=False).last_hidden_state
    rows, columns = group["loss_mask"][:, 1:].to(device, non_blocking=True).nonzero(as_tuple=True)  # answer tokens only
    per_token = F.cross_entropy(model.lm_head(hidden[rows, columns]).float(), ids[rows, columns + 1], reduction="none")
    task = group["task"].to(device)[rows]
    task_sum = torch.zeros(len(TASKS), device=device).index_add_(0, task, per_token.detach())
    task_tokens = torch.zeros(len(TASKS), device=device).index_add_(0, task, torch.ones_like(per_token))
    weights = group["token_weight"].to(device, non_blocking=True)[rows, columns + 1]
    return (weights * per_token).sum(), task_sum, task_tokens


def save_state(path: Path, model, optimizer, step: int, seconds: float, cfg: PretrainConfig) -> None:
    """Everything a resume needs, written atomically (a kill mid-write leaves the previous file)."""
    temporary = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "seconds": seconds,
                "config": asdict(cfg)}, temporary)
    os.replace(temporary, path)


def export(model, tokenizer, folder: Path) -> Path:
    """A Hugging Face checkpoint folder: bf16 safetensors in files under 16 MB, tokenizer, processor settings."""
    folder.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(folder, max_shard_size="15MB")
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": list(QWEN3_VL_PATCHIFIER.image_mean), "image_std": list(QWEN3_VL_PATCHIFIER.image_std),
        "patch_size": QWEN3_VL_PATCHIFIER.patch_size, "merge_size": QWEN3_VL_PATCHIFIER.merge_size,
        "temporal_patch_size": QWEN3_VL_PATCHIFIER.temporal_patch_size}, indent=2) + "\n")
    return folder


def plot(metrics_file: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    figure, axis = plt.subplots(figsize=(7, 4))
    for task in TASKS:
        points = [(r["step"], r[f"loss/{task}"]) for r in rows if f"loss/{task}" in r]
        if points:
            axis.plot(*zip(*points), label=task)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy per answer token")
    axis.set_title("anchor pretraining")
    axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


def run(cfg: PretrainConfig):
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = build_anchor(cfg.size, cfg.seed)
    if cfg.init:
        from transformers import Qwen3VLForConditionalGeneration

        from rot_data.hub import MODEL_FILES, snapshot

        init = snapshot(registry.resolve(cfg.init), "--init", MODEL_FILES)
        model.load_state_dict(Qwen3VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32).state_dict())
    read.prepare_tower(model)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    state_file, step, seconds_before = out / "resume.pt", 0, 0.0
    if state_file.exists():
        state = torch.load(state_file, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds_before = state["step"], state["seconds"]
        print(f"resuming {out} at step {step} of {cfg.steps}")
    (out / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    mixture = Mixture(cfg.batch, cfg.text_batch)
    for task, weight in (cfg.task_weights or {}).items():
        group = mixture.arithmetic_tasks if task in mixture.arithmetic_tasks else mixture.text_tasks
        group[task] = weight
    data = PretrainData(tokenizer, Path(cfg.data_dir) if cfg.data_dir else None, cfg.seed, mixture)
    loader = torch.utils.data.DataLoader(StepBatches(data, cfg.steps), sampler=range(step, cfg.steps), batch_size=None,
                                         num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None,
                                         pin_memory=device.type == "cuda", worker_init_fn=_one_thread)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    writer, metrics = SummaryWriter(str(out / "tensorboard")), open(out / "metrics.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc="anchor pretraining", unit="step")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sums, tokens = torch.zeros(len(TASKS), device=device), torch.zeros(len(TASKS), device=device)
    started, first_step = time.perf_counter(), step
    for micro_batches in loader:
        lr = learning_rate(cfg, step, progress(cfg, step, seconds_before + time.perf_counter() - started))
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        for micro_batch in micro_batches:
            with autocast:
                loss, task_sum, task_tokens = micro_batch_loss(model, micro_batch, image_token, device)
            loss.backward()
            sums, tokens = sums + task_sum, tokens + task_tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        if step % cfg.log_every == 0 or step == cfg.steps:
            per_task = (sums / tokens.clamp(min=1)).tolist()
            values = {f"loss/{t}": v for t, v, n in zip(TASKS, per_task, tokens.tolist()) if n}
            values.update(lr=lr, steps_per_s=(step - first_step) / (time.perf_counter() - started))
            metrics.write(json.dumps({"step": step, **values}) + "\n")
            metrics.flush()
            for key, value in values.items():
                writer.add_scalar(key, value, step)
            bar.set_postfix({t: f"{v:.3g}" for t, v in zip(TASKS, per_task)})
            sums.zero_()
            tokens.zero_()
        seconds = seconds_before + time.perf_counter() - started
        if step % cfg.save_every == 0:
            save_state(state_file, model, optimizer, step, seconds, cfg)
        if progress(cfg, step, seconds) >= 1:
            break
    bar.close()
    writer.close()
    metrics.close()
    finished = progress(cfg, step, seconds_before + time.perf_counter() - started) >= 1
    save_state(state_file, model, optimizer, step, seconds_before + time.perf_counter() - started, cfg)
    export(model, tokenizer, out / "model")
    plot(out / "metrics.jsonl", out / "loss.png")
    seconds = time.perf_counter() - started
    print(f"anchor pretraining: {step - first_step} steps in {seconds:.0f} s ({(step - first_step) / seconds:.2f} steps/s), "
          f"step {step}{'' if cfg.train_seconds else f' of {cfg.steps}'}; model in {out / 'model'}, losses in {out / 'loss.png'}")
    return model, tokenizer, finished
