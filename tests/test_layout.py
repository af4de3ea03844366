"""The packages import one way (docs/architecture.md, "Layout"): each layer imports only the layers below it, never a
peer or a layer above, and the drawing in docs/architecture.md is the import graph as it is.

Every import of every module is read with ``ast``, those inside functions too (the lazy imports that keep a command's
start fast are imports all the same). ``python -m tests.test_layout [packages folder]`` prints the offending imports of
another tree (an old checkout, say) without running its code.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# bottom to top; a package imports its own modules and the packages of the layers below its own, nothing else
LAYERS = [
    ("rot_data",),  # the ground: records, shard contract, shipped models by name, special tokens, version shims
    ("rot_vision",),  # text -> rendered line -> visual embeddings, and a VLM reading them back
    ("rot_model",),  # the RoT model that training and evaluation both use
    ("rot_train", "rot_eval", "rot_render", "rot_anchor"),  # the four commands' packages, none importing another
    ("rot_fixtures",),  # tiny models for tests and benchmarks: may import any package, and none imports it
]
LAYER_OF = {package: index for index, layer in enumerate(LAYERS) for package in layer}


def imports_of(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in a module, at any depth; a relative import resolved within its package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, package if node.level else node.module))
    return found


def package_imports(packages: Path) -> list[tuple[str, int, str, str]]:
    """(module path, line, importing package, imported package) for every import of one of our packages."""
    ours = {p.parent.name for p in packages.glob("*/__init__.py")}
    edges = []
    for path in sorted(packages.glob("*/**/*.py")):
        package = path.relative_to(packages).parts[0]
        for line, module in imports_of(path, package):
            target = module.split(".")[0]
            if target in ours:
                edges.append((str(path.relative_to(packages)), line, package, target))
    return edges


def violations(packages: Path) -> list[str]:
    """One line per import that points sideways or up, naming the module, the line and what it imports."""
    unplaced = sorted(init.parent.name for init in packages.glob("*/__init__.py") if init.parent.name not in LAYER_OF)
    problems = [f"{name}/: a package no layer names; place it in LAYERS (tests/test_layout.py) and in docs/architecture.md"
                for name in unplaced]
    for module, line, package, target in package_imports(packages):
        if package == target or package not in LAYER_OF or target not in LAYER_OF:
            continue
        if LAYER_OF[target] >= LAYER_OF[package]:
            allowed = sorted(p for p in LAYER_OF if LAYER_OF[p] < LAYER_OF[package]) or ["nothing of ours"]
            where = "a peer" if LAYER_OF[target] == LAYER_OF[package] else "a layer above"
            problems.append(f"{module}:{line} imports {target} ({where}); {package} may import only {', '.join(allowed)}")
    return problems


def drawn_edges(markdown: str) -> set[tuple[str, str]]:
    """The ``a --> b`` arrows of the mermaid drawing in docs/architecture.md ("a imports b")."""
    blocks = re.findall(r"^```mermaid\n(.*?)^```", markdown, re.M | re.S)
    return {(a, b) for block in blocks for a, b in re.findall(r"^\s*(rot_\w+)\s*-->\s*(rot_\w+)\s*$", block, re.M)}


def test_imports_point_down_only():
    problems = violations(ROOT / "packages")
    assert not problems, "imports that point sideways or up:\n" + "\n".join(problems)


def test_the_drawing_is_the_import_graph():
    """Every arrow drawn is an import that exists, and every package-to-package import is drawn."""
    actual = {(package, target) for _, _, package, target in package_imports(ROOT / "packages") if package != target}
    drawn = drawn_edges(ARCHITECTURE.read_text())
    assert drawn, "docs/architecture.md has no mermaid drawing of the packages (lines 'rot_a --> rot_b')"
    assert drawn == actual, (f"docs/architecture.md's drawing differs from the imports: drawn but not imported "
                             f"{sorted(drawn - actual)}, imported but not drawn {sorted(actual - drawn)}")


def test_the_check_catches_a_wrong_import(tmp_path):
    """A peer import, an upward import inside a function and an unplaced package are each named with their line."""
    for package in ("rot_data", "rot_vision", "rot_train", "rot_eval", "rot_new"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "rot_data" / "shards.py").write_text("import json\n\n\ndef late():\n    from rot_vision import render\n")
    (tmp_path / "rot_eval" / "cli.py").write_text("from rot_data import shards\nfrom rot_train.config import TrainConfig\n")
    (tmp_path / "rot_vision" / "render.py").write_text("from . import tower\nimport rot_data.records\n")
    assert violations(tmp_path) == [
        "rot_new/: a package no layer names; place it in LAYERS (tests/test_layout.py) and in docs/architecture.md",
        "rot_data/shards.py:5 imports rot_vision (a layer above); rot_data may import only nothing of ours",
        "rot_eval/cli.py:2 imports rot_train (a peer); rot_eval may import only rot_data, rot_model, rot_vision",
    ]


if __name__ == "__main__":
    found = violations(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "packages")
    print("\n".join(found) or "imports point one way")
    sys.exit(1 if found else 0)
