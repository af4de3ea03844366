"""Make the anchor's English reading corpus from the Python documentation that ships with CPython.

Why this text: it is varied, well-edited English prose (with the punctuation and code-like words that
real CoTs hold), it is on every machine that runs this project, and its licence (PSF-2.0) allows
redistribution. The output is shipped (``packages/rot_data/data/english/``) so that every machine trains
and evaluates on the same lines whatever its Python version.

Two disjoint splits by topic (no paragraph of a held-out topic is ever trained on):
- ``train.txt.gz``: paragraphs of most ``pydoc_data`` topics and the docstrings of the standard library's modules;
- ``heldout.txt``: 1000 lines (sentences and whole paragraphs) of the other topics: the anchor's
  "English it never read" figure.

python pipelines/make_english_corpus.py --out packages/rot_data/data/english
"""

from __future__ import annotations

import gzip
import importlib
import random
import re
import sys
from pathlib import Path

HELDOUT_EVERY = 6  # every 6th topic (sorted by name) is held out
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "__hello__", "__phello__"}


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs, each on one line: headings, rules, code blocks (indented) and grammar rules dropped."""
    out, current = [], []
    for line in text.splitlines() + [""]:
        prose = line.strip() and not line.startswith((" ", "\t")) and not re.fullmatch(r"[*=\-~^]+", line.strip())
        if prose:
            current.append(line.strip())
        elif current:
            paragraph = " ".join(current)
            if len(paragraph) >= 40 and " " in paragraph:
                out.append(paragraph)
            current = []
    return out


def docstrings() -> list[str]:
    out = []
    for name in sorted(set(sys.stdlib_module_names) - SKIP):
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-only modules (winreg, msvcrt, ...)
            continue
        texts = [module.__doc__] + [getattr(v, "__doc__", None) for k, v in sorted(vars(module).items())
                                    if not k.startswith("_") and callable(v)]
        for text in texts:
            out += paragraphs(text) if isinstance(text, str) else []
    return out


def sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", paragraph) if len(s) >= 20]


def main(out: Path) -> None:
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)  # importing typing.io and the like
    from pydoc_data.topics import topics

    names = sorted(topics)
    heldout_names = set(names[::HELDOUT_EVERY])
    train = [p for n in names if n not in heldout_names for p in paragraphs(topics[n])] + docstrings()
    heldout = [p for n in names if n in heldout_names for p in paragraphs(topics[n])]
    train = list(dict.fromkeys(p for p in train if p not in set(heldout)))
    rng = random.Random(0)
    lines = [s for p in heldout for s in sentences(p)]
    rng.shuffle(lines)
    whole = [p for p in heldout if len(p) <= 1200]
    rng.shuffle(whole)
    chosen = lines[:800] + whole[:200]
    rng.shuffle(chosen)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / "train.txt.gz", "wt", encoding="utf-8", compresslevel=9) as f:
        f.write("\n".join(train) + "\n")
    (out / "heldout.txt").write_text("\n".join(chosen) + "\n", encoding="utf-8")
    print(f"{len(train)} training paragraphs ({sum(map(len, train))} characters), {len(chosen)} held-out lines "
          f"from {len(heldout_names)} topics never trained on (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main(Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else Path("packages/rot_data/data/english"))
