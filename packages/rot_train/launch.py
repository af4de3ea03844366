"""The ``rot-train`` command: ``stage1``, ``stage2`` and ``sft`` (the baselines), each with its own options, all made
from the config's fields (``rot_train.config``).

Run it under the DeepSpeed launcher from any directory: ``deepspeed --module rot_train stage2 --shards ...``
(``python -m rot_train stage2 ...`` runs one process without the launcher). ``deepspeed rot_train/stage2.py ...``
from ``packages/`` runs the same command.
"""

from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, get_type_hints

import typer

from rot_data.terminal import wide_help_when_piped

from rot_data import registry


class DeepSpeedNoise(logging.Filter):
    """DeepSpeed's log lines that tell a user of this trainer nothing: 'Setting accelerator to CPU' (logged by every
    process that imports DeepSpeed on a machine without a GPU) and 'Attempting to get learning rate from scheduler
    before it has started' (logged by the warm-up scheduler's own constructor on every run). Every other line stays."""

    NOISE = ("Setting accelerator to CPU", "Attempting to get learning rate from scheduler before it has started")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(noise in record.getMessage() for noise in self.NOISE)


# before anything imports DeepSpeed: the logger it sets up at import is this one, and it keeps the filter
logging.getLogger("DeepSpeed").addFilter(DeepSpeedNoise())

from rot_train.config import COMMANDS, Command, TrainConfig, from_file  # noqa: E402
from rot_model.shard_stream import ShardError  # noqa: E402 (DeepSpeed is imported from here on)
from rot_train.train import run  # noqa: E402

wide_help_when_piped()
app = typer.Typer(add_completion=False)


@app.callback(help="Train RoT from shards (rot-render build) under the DeepSpeed launcher, from any directory: "
              "deepspeed --module rot_train stage2 --shards ... (python -m rot_train ... runs one process).")
def launcher_options(local_rank: int = typer.Option(0, "--local_rank", "--local-rank", hidden=True)) -> None:
    """``deepspeed --module`` passes ``--local_rank=N`` before the subcommand; the rank is read from LOCAL_RANK."""


REQUIRED = ("shards", "out")  # required, on the command line or in --config (so not required by the parser itself)


def command_options(command: Command) -> list[inspect.Parameter]:
    """The command's options as typer parameters, made from the config's fields: name, type, default, help."""
    types = get_type_hints(TrainConfig)
    defaults = command.defaults()
    params = []
    for f in command.fields():
        required = f.name in REQUIRED
        option = typer.Option(None if required else defaults[f.name], show_default=f.metadata["show_default"] or not required,
                              help=f.metadata["help"] + (" (required: here or in --config)" if required else ""))
        annotation = Optional[str] if required else types[f.name]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def given_values(ctx: typer.Context, config: Optional[Path], command: Command, flags: dict) -> dict:
    """The run's options: the command's defaults, then the --config file's values, then the flags given on the command
    line. The file's values go through the same conversion as the flags (``lr: 2e-5`` is a float, as ``--lr 2e-5``)."""
    values = command.defaults()
    if config is not None:
        params = {p.name: p for p in ctx.command.params}
        for name, value in from_file(config, command).items():
            try:
                values[name] = None if value is None else params[name].process_value(ctx, value)
            except typer.BadParameter as error:
                raise ValueError(f"--config {config}: {name}: {error.message}") from None
    values.update({name: value for name, value in flags.items()
                   if ctx.get_parameter_source(name).name == "COMMANDLINE"})
    for name in REQUIRED:
        if values[name] is None:
            raise ValueError(f"--{name} is required: give it on the command line or in --config")
    return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}


def train_command(command: Command) -> Callable:
    """The command's function: its signature (the options typer shows) is made from the config's fields."""

    def main(ctx: typer.Context, config: Optional[Path] = None, local_rank: int = 0, **flags) -> None:
        try:  # bad options (TrainConfig.validate, --config files) and bad shards end with a one-line error
            values = given_values(ctx, config, command, flags)
            cfg = TrainConfig(stage=command.stage, **dict({"mode": command.mode}, **values))
            if cfg.command is not command:  # `sft --mode rot` would be a Stage II run
                raise ValueError(f"--mode {cfg.mode}: rot-train {command.name} trains {command.mode} (or sft-nocot); "
                                 f"the {cfg.mode} run is rot-train {cfg.command.name}")
            run(cfg)
        except (ShardError, FileNotFoundError, ValueError) as error:
            typer.secho(f"error: {error}", fg="red", err=True)
            raise typer.Exit(1)

    fixed = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
             inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
                 None, help="a YAML file of option values under the options' names (global_batch: 128), or a run's "
                 "run.json; flags given here override it (rot_train/configs: the official Qwen3-VL-4B runs)")),
             inspect.Parameter("local_rank", inspect.Parameter.KEYWORD_ONLY, annotation=int, default=typer.Option(
                 0, "--local_rank", "--local-rank", hidden=True, help="set by the deepspeed launcher"))]
    main.__signature__ = inspect.Signature(fixed + command_options(command))
    return main


for _command in COMMANDS.values():
    app.command(_command.name, help=_command.help)(train_command(_command))


@app.command("compact", help="A copy of a --full-finetune export in a few MB, for shipping or carrying: its LLM weights "
             "as 8- or 4-bit differences from the base it was trained from (which must be installed to load it), its head bf16.")
def compact_command(
    export: str = typer.Argument(..., help="the export folder (<--out>/export) of a --full-finetune Stage II or SFT run"),
    out: str = typer.Option(..., help="the new folder; it loads wherever an export does"),
    base: str = typer.Option(registry.ANCHOR, help="the backbone the run started from (--backbone of its first stage)"),
    bits: int = typer.Option(8, help="8: the weights as trained, within bf16 rounding; 4: half the size, lossier (measure it)"),
) -> None:
    from rot_model.export import compact

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
