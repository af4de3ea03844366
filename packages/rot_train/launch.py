"""The ``rot-train`` command: ``stage1``, ``stage2`` and ``sft`` (the baselines), one set of options.

Run it under the DeepSpeed launcher from any directory: ``deepspeed --module rot_train stage2 --shards ...``
(``python -m rot_train stage2 ...`` runs one process without the launcher). ``deepspeed rot_train/stage2.py ...``
from ``packages/`` runs the same command.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import MISSING, fields
from typing import Callable, List, Optional

import typer

from rot_data.terminal import wide_help_when_piped

import rot_anchor


class DeepSpeedNoise(logging.Filter):
    """DeepSpeed's log lines that tell a user of this trainer nothing: 'Setting accelerator to CPU' (logged by every
    process that imports DeepSpeed on a machine without a GPU) and 'Attempting to get learning rate from scheduler
    before it has started' (logged by the warm-up scheduler's own constructor on every run). Every other line stays."""

    NOISE = ("Setting accelerator to CPU", "Attempting to get learning rate from scheduler before it has started")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(noise in record.getMessage() for noise in self.NOISE)


# before anything imports DeepSpeed: the logger it sets up at import is this one, and it keeps the filter
logging.getLogger("DeepSpeed").addFilter(DeepSpeedNoise())

from rot_train.shard_stream import ShardError  # noqa: E402 (DeepSpeed is imported from here on)
from rot_train.train import CONFIGS, STAGE_DEFAULTS, TrainConfig, run  # noqa: E402

HELP = {"stage1": "RoT Stage I: train the projection head, LLM frozen.",
        "stage2": "RoT Stage II: LoRA on the LLM (or --full-finetune), head frozen.",
        "sft": "SFT baselines (question -> CoT -> answer, or question -> answer) with the Stage II settings."}
wide_help_when_piped()
app = typer.Typer(add_completion=False)


@app.callback(help="Train RoT from shards (rot-render build) under the DeepSpeed launcher, from any directory: "
              "deepspeed --module rot_train stage2 --shards ... (python -m rot_train ... runs one process).")
def launcher_options(local_rank: int = typer.Option(0, "--local_rank", "--local-rank", hidden=True)) -> None:
    """``deepspeed --module`` passes ``--local_rank=N`` before the subcommand; the rank is read from LOCAL_RANK."""


def defaults(stage: int) -> dict:
    """Every option's default, from TrainConfig and the stage's presets (the only place defaults are written)."""
    values = {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default) for f in fields(TrainConfig)}
    return {**values, **STAGE_DEFAULTS[stage]}


def zero_config(zero: int | None, deepspeed_config: str) -> str:
    """The DeepSpeed config file: ``--zero 2|3`` names one of rot_train/configs, ``--ds-config`` any file."""
    if zero is None:
        return deepspeed_config
    if zero not in (2, 3):
        raise ValueError(f"--zero {zero}: use 2 or 3 (rot_train/configs/zero2.json, zero3.json), or --ds-config <file>")
    if deepspeed_config != defaults(1)["deepspeed_config"]:
        raise ValueError("--zero and --ds-config both name a DeepSpeed config: pass one of them")
    return str(CONFIGS / f"zero{zero}.json")


def train_command(stage: int, mode: str = "rot") -> Callable:
    """The command's function for one stage (its options' defaults are that stage's)."""
    d = defaults(stage)

    def main(
        shards: str = typer.Option(..., help="shard folder written by rot-render build"),
        backbone: str = typer.Option(rot_anchor.NAME, help="'anchor' (the shipped pretrained VLM), or a hub id or folder: a Qwen-VL checkpoint (language model only is loaded) or any causal LM"),
        out: str = typer.Option(..., help="run folder: checkpoints/, export/, metrics.jsonl, tensorboard/, loss.png"),
        init: Optional[str] = typer.Option(None, help="Stage II: the Stage I export folder (<stage1 --out>/export)"),
        mode: str = typer.Option(mode, help="rot, or the baselines sft-cot / sft-nocot (LoRA, same settings, no latents)"),
        zero: Optional[int] = typer.Option(None, help="ZeRO stage 2 or 3: the DeepSpeed configs in rot_train/configs (default: 2)"),
        deepspeed_config: str = typer.Option(d["deepspeed_config"], "--ds-config", show_default="rot_train/configs/zero2.json", help="a DeepSpeed config file of your own (instead of --zero)"),
        global_batch: int = typer.Option(d["global_batch"], help="samples per optimizer step, whatever the number of GPUs (official: 128)"),
        micro_batch: Optional[int] = typer.Option(None, help="samples per GPU per micro step, a divisor of the global batch per GPU (default: the largest that fits the GPU's memory, probed on the longest rows; on a CPU the whole per-rank batch); accumulation makes up the rest"),
        epochs: int = typer.Option(d["epochs"]),
        max_steps: Optional[int] = typer.Option(None, help="stop after this many optimizer steps"),
        max_seconds: Optional[float] = typer.Option(d["max_seconds"], help="wall-clock budget: stop at the first optimizer step after this many seconds of training (setup not counted), then checkpoint and export as a finished run does (for time-limited GPU calls and jobs; --resume continues)"),
        lr: float = typer.Option(d["lr"]),
        warmup_steps: int = typer.Option(d["warmup_steps"]),
        max_latents: Optional[int] = typer.Option(None, help="cap on the latents trained per sample (default: one per visual token of the CoT, as the official code)"),
        inference_latents: Optional[int] = typer.Option(None, help="latent budget recorded in the export for rot-eval (default: the shards' mean visual tokens per row, or --max-latents if lower)"),
        latent_gradient: str = typer.Option(d["latent_gradient"], help="Stage II: 'official' (the answer loss trains the LLM through its latents) or 'detached'"),
        vision_weight: float = typer.Option(d["vision_weight"], help="weight of the MSE to the visual embeddings"),
        curriculum_steps: int = typer.Option(d["curriculum_steps"], help="Stage II: teacher-force the latents with the true visual embeddings, handing --curriculum-stride more of them to the rollout every N optimizer steps (0: off, the official forward)"),
        curriculum_stride: int = typer.Option(d["curriculum_stride"], help="latents handed from teacher forcing to the rollout per curriculum stage"),
        reader_weight: float = typer.Option(d["reader_weight"], help="Stage II: weight of a frozen copy of the backbone VLM reading the predicted latents as the drawn CoT (cross-entropy; 0: off, the official loss)"),
        train_head: bool = typer.Option(d["train_head"], help="Stage II: keep training the projection head (the official Stage II freezes it)"),
        lm_weight: float = typer.Option(d["lm_weight"], help="weight of the LM loss on <img_end> + answer"),
        head_width: int = typer.Option(d["head_width"], help="projection head width (official: 2048)"),
        lora_r: int = typer.Option(d["lora_r"]),
        lora_alpha: int = typer.Option(d["lora_alpha"]),
        lora_dropout: float = typer.Option(d["lora_dropout"]),
        lora_targets: List[str] = typer.Option(d["lora_targets"]),
        full_finetune: bool = typer.Option(d["full_finetune"], help="Stage II: train every LLM weight instead of LoRA"),
        gradient_checkpointing: Optional[bool] = typer.Option(None, help="recompute each layer's activations in the backward pass (a third more compute, far less memory); default: only where memory needs it (on a GPU, off when the micro-batch fits without it; on a CPU on)"),
        rollout: Optional[str] = typer.Option(None, help="how latents are rolled out on the decoding engine: 'graphs' (each step replayed as a CUDA graph) or 'eager' (default: graphs on a GPU unless --zero 3, else eager)"),
        seed: int = typer.Option(d["seed"]),
        shuffle_buffer: int = typer.Option(d["shuffle_buffer"]),
        num_workers: int = typer.Option(d["num_workers"], help="data-loader worker processes per rank"),
        save_every: int = typer.Option(d["save_every"], help="checkpoint every N optimizer steps (0: only at the end)"),
        keep_checkpoints: int = typer.Option(d["keep_checkpoints"], help="keep the N newest checkpoints in <out>/checkpoints, delete older ones (0: keep all)"),
        resume: bool = typer.Option(d["resume"], help="continue from the latest checkpoint in <out>/checkpoints"),
        log_ids: bool = typer.Option(d["log_ids"], help="write the ids each rank consumed to ids-rank<N>.jsonl"),
        local_rank: int = typer.Option(0, "--local_rank", "--local-rank", hidden=True, help="set by the deepspeed launcher"),
    ) -> None:
        try:  # bad options (zero_config, TrainConfig's checks) and bad shards end with a one-line error
            deepspeed_config = zero_config(zero, deepspeed_config)
            config = TrainConfig(stage=stage, shards=shards, backbone=backbone, out=out, init=init, mode=mode, deepspeed_config=deepspeed_config,
                                 global_batch=global_batch, micro_batch=micro_batch, epochs=epochs, max_steps=max_steps,
                                 max_seconds=max_seconds, lr=lr,
                                 warmup_steps=warmup_steps, max_latents=max_latents, inference_latents=inference_latents,
                                 latent_gradient=latent_gradient, vision_weight=vision_weight,
                                 curriculum_steps=curriculum_steps, curriculum_stride=curriculum_stride, reader_weight=reader_weight, train_head=train_head,
                                 lm_weight=lm_weight, head_width=head_width, lora_r=lora_r, lora_alpha=lora_alpha,
                                 lora_dropout=lora_dropout, lora_targets=list(lora_targets), full_finetune=full_finetune,
                                 gradient_checkpointing=gradient_checkpointing, rollout=rollout, seed=seed, shuffle_buffer=shuffle_buffer,
                                 num_workers=num_workers, save_every=save_every, keep_checkpoints=keep_checkpoints, resume=resume, log_ids=log_ids)
            run(config)
        except (ShardError, FileNotFoundError, ValueError) as error:
            typer.secho(f"error: {error}", fg="red", err=True)
            raise typer.Exit(1)

    return main


app.command("stage1", help=HELP["stage1"])(train_command(1))
app.command("stage2", help=HELP["stage2"])(train_command(2))
app.command("sft", help=HELP["sft"])(train_command(2, mode="sft-cot"))


@app.command("compact", help="A copy of a --full-finetune export in a few MB, for shipping or carrying: its LLM weights "
             "as 8- or 4-bit differences from the base it was trained from (which must be installed to load it), its head bf16.")
def compact_command(
    export: str = typer.Argument(..., help="the export folder (<--out>/export) of a --full-finetune Stage II or SFT run"),
    out: str = typer.Option(..., help="the new folder; it loads wherever an export does"),
    base: str = typer.Option(rot_anchor.NAME, help="the backbone the run started from (--backbone of its first stage)"),
    bits: int = typer.Option(8, help="8: the weights as trained, within bf16 rounding; 4: half the size, lossier (measure it)"),
) -> None:
    from rot_train.export import compact

    try:
        sizes = compact(export, out, base, bits)
    except (FileNotFoundError, ValueError) as error:
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"compact export in {out}: {sizes['bytes_before'] / 1e6:.1f} MB -> {sizes['bytes_after'] / 1e6:.1f} MB "
               f"({sizes['quantized']:,} weights as {bits}-bit differences from '{base}', {sizes['whole']:,} kept whole)")


def run_script(command: str) -> None:
    """``rot_train/<command>.py``: the same command, for ``deepspeed rot_train/stage2.py ...`` from packages/."""
    app(args=[command, *sys.argv[1:]], prog_name=f"rot_train/{command}.py")
