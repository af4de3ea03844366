"""``rot-anchor``: pretrain the anchor VLM from scratch, and measure it."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from rot_data.terminal import wide_help_when_piped

from rot_data.registry import ANCHOR
from rot_anchor.pretrain import PretrainConfig

wide_help_when_piped()
app = typer.Typer(add_completion=False, no_args_is_help=True, help="The anchor VLM: pretraining and its figures.")
DEFAULTS = {f.name: f.default for f in fields(PretrainConfig)}


@app.command()
def pretrain(
    out: Path = typer.Option(..., help="run folder: resume.pt, model/ (the checkpoint), metrics.jsonl, tensorboard/, loss.png, eval.json"),
    data_dir: Optional[Path] = typer.Option(None, help="another copy of the shipped data folder (valid/test questions to exclude; evaluation sets)"),
    size: str = typer.Option(DEFAULTS["size"], help="anchor (shipped size) or micro (CPU smoke test)"),
    steps: int = typer.Option(DEFAULTS["steps"]),
    batch: int = typer.Option(DEFAULTS["batch"], help="arithmetic samples per step"),
    text_batch: int = typer.Option(DEFAULTS["text_batch"], help="text-reading samples per step (English, equations, printable)"),
    lr: float = typer.Option(DEFAULTS["lr"]),
    warmup_steps: int = typer.Option(DEFAULTS["warmup_steps"]),
    seed: int = typer.Option(DEFAULTS["seed"]),
    workers: int = typer.Option(DEFAULTS["workers"], help="data-loader processes rendering the lines"),
    save_every: int = typer.Option(DEFAULTS["save_every"]),
    train_seconds: Optional[float] = typer.Option(None, help="schedule by the clock: decay the LR over this many seconds of training and stop there (--steps is then an upper bound)"),
    init: Optional[str] = typer.Option(None, help="start from this checkpoint folder's weights (fresh optimizer)"),
    mix: Optional[str] = typer.Option(None, help="task weights to change, e.g. answer=0.5,ocr_printable=0.4 (tasks: cot, answer, ocr, ocr_random in the arithmetic group; ocr_english, ocr_equation, ocr_printable in the text group)"),
    evaluate: bool = typer.Option(True, help="measure the three figures once training has reached its last step"),
    eval_limit: Optional[int] = typer.Option(None, help="rows per evaluation set (default: all)"),
) -> None:
    """Train the anchor (seeded; a killed run resumes from <out>/resume.pt), export <out>/model, then measure it."""
    from rot_anchor.pretrain import run

    try:
        cfg = PretrainConfig(out=str(out), data_dir=str(data_dir) if data_dir else None, size=size, steps=steps, batch=batch,
                             text_batch=text_batch, lr=lr, warmup_steps=warmup_steps, seed=seed, workers=workers,
                             save_every=save_every, train_seconds=train_seconds, init=init, task_weights=_mix(mix))
        model, tokenizer, finished = run(cfg)
    except (OSError, ValueError) as error:  # FileNotFoundError is an OSError; a bad value or model name a ValueError
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(1)
    if evaluate and finished:
        _measure(model, tokenizer, data_dir, eval_limit, out / "eval.json")


def _mix(text: Optional[str]) -> Optional[dict]:
    if not text:
        return None
    from rot_anchor.tasks import TASKS

    weights = dict(item.split("=") for item in text.split(","))
    unknown = set(weights) - set(TASKS)
    if unknown:
        typer.secho(f"error: --mix names unknown tasks {sorted(unknown)}; use {', '.join(TASKS)}", fg="red", err=True)
        raise typer.Exit(1)
    return {task: float(weight) for task, weight in weights.items()}


@app.command("evaluate")
def evaluate_command(
    model: str = typer.Argument(ANCHOR, help="a checkpoint folder, or 'anchor' (the shipped one)"),
    data_dir: Optional[Path] = typer.Option(None, help="another copy of the shipped data folder"),
    out: Path = typer.Option(Path("anchor-eval.json")),
    limit: Optional[int] = typer.Option(None, help="rows per evaluation set (default: all)"),
    batch_size: int = typer.Option(256, help="lines generated at once (1024 suits a GPU)"),
) -> None:
    """Reading (characters, lines), CoT from text and answer from the true CoT image."""
    import torch

    from rot_vision import read

    from rot_data.records import RecordError

    for flag, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            typer.secho(f"error: {flag} {value}: use at least 1", fg="red", err=True)
            raise typer.Exit(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        vlm, tokenizer = read.load(model, device=device)
        read.prepare_tower(vlm)
        _measure(vlm, tokenizer, data_dir, limit, out, batch_size)
    except (RecordError, OSError, ValueError) as error:  # a missing data file or checkpoint, a folder that is no model
        typer.secho(f"error: {error}", fg="red", err=True)
        raise typer.Exit(1)


def _measure(model, tokenizer, data_dir: Optional[Path], limit: Optional[int], out: Path, batch_size: int = 256) -> None:
    import time

    import torch

    from rot_anchor.evaluate import evaluate

    started = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_gpu else "cpu"

    out.parent.mkdir(parents=True, exist_ok=True)

    def write(results: dict) -> None:  # after every set: a run cut off by a time limit keeps what it measured
        results.update(seconds=time.perf_counter() - started, device=device, limit=limit)
        out.write_text(json.dumps(results, indent=2) + "\n")

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):  # bf16 as in training (flash kernels need it)
        results = evaluate(model, tokenizer, data_dir, limit, batch_size, after_each_set=write)
    write(results)
    for name, scores in results["reading"].items():
        typer.echo(f"reading {name}: {100 * scores['char_accuracy']:.2f}% characters, {100 * scores['line_accuracy']:.1f}% lines "
                   f"({scores['lines']} lines)")
    for figure in ("cot_from_text", "answer_from_image"):
        for name, scores in results[figure].items():
            typer.echo(f"{figure.replace('_', ' ')} {name}: {100 * scores['accuracy']:.1f}% of {scores['examples']}")
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
