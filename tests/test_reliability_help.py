"""Issue 30.3: help a user can read when piped (`rot-train stage1 --help | less`), one name per option, and the dataset
names the commands accept said as they are."""

import json
import subprocess
import sys

# Run in a child whose stdout is a pipe, as `--help | less`: every command's help as Typer renders it, and its options
HELP = """
import click, json, pathlib, typer
from typer.testing import CliRunner
from rot_anchor.cli import app as anchor
from rot_eval.cli import app as evaluate
from rot_render.cli import app as render
from rot_train.launch import app as train

found = {}
for program, app in (("rot-render", render), ("rot-train", train), ("rot-eval", evaluate), ("rot-anchor", anchor)):
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        text = CliRunner().invoke(app, [name, "--help"], terminal_width=None).output
        options = [[o for o in p.opts if o.startswith("--")] for p in command.params
                   if isinstance(p, click.Option) and not p.hidden]
        written = [str(p.default) for p in command.params if isinstance(p.default, pathlib.PurePath)]
        found[f"{program} {name}"] = {"help": text, "options": options, "default_paths": written}
print(json.dumps(found))
"""


def _helps() -> dict:
    result = subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_command_help_keeps_names_whole_and_gives_each_option_one_name():
    from rot_data.records import BUILTIN_SOURCES

    helps = _helps()
    assert {"rot-render build", "rot-train stage1", "rot-eval run", "rot-anchor evaluate"} <= set(helps)
    for command, found in helps.items():
        assert "…" not in found["help"], (command, [line for line in found["help"].splitlines() if "…" in line])
        for names in found["options"]:
            assert len(names) == 1, f"{command}: {names} (one name per option)"
    assert "--ds-config" in helps["rot-train stage1"]["help"] and "--deepspeed-config" not in helps["rot-train stage1"]["help"]
    for command in ("rot-render build", "rot-eval run"):  # every built-in name, and which split is not shipped
        text = " ".join(helps[command]["help"].replace("│", " ").split())  # a wrapped line is joined across the box's rule
        assert all(name in text for name in BUILTIN_SOURCES), command
        assert "icot_gsm8k train needs --data-dir" in text and "icot_* (need --data-dir)" not in text


def test_every_file_a_command_writes_by_default_is_ignored_by_git():
    """`rot-eval viz` without --out writes viz/, `rot-eval readback` readback/, ...: run from the repository root, none of
    them shows up as a new file in `git status`."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    defaults = sorted({path for found in _helps().values() for path in found["default_paths"]})
    assert {"viz", "readback", "line.png", "anchor-eval.json"} <= set(defaults)
    for path in defaults:  # a file, or a folder (a pattern ending in / matches only a path ending in /)
        ignored = [subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=root).returncode == 0
                   for name in (path, path + "/")]
        assert any(ignored), f"{path} (a default output) is not in .gitignore"
