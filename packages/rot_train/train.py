"""The training loop shared by Stage I (head only, LLM frozen) and Stage II (LoRA on the LLM, head frozen).

Read it top to bottom: set up distributed -> load shards, backbone, head -> freeze what the stage
freezes -> DeepSpeed engine -> (resume) -> loop over epochs and micro-batches -> checkpoints ->
export. The vision encoder is never loaded: targets come from the shards.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from rot_model import attention, export as exporting
from rot_data.tokens import IMG_BEGIN, IMG_END
from rot_data.transformers_compat import checkpoint_activations
from rot_model.backbone import add_latent_tokens, load_backbone, set_token_rows, token_rows
from rot_train import batch_size, flops
from rot_train.batch_size import BatchPlan
from rot_model.batches import ReadingTurn, RoTCollator, SFTCollator
from rot_train.config import TrainConfig
from rot_model.model import RoTModel
from rot_model.shard_stream import ShardSet, ShardStream

def init_distributed():
    """Join the launcher's process group, or make a one-process group when run without one."""
    import deepspeed

    if "RANK" not in os.environ:
        import socket

        with socket.socket() as probe:  # a free port for this one-process group
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    accelerator = deepspeed.get_accelerator()
    try:
        with _printed_without("built successfully"):  # DeepSpeed's note on loading its CPU all-reduce op, every CPU run
            deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    except (RuntimeError, OSError) as error:  # the launcher's default port 29500, taken by another training here
        if "EADDRINUSE" in str(error) or "address already in use" in str(error).lower():
            raise ValueError(f"port {os.environ.get('MASTER_PORT')} is in use (another training on this machine?): "
                             "give this one another, e.g. deepspeed --master_port 29501 ...") from None
        raise
    _unlink_cpu_allreduce_buffer()
    local_rank = int(os.environ["LOCAL_RANK"])
    if accelerator.device_name() == "cpu":
        _share_cpu_cores()
    else:
        accelerator.set_device(local_rank)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), torch.device(accelerator.device_name(local_rank))


def _share_cpu_cores() -> None:
    """On a CPU, give each of this machine's ranks its share of the cores: every rank's torch otherwise starts a thread
    per core, and 2 ranks on 2 cores spun 5-10x slower per step (a tiny Stage I: 45 s instead of 4 s). An
    OMP_NUM_THREADS the user set wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    ranks_here = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ranks_here))


@contextlib.contextmanager
def _printed_without(noise: str):
    """What the block prints to stdout, minus the lines ending in ``noise`` (printed as the block ends, raised or not)."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        kept = [line for line in printed.getvalue().splitlines() if not line.endswith(noise)]
        if kept:
            print("\n".join(kept))


def _unlink_cpu_allreduce_buffer() -> None:
    """DeepSpeed's CPU all-reduce gives each rank a 66 MB file in /dev/shm and never deletes it, so every CPU run
    leaked one into memory (21 GB of them filled a 24 GB test machine). Once every rank has mapped its peers'
    buffers (the barrier), the names can go: the mappings stay valid until the processes exit, killed or not."""
    env = os.environ
    name = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{env['RANK']}"
    if name.exists():  # on every rank or none: DeepSpeed makes them only when all ranks share this host
        torch.distributed.barrier()
        name.unlink()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_steps(cfg: TrainConfig, stop_step: int) -> int:
    """The warm-up, at most half of the steps this run makes: a --max-steps shorter than --warmup-steps would
    otherwise never reach the peak learning rate."""
    return min(cfg.warmup_steps, max(1, stop_step // 2))


def cpu_without_bf16(device: torch.device) -> bool:
    """A CPU without bf16 units (x86's AVX512-BF16 or AMX; other CPUs are not asked): torch emulates bf16 matrix
    products there, about half as fast as fp32 (2 AVX-512 cores, docs/results.md "RoT on a CPU in 15 minutes")."""
    return device.type == "cpu" and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def training_bf16(cfg: TrainConfig, ds_file: dict, device: torch.device, rank: int) -> bool:
    """bf16 as the DeepSpeed config file says, except that the shipped configs train in fp32 on a CPU without bf16
    units (a --ds-config of the user's own is kept as written)."""
    bf16 = bool(ds_file.get("bf16", {}).get("enabled"))
    if bf16 and cfg.ds_config is None and cpu_without_bf16(device):
        if rank == 0:
            print("note: this CPU has no bf16 units (AVX512-BF16 or AMX): training in fp32, about twice as fast here "
                  "(a --ds-config with bf16 on would train in bf16)")
        return False
    return bf16


def deepspeed_config(cfg: TrainConfig, ds_file: dict, plan: BatchPlan, total_steps: int, warmup: int, bf16: bool) -> dict:
    """The config file's settings (``ds_file``, not changed) completed with this run's batches, schedule and precision."""
    config = copy.deepcopy(ds_file)
    config["bf16"] = dict(config.get("bf16", {}), enabled=bf16)
    config.update(train_micro_batch_size_per_gpu=plan.micro_batch, gradient_accumulation_steps=plan.grad_accum,
                  train_batch_size=plan.global_batch)
    config.setdefault("scheduler", {"type": "WarmupDecayLR", "params": {}})["params"].update(
        warmup_min_lr=0.0, warmup_max_lr=cfg.lr, warmup_num_steps=min(warmup, max(1, total_steps - 1)),
        total_num_steps=max(total_steps, 2), warmup_type="linear")
    return config


def build_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, shard_set: ShardSet):
    """Backbone + new tokens + head, with exactly the parameters of this stage left trainable."""
    lm, tokenizer = load_backbone(cfg.backbone, dtype=dtype, device=device)
    token_ids = add_latent_tokens(lm, tokenizer, seed=cfg.seed)
    model = RoTModel(lm, shard_set.dim, token_ids[IMG_BEGIN], token_ids[IMG_END], cfg.head_width,
                     cfg.latent_gradient, packing_choice(cfg, lm.config, device)[0]).to(device, dtype)
    lm.requires_grad_(False)
    if cfg.reader_weight:  # an untouched copy of the backbone reads the latents; it is never trained nor saved
        if (Path(cfg.backbone) / "rot_config.json").exists():
            raise ValueError(f"--reader-weight reads latents with an untouched copy of the backbone, and {cfg.backbone} is a "
                             "trained RoT export: continue it without the reader loss (--reader-weight 0)")
        model.set_reader(load_backbone(cfg.backbone, dtype=dtype, device=device)[0])
        if model.reader.config.hidden_size != shard_set.dim:
            raise ValueError(f"--reader-weight: the backbone reads visual tokens of size {model.reader.config.hidden_size}, "
                             f"the shards hold {shard_set.dim}; the reader must be the VLM whose tower built the shards")
    if cfg.stage == 2:
        if cfg.mode == "rot":
            stage1 = exporting.load_head(model, cfg.init, shard_set)
            if exporting.latent_merge(stage1) != cfg.merge_latents:
                raise ValueError(f"--merge-latents {cfg.merge_latents}: the Stage I export {cfg.init} was trained with "
                                 f"--merge-latents {exporting.latent_merge(stage1)} (its head predicts those means); pass that")
        model.head.requires_grad_(cfg.train_head)
        model.adapter.requires_grad_(cfg.train_head)
        if cfg.full_finetune:
            lm.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            model.lm = get_peft_model(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                     target_modules=cfg.lora_targets, task_type="CAUSAL_LM"))
            model.lm.to(device, dtype)
    if cfg.gradient_checkpointing or (cfg.gradient_checkpointing is None and device.type != "cuda"):
        checkpoint_activations(lm)  # Stage I too: the teacher-forced pass keeps activations for the input gradients
    return model, tokenizer, token_ids


def packing_choice(cfg: TrainConfig, config, device: torch.device) -> tuple[bool, str]:
    """``--packing``, or its default: on a GPU, where the backbone can pack (one flash-attention call per pass); on a
    CPU off (there it runs one attention call per group of equal-length rows). Returns (on, why) for run.json."""
    if cfg.packing is not None:
        return cfg.packing, f"{'on' if cfg.packing else 'off'} (given)"
    if device.type != "cuda":
        return False, "off (a CPU)"
    reason = attention.cannot_pack(config)
    return reason is None, f"off: {reason}" if reason else "on (a GPU)"


def _totals(before: dict, samples: int, started: float) -> dict:
    return {"samples": before["samples"] + samples, "seconds": before["seconds"] + time.perf_counter() - started}


class MetricsLog:
    """Rank 0's per-step record: a JSON-lines file (tests and plots read it) and TensorBoard. A resumed run first drops
    the lines of steps after its checkpoint (a killed run logged them; they are trained again), so each step is there once."""

    def __init__(self, out: Path, enabled: bool, after_step: int = 0):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = out / "metrics.jsonl"
            if path.exists():
                kept = [line for line in path.read_text().splitlines(True) if line.strip() and json.loads(line)["step"] <= after_step]
                path.write_text("".join(kept))
            self.file = open(path, "a")
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def close(self):
        if self.enabled:
            self.file.close()
            self.writer.close()


def _resume_tag(checkpoints: Path, world_size: int, rank: int, ds_config: dict, shard_set: ShardSet) -> str:
    """The checkpoint tag to load, after checking it was trained on these shards (another embedding size would
    fail inside DeepSpeed's loader). Saved with another number of GPUs: convert it once to DeepSpeed's
    universal format (optimizer state un-partitioned) and load that, so 2-GPU runs resume on 1 and back."""
    import subprocess
    import sys

    import torch.distributed as dist

    tag = (checkpoints / "latest").read_text().strip()
    states = sorted((checkpoints / tag).glob("*mp_rank_00_model_states.pt"))  # ZeRO-3 prefixes it with zero_pp_rank_<r>_
    saved = torch.load(states[0], map_location="cpu", weights_only=False)
    trained_on = (saved.get("shards_fingerprint"), saved.get("shards_dim", shard_set.dim))
    if trained_on != (shard_set.fingerprint, shard_set.dim):
        raise ValueError(f"{checkpoints} was trained on shards {trained_on[0]} (dim {trained_on[1]}), {shard_set.folder} are "
                         f"{shard_set.fingerprint} (dim {shard_set.dim}); resume with the same --shards or start a new --out")
    bf16, words = ds_config["bf16"]["enabled"], {True: "bf16", False: "fp32"}
    if saved.get("bf16", bf16) != bf16:  # DeepSpeed would load one precision's states into the other's engine
        raise ValueError(f"{checkpoints / tag} was trained in {words[saved['bf16']]}, this run trains in {words[bf16]}: "
                         f"resume with a --ds-config whose bf16 \"enabled\" is {str(saved['bf16']).lower()}, or start a new --out")
    if saved["dp_world_size"] == world_size:
        return tag
    universal = f"{tag}_universal"
    if rank == 0 and not (checkpoints / universal).exists():
        print(f"checkpoint {tag} was saved on {saved['dp_world_size']} ranks, resuming on {world_size}: converting to {universal}")
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoints / tag),
                        "--output_folder", str(checkpoints / universal), "--inject_missing_state"], check=True,
                       stdout=subprocess.DEVNULL)
    if dist.is_initialized():
        dist.barrier()
    ds_config["checkpoint"] = {"load_universal": True}
    return universal


def _commit_checkpoint(checkpoints: Path, tag: str, keep: int) -> None:
    """Point `latest` at a complete checkpoint (written to disk, then renamed over the old pointer: a kill leaves
    the old one or the new one, never a torn file), then delete all but the ``keep`` newest (0: keep all)."""
    import shutil

    for path in (checkpoints / tag).rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())
    temporary = checkpoints / f".latest.tmp-{os.getpid()}"
    with open(temporary, "w") as file:
        file.write(tag)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, checkpoints / "latest")
    if keep < 1:
        return
    newest = int(tag.removeprefix("step"))
    steps = sorted((int(p.name.removeprefix("step")) for p in checkpoints.glob("step*")
                    if p.is_dir() and p.name.removeprefix("step").isdigit()), reverse=True)
    older = [s for s in steps if s <= newest][keep:]  # a partial one beyond `latest` (a killed save) is redone next time
    for old_step in older:
        shutil.rmtree(checkpoints / f"step{old_step}", ignore_errors=True)
        shutil.rmtree(checkpoints / f"step{old_step}_universal", ignore_errors=True)


def _optimizer_state_beside_weights(optimizer) -> None:
    """A universal checkpoint restores Adam's step counters on the CPU; the fused CUDA AdamW wants every
    state tensor on its parameter's device (found moving a 2-GPU checkpoint to 1 GPU). Walk the state itself:
    ZeRO-3 empties ``param_groups[i]["params"]`` between steps, so the groups do not list the parameters."""
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO wrapper holds the torch optimizer
    for param, state in inner.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.device != param.device:
                state[key] = value.to(param.device)


def _mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Logged losses are the mean over data-parallel ranks, so a 2-GPU log compares with a 1-GPU log.
    The values stay on the device until here: one host sync per optimizer step, not one per loss per micro-step."""
    import torch.distributed as dist

    keys = sorted(values)
    tensor = torch.stack([values[k] for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor = tensor / dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def _seconds_by_rank0(started: float, device: torch.device) -> float:
    """The seconds of training so far by rank 0's clock, sent to every rank: all ranks stop at the same optimizer step
    (the final checkpoint and a ZeRO-3 export are collectives) and use the same learning rate. One broadcast a step."""
    import torch.distributed as dist

    seconds = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(seconds, src=0)
    return float(seconds.item())


def _same_latent_slots_on_every_rank(batch: dict) -> dict:
    """ZeRO-3 gathers each layer's weights inside every forward call, so all ranks must make the same number of
    calls; the rollout makes one per latent slot. Pad every rank's slots to the largest count on any rank (the
    extra slots are masked holes: they cost compute, never change a loss)."""
    import torch.distributed as dist

    slots = torch.tensor([batch["targets"].shape[1]], device=batch["targets"].device)
    dist.all_reduce(slots, op=dist.ReduceOp.MAX)
    extra = int(slots) - batch["targets"].shape[1]
    if extra:
        batch = dict(batch, targets=torch.nn.functional.pad(batch["targets"], (0, 0, 0, extra)),
                     target_mask=torch.nn.functional.pad(batch["target_mask"], (0, extra)))
    return batch


class Checkpoints:
    """Saves the engine's state with the stream position in ``<out>/checkpoints`` and points ``latest`` at it."""

    def __init__(self, engine, model, cfg: TrainConfig, shard_set: ShardSet, token_ids: dict, rank: int):
        self.engine, self.model, self.cfg, self.shard_set, self.rank = engine, model, cfg, shard_set, rank
        self.token_ids, self.folder = list(token_ids.values()), Path(cfg.out) / "checkpoints"

    def save(self, step: int, epoch: int, next_batch: int, totals: dict) -> None:
        """``totals``: the samples and seconds of the whole run so far (a resumed run's summary counts them all)."""
        state = {"step": step, "epoch": epoch, "next_batch": next_batch, "totals": totals,
                 "shards_fingerprint": self.shard_set.fingerprint,
                 "shards_dim": self.shard_set.dim, "bf16": self.engine.bfloat16_enabled(),
                 "token_rows": token_rows(self.model.lm, self.token_ids),
                 "torch_rng": torch.get_rng_state(),
                 "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}  # lets ds_to_universal convert it
        # DeepSpeed would write `latest` on rank 0 before the other ranks finish their files, and in place: a kill
        # then could leave it naming a half-written checkpoint, or empty. It is written here once every rank is done.
        self.engine.save_checkpoint(str(self.folder), tag=f"step{step}", client_state=state, exclude_frozen_parameters=True,
                                    save_latest=False)  # ends with a barrier: every rank's files are written
        if self.rank == 0:
            _commit_checkpoint(self.folder, f"step{step}", self.cfg.keep_checkpoints)
        torch.distributed.barrier()

    def resume(self, tag: str) -> tuple[int, int, int, dict]:
        """Load checkpoint ``tag``; returns (step, epoch, next micro-batch, the run's totals before it)."""
        _, state = self.engine.load_checkpoint(str(self.folder), tag=tag, load_module_strict=False)
        _optimizer_state_beside_weights(self.engine.optimizer)
        set_token_rows(self.model.lm, self.token_ids, state["token_rows"])
        torch.set_rng_state(state["torch_rng"])
        return state["step"], state["epoch"], state["next_batch"], state.get("totals", {"samples": 0, "seconds": 0.0})


def check_before_run(cfg: TrainConfig) -> Path:
    """What a run needs besides valid values (``TrainConfig.validate``): Stage II's --init, and an --out folder that
    holds no earlier run (its losses would be appended to that run's log) unless --resume continues it."""
    if cfg.stage == 2 and cfg.mode == "rot" and cfg.init is None:
        raise ValueError("--init is required for Stage II: pass the export folder a Stage I run wrote (<stage1 --out>/export)")
    out = Path(cfg.out)
    if cfg.resume and not (out / "checkpoints" / "latest").exists():
        raise ValueError(f"--resume: {out} holds no checkpoint (checkpoints/latest) to continue; leave --resume out to "
                         "start a fresh run there")
    if not cfg.resume and ((out / "metrics.jsonl").exists() or (out / "checkpoints" / "latest").exists()):
        raise ValueError(f"{out} holds an earlier run (metrics.jsonl / checkpoints): pass --resume to continue it, "
                         "or choose another --out (or delete that folder)")
    return out


def make_collate(cfg: TrainConfig, shard_set: ShardSet, tokenizer, token_ids: dict):
    """Rows -> a micro-batch: RoT rows (question, targets, answer) or the baselines' text rows."""
    if cfg.mode == "rot":
        reading = ReadingTurn(tokenizer, shard_set.manifest["render"]["thought_tags"]) if cfg.reader_weight else None
        return RoTCollator(tokenizer, token_ids[IMG_BEGIN], token_ids[IMG_END], cfg.max_latents, reading, cfg.merge_latents)
    return SFTCollator(tokenizer, with_cot=cfg.mode == "sft-cot", latent_dim=shard_set.dim)


def forward_options(cfg: TrainConfig, step: int) -> dict:
    return {"stage": cfg.stage, "vision_weight": cfg.vision_weight, "lm_weight": cfg.lm_weight,
            "rolled_out": cfg.rolled_out(step), "reader_weight": cfg.reader_weight, "stop_weight": cfg.stop_weight}


def plan_batches(cfg: TrainConfig, model, collate, shard_set: ShardSet, world_size: int, device: torch.device) -> BatchPlan:
    """The micro-batch and accumulation of ``--global-batch``, and whether activations are recomputed.

    The micro-batch: as given, else the largest that fits the GPU (every rank probes its own; they are alike), else (a
    CPU) the whole per-rank batch in one micro step. Activation checkpointing, unless given: on a GPU, off when the
    micro-batch (given, or the whole per-rank batch) fits without it, since recomputing costs a third more compute and
    only pays where it saves accumulation steps; else on (then the probe looks for the largest micro-batch with it).
    On a CPU it stays on (``build_model`` turned it on): nothing is probed there."""
    if cfg.micro_batch is not None:
        plan = batch_size.given(cfg.global_batch, world_size, cfg.micro_batch)
    elif device.type != "cuda":
        plan = BatchPlan(batch_size.per_rank(cfg.global_batch, world_size), 1, world_size, "no accumulation on a CPU")
    else:
        plan = None  # probed below
    checkpointing = "given" if cfg.gradient_checkpointing is not None else "on (a CPU: memory is not probed)"
    if device.type == "cuda" and cfg.gradient_checkpointing is None:
        micro = plan.micro_batch if plan else batch_size.per_rank(cfg.global_batch, world_size)
        whole = _probe(cfg, model, collate, shard_set, world_size, device, only=micro)
        if _smallest_over_ranks(int(whole is not None), device, world_size):
            checkpointing = f"off: a micro-batch of {micro} fits without it"
            plan = plan or whole  # the whole per-rank batch fits: nothing left to probe
        else:
            checkpoint_activations(model.lm.get_base_model() if hasattr(model.lm, "get_base_model") else model.lm)
            checkpointing = f"on: a micro-batch of {micro} does not fit without it"
    if plan is None:
        found = _probe(cfg, model, collate, shard_set, world_size, device)
        micro = _smallest_over_ranks(found.micro_batch, device, world_size)  # ranks must agree: the smallest found
        plan = BatchPlan(micro, batch_size.per_rank(cfg.global_batch, world_size) // micro, world_size, found.chosen_by)
    return BatchPlan(plan.micro_batch, plan.grad_accum, plan.world_size, plan.chosen_by, checkpointing)


def _probe(cfg: TrainConfig, model, collate, shard_set: ShardSet, world_size: int, device: torch.device, only=None):
    options = dict(forward_options(cfg, 0), rolled_out=None)  # the whole rollout: the most memory a step takes
    model.train()  # as in training: dropout, and activation checkpointing where it is on
    return batch_size.probe(model, collate, shard_set, cfg.global_batch, world_size, device, options, only)


def _smallest_over_ranks(value: int, device: torch.device, world_size: int) -> int:
    """Ranks decide alike: the smallest value any rank found (a step fits only if it fits on every rank)."""
    if torch.distributed.is_initialized() and world_size > 1:
        found = torch.tensor([value], device=device)
        torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MIN)
        return int(found)
    return value


def micro_batches(stream: ShardStream, cfg: TrainConfig, epoch: int, start_batch: int):
    """One epoch's micro-batches from ``start_batch`` on, read by ``--num-workers`` loader processes."""
    stream.set_position(epoch, start_batch)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                                       prefetch_factor=4 if cfg.num_workers else None,
                                       generator=torch.Generator().manual_seed(cfg.seed))  # leaves the global RNG (dropout) alone


ROLLOUT_WORDS = {"graphs": "the decoding engine, each latent's step replayed as a CUDA graph",
                 "eager": "the decoding engine, each latent's step launched kernel by kernel"}


def rollout_mode(cfg: TrainConfig, device: torch.device, zero_stage: int) -> str:
    """``--rollout``, or its default: CUDA graphs where the weights stay in place (a GPU, ZeRO below 3: a graph reads
    the weights where they lay at capture, and ZeRO-3 gathers them into new buffers at every call)."""
    graphs_possible = device.type == "cuda" and zero_stage < 3
    if cfg.rollout is None:
        return "graphs" if graphs_possible else "eager"
    if cfg.rollout == "graphs" and not graphs_possible:
        raise ValueError("--rollout graphs needs a GPU and ZeRO-2 (ZeRO-3 moves the weights a graph reads): use --rollout eager")
    return cfg.rollout


def train_micro_step(engine, batch: dict, cfg: TrainConfig, step: int, device) -> dict:
    """Forward, backward and (every ``grad_accum`` micro-steps, inside DeepSpeed) the optimizer step."""
    tensors = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if engine.zero_optimization_stage() == 3:
        tensors = _same_latent_slots_on_every_rank(tensors)
    losses = engine(tensors, **forward_options(cfg, step))
    engine.backward(losses["loss"])
    engine.step()
    return losses


def run(cfg: TrainConfig) -> tuple[dict, RoTModel]:
    """The training run, holding ``--out``'s writer lock on rank 0 (a second run into the same folder is refused)."""
    from rot_data import locks

    first_rank = os.environ.get("RANK", "0") == "0"  # the launcher's global rank; a run without it is rank 0
    holding = locks.exclusive(Path(cfg.out), f"rot-train {cfg.mode} stage {cfg.stage}") if first_rank else contextlib.nullcontext()
    try:
        with holding:
            return _run(cfg)
    except locks.FolderBusy as error:
        raise ValueError(str(error)) from None


def _run(cfg: TrainConfig) -> tuple[dict, RoTModel]:
    """Set up (shards, model, engine) -> resume -> epochs of micro-batches -> final checkpoint -> export."""
    import deepspeed
    from tqdm import tqdm

    # 1. set up: process group, shards, the model with this stage's trainable parameters, the batch stream
    out = check_before_run(cfg)
    rank, world_size, device = init_distributed()
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    shard_set = ShardSet.open(cfg.shards)
    ds_file = json.loads(Path(cfg.deepspeed_file).read_text())
    bf16 = training_bf16(cfg, ds_file, device, rank)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model, tokenizer, token_ids = build_model(cfg, device, dtype, shard_set)
    collate = make_collate(cfg, shard_set, tokenizer, token_ids)
    if shard_set.rows < cfg.global_batch:
        raise ValueError(f"{shard_set.rows} rows give no optimizer step of --global-batch {cfg.global_batch}; lower it "
                         f"(at most {shard_set.rows})")
    rollout = rollout_mode(cfg, device, ds_file.get("zero_optimization", {}).get("stage", 0))
    model.engines.graphs = rollout == "graphs"  # before the memory probe, which rolls out as training will
    plan = plan_batches(cfg, model, collate, shard_set, world_size, device)
    packing = packing_choice(cfg, model.lm.config, device)[1]  # what build_model chose, in words
    if rank == 0:
        print(f"batches: {plan.describe()}")
        print(f"rollout: {rollout} ({ROLLOUT_WORDS[rollout]}); packing: {packing}")
    stream = ShardStream(shard_set, collate, plan.micro_batch, rank, world_size, cfg.seed, cfg.shuffle_buffer,
                         global_batch=plan.global_batch)
    total_steps = stream.batches_per_epoch // plan.grad_accum * cfg.epochs  # the LR schedule's length
    stop_step = total_steps if cfg.max_steps is None else min(cfg.max_steps, total_steps)  # --max-steps only stops early

    # 2. the DeepSpeed engine (and the checkpoint to resume from, checked against these shards first)
    warmup = warmup_steps(cfg, stop_step)
    if warmup < cfg.warmup_steps and rank == 0:
        print(f"note: --warmup-steps {cfg.warmup_steps} is more than half of the {stop_step} steps this run makes: "
              f"warming up over {warmup} (the peak learning rate {cfg.lr:g} is reached at step {warmup})")
    ds_config = deepspeed_config(cfg, ds_file, plan, total_steps, warmup, bf16)
    latest = out / "checkpoints" / "latest"
    resume_tag = _resume_tag(latest.parent, world_size, rank, ds_config, shard_set) if cfg.resume else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    model.engines.clear()  # the probe's engines read weights ZeRO-2 has just moved (a new key each); free their caches
    checkpoints = Checkpoints(engine, model, cfg, shard_set, token_ids, rank)
    step, epoch, next_batch, before = checkpoints.resume(resume_tag) if resume_tag else (0, 0, 0, {"samples": 0, "seconds": 0.0})
    resumed_from = step

    # 3. what the run records: run.json, per-step metrics, optionally the ids each rank consumed
    # pitfall of latent methods: latents whose norm is far from the token embeddings' destabilise training
    embedding_norm = float(model.lm.get_input_embeddings().weight.float().norm(dim=-1).mean())
    global_batch = plan.global_batch
    untrained_rows = max(0, shard_set.rows - stream.batches_per_epoch // plan.grad_accum * global_batch)
    counter = flops.Counter(model, cfg)
    run_info = {"command": cfg.command.name, "config": cfg.options(), "deepspeed_config": cfg.deepspeed_file,
                "world_size": world_size, "precision": "bf16" if bf16 else "fp32", "global_batch": global_batch,
                "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum, "micro_batch_chosen_by": plan.chosen_by,
                "rollout": rollout, "activation_checkpointing": plan.checkpointing,
                "packing": packing,
                "warmup_steps": warmup,
                "shards_fingerprint": shard_set.fingerprint, "trainable_parameters": sum(p.numel() for p in trainable),
                "total_steps": total_steps, "stop_step": stop_step, "device": str(device), "embedding_row_norm": embedding_norm,
                "rows_per_epoch_untrained": untrained_rows}
    if untrained_rows and rank == 0:  # the tail that fills no whole optimizer step: said, not dropped in silence
        print(f"note: {untrained_rows} of the {shard_set.rows} rows fill no whole optimizer step (global batch {global_batch}) "
              "and are left out of each epoch (a different one each epoch: the order is reshuffled)")
    if rank == 0:
        (out / "run.json").write_text(json.dumps(run_info, indent=2, default=str) + "\n")
    metrics = MetricsLog(out, rank == 0, after_step=step)
    ids_log = open(out / f"ids-rank{rank}.jsonl", "a") if cfg.log_ids else None
    progress = tqdm(total=stop_step, initial=step, desc=cfg.mode if cfg.mode != "rot" else f"stage {cfg.stage}", disable=rank != 0, unit="step")

    # 4. the loop: micro-steps accumulate into optimizer steps; each optimizer step is logged (and checkpointed)
    engine.train()
    started, samples, sums, micro_steps = time.perf_counter(), 0, {}, 0  # the --max-seconds clock: setup not counted
    model_flops = 0.0  # of this run's samples, all ranks (rot_train.flops: what is counted)
    out_of_time = False
    while step < stop_step and epoch < cfg.epochs and not out_of_time:
        for batch in micro_batches(stream, cfg, epoch, next_batch):
            next_batch = batch["batch_index"] + 1
            if ids_log:
                ids_log.write(json.dumps({"epoch": epoch, "batch": batch["batch_index"],
                                          "ids": [i for i, w in zip(batch["ids"], batch["weights"].tolist()) if w > 0]}) + "\n")
            losses = train_micro_step(engine, batch, cfg, step, device)
            samples += int(batch["weights"].sum()) * world_size
            model_flops += counter.of_batch(batch, cfg.rolled_out(step)) * world_size
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.detach().double()
            micro_steps += 1
            if micro_steps % plan.grad_accum:
                continue
            step += 1
            if cfg.max_seconds is not None and step < stop_step:
                seconds = _seconds_by_rank0(started, device)
                out_of_time = seconds >= cfg.max_seconds
                if cfg.decay_by_deadline:  # the step schedule set the next step's rate; cap it by a line from the
                    # peak to 0 at the deadline: a run stopped by the clock ends annealed however many steps it made
                    ceiling = cfg.lr * max(0.0, 1 - seconds / cfg.max_seconds)
                    for group in engine.optimizer.param_groups:
                        group["lr"] = min(group["lr"], ceiling)
            values = {k: v / plan.grad_accum for k, v in _mean_over_ranks(sums).items()}
            if cfg.curriculum_steps:
                values["rolled_out"] = min(cfg.rolled_out(step - 1), batch["targets"].shape[1])  # past the last slot: all
            values.update(lr=engine.get_lr()[0], epoch=epoch, embedding_norm=embedding_norm,
                          samples_per_s=samples / (time.perf_counter() - started))
            metrics.write(step, values)
            progress.set_postfix({k: f"{values[k]:.4g}" for k in ("loss", "mse", "read", "lm") if k in values})
            progress.update()
            sums = {}
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoints.save(step, epoch, next_batch, _totals(before, samples, started))
            if step >= stop_step or out_of_time:
                break
        if step < stop_step and not out_of_time:  # the epoch ran out: the next one starts at its first micro-batch
            epoch, next_batch = epoch + 1, 0
    progress.close()
    elapsed = time.perf_counter() - started

    # 5. the end (also after --max-seconds: --resume continues from this checkpoint): a last checkpoint, the export
    # (a collective under ZeRO-3), the summary and the loss picture
    totals = _totals(before, samples, started)
    checkpoints.save(step, epoch, next_batch, totals)
    stopped = f"stopped by --max-seconds {cfg.max_seconds:g} at step {step} of {stop_step}" if out_of_time else None
    summary = {"steps": step, "planned_steps": stop_step, "schedule_steps": total_steps, "stopped_early": stopped,
               "samples": totals["samples"], "seconds": totals["seconds"], "resumed_from_step": resumed_from if resume_tag else None,
               "samples_this_run": samples, "seconds_this_run": elapsed,
               "samples_per_s": samples / max(elapsed, 1e-9), "global_batch": run_info["global_batch"],
               "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
               **flops.utilisation(model_flops, samples, elapsed, world_size, device),
               "rows_per_epoch_untrained": untrained_rows,
               "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    exporting.export(model, tokenizer, out / "export", cfg, shard_set, token_ids, write=rank == 0)
    if rank == 0:
        exporting.plot_losses(out / "metrics.jsonl", out / "loss.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        name = cfg.mode if cfg.mode != "rot" else f"stage {cfg.stage}"
        print(f"{name} {stopped or 'done'}: {step} steps, {totals['samples']} samples in {totals['seconds']:.1f} s "
              f"({summary['samples_per_s']:.2f} samples/s, global batch {summary['global_batch']}{flops.describe(summary)}); "
              f"export in {out / 'export'}")
    metrics.close()
    if ids_log:
        ids_log.close()
    return summary, engine.module
