"""The docs stay true to the tree: every relative link and cited path exists, every command in the README parses
against the command line it names, and the README stays short (the standards: it works as written from a fresh
clone)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "packages/rot_data/models").glob("*/README.md")), ROOT / "packages/rot_data/data/README.md"]
CLIS = {"rot-render": "rot_render.cli", "rot-eval": "rot_eval.cli", "rot-train": "rot_train.launch",
        "rot-anchor": "rot_anchor.cli"}

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INDENTED = re.compile(r"^(?: {4}|\t).*$", re.M)  # indented code blocks (never list continuations here: those use 2)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)
REPO_PATH = re.compile(r"^(docs|packages|pipelines|benchmarks|tests|rot_[a-z]+)/[\w./{},*-]*$")


def prose(text: str) -> str:
    """The text with code blocks and inline code removed: links and paths inside code are examples, not links."""
    return re.sub(r"`[^`\n]*`", "", INDENTED.sub("", FENCE.sub("", text)))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path.read_text())) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(path):
            broken.append(f"{target}: no heading '#{anchor}' in {path.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def expand(path: str) -> list[str]:
    """`piece{1,2}.jsonl` -> both names (the model cards cite files that way)."""
    match = re.search(r"\{([^}]*)\}", path)
    if not match:
        return [path]
    return [name for part in match.group(1).split(",")
            for name in expand(path[:match.start()] + part + path[match.end():])]


def cited_path_exists(cited: str) -> bool:
    base = ROOT if not cited.startswith("rot_") else ROOT / "packages"  # rot_x/... is a module path under packages/
    return all(any(base.glob(name)) if "*" in name else (base / name).exists() for name in expand(cited))


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name != "CHANGELOG.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_paths_exist(doc: Path) -> None:
    """Paths written as code (`docs/data/x.json`, `rot_train/flops.py`, `bash pipelines/x.sh`) exist: the model cards
    cite files this way, and a moved file must not leave its old name in the docs. The CHANGELOG names files of the
    past on purpose."""
    code = re.findall(r"`([^`\n]+)`", FENCE.sub("", doc.read_text()))
    cited = {word for snippet in code for word in snippet.split() if REPO_PATH.match(word)}
    missing = sorted(c for c in cited if not cited_path_exists(c))
    assert not missing, f"{doc.relative_to(ROOT)} cites paths that do not exist: {missing}"


def test_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines <= 160, f"README.md has {lines} lines: keep it under ~150 and move detail to docs/"


def readme_commands() -> list[list[str]]:
    """Every command of the README's bash blocks as argv lists (continuation lines joined, comments dropped, split at
    &&, ; and |)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv: list[str] = []
            for token in shlex.split(line, comments=True) + ["&&"]:
                if token in ("&&", ";", "|", "||"):
                    if argv:
                        commands.append(argv)
                    argv = []
                else:
                    argv.append(token)
    return commands


def cli_call(argv: list[str]) -> tuple[str, list[str]] | None:
    """(CLI module, its arguments) for a command of this project, else None: rot-* scripts, `deepspeed ... --module
    rot_train`, `python -m rot_train` and the command after `ray job submit ... --`."""
    if argv[0] in CLIS:
        return CLIS[argv[0]], argv[1:]
    if argv[0] == "ray" and "--" in argv:
        return cli_call(argv[argv.index("--") + 1:])
    for flag in ("--module", "-m"):
        if flag in argv and argv[argv.index(flag) + 1] == "rot_train":
            return CLIS["rot-train"], argv[argv.index(flag) + 2:]
    return None


def test_readme_commands_parse() -> None:
    """Each project command in the README has a real subcommand, real options and its required arguments (parsed by
    the command's own parser, not run); each `bash <script>` names a script in the tree."""
    checked, failures = 0, []
    for argv in readme_commands():
        if argv[0] == "bash":
            if not (ROOT / argv[1]).is_file():
                failures.append(f"{shlex.join(argv)}: no script {argv[1]}")
            continue
        call = cli_call(argv)
        if call is None:
            continue
        module, args = call
        group = typer.main.get_command(importlib.import_module(module).app)
        name, *rest = args
        if name not in group.commands:
            failures.append(f"{shlex.join(argv)}: {module} has no command '{name}'")
            continue
        try:
            group.commands[name].make_context(name, list(rest)).close()
        except Exception as error:  # the parser's usage errors, e.g. "No such option: --ds-config"
            failures.append(f"{shlex.join(argv)}: {error}")
        checked += 1
    assert checked >= 20, f"only {checked} project commands found in the README's bash blocks"
    assert not failures, "\n".join(failures)
