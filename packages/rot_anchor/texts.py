"""The lines the anchor learns to read besides multiplication: English prose, equations, random printable strings.

Why each: the main job renders GSM8k's natural-language solutions and the implicit-CoT equation lines, and a user's
own data may hold any character the font draws. Random strings over every printable character make sure no glyph
is unseen and that reading cannot lean on a language prior; English teaches the prior that real text has.
Sources ship in the package: GSM8k train (MIT) and the Python documentation's prose (PSF-2.0,
``rot_data/data/english``); the held-out English lines come from documentation topics never trained on.
"""

from __future__ import annotations

import gzip
import random
from functools import lru_cache

from rot_data.records import CALCULATOR_NOTE, PACKAGE_DATA, load_records

# Unicode punctuation and symbols a CoT may hold (those of GSM8k, and their usual neighbours); all in DejaVu Sans
UNICODE_SYMBOLS = "’‘“”–—−×÷€£¢¥°±²³¼½¾…•·éèñçü√≤≥≠≈"
PRINTABLE = "".join(chr(c) for c in range(33, 127)) + UNICODE_SYMBOLS  # every printable ASCII character but space


RULE_CHARACTERS = "-=_*.~#+"  # what tables, rules and leaders repeat (``+-----+``, ``=====``, ``.....``)


def run_word(rng: random.Random) -> str:
    """One character repeated 2-80 times, sometimes between table corners: reading it means counting glyphs."""
    character = rng.choice(RULE_CHARACTERS) if rng.random() < 0.7 else rng.choice(PRINTABLE)
    corner = rng.choice(("", "", "+", "|"))
    return corner + character * int(round(2 + 78 * rng.random() ** 2)) + corner


def printable_line(rng: random.Random, length: int, runs: float = 0.0) -> str:
    """About ``length`` characters of random printable 'words' (1-10 characters) separated by single spaces;
    a ``runs`` fraction of the words are runs of one character (training only: the evaluation set has none)."""
    words, size = [], 0
    while size < length:
        if runs and rng.random() < runs:
            word = run_word(rng)
        else:
            word = "".join(rng.choice(PRINTABLE) for _ in range(rng.randint(1, 10)))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:max(1, length)].strip() or rng.choice(PRINTABLE)


def _number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.6:
        return str(rng.randint(0, 10 ** rng.randint(1, 6)))
    if kind < 0.9:
        return f"{rng.uniform(0, 10 ** rng.randint(1, 4)):.{rng.randint(1, 3)}f}"
    return str(-rng.randint(1, 999))


def equation_line(rng: random.Random) -> str:
    """1-6 calculator notes in GSM8k-Aug's layout, ``<<a*b=c>> <<c-d=e>>``, with random numbers and operators."""
    notes = []
    for _ in range(rng.randint(1, 6)):
        terms = [_number(rng) for _ in range(rng.randint(2, 4))]
        expression = terms[0] + "".join(rng.choice("+-*/") + t for t in terms[1:])
        notes.append(f"<<{expression}={_number(rng)}>>")
    return " ".join(notes)


@lru_cache(maxsize=1)
def gsm8k_train() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(questions, solutions as the build renders them, solutions with calculator notes, equation-only CoTs)."""
    plain, _ = load_records("gsm8k", "train")
    noted, _ = load_records("gsm8k", "train", keep_calculator=True)
    equations = [" ".join(CALCULATOR_NOTE.findall(r.cot)) for r in noted]
    return (tuple(r.question for r in plain), tuple(r.cot for r in plain), tuple(r.cot for r in noted),
            tuple(e for e in equations if e))


@lru_cache(maxsize=1)
def english_paragraphs() -> tuple[str, ...]:
    with gzip.open(PACKAGE_DATA / "english" / "train.txt.gz", "rt", encoding="utf-8") as f:
        return tuple(line for line in f.read().splitlines() if line)


def heldout_english() -> list[str]:
    """Lines of documentation topics the anchor never trained on (its 'English it never read' figure)."""
    return [line for line in (PACKAGE_DATA / "english" / "heldout.txt").read_text(encoding="utf-8").splitlines() if line]


def word_span(text: str, rng: random.Random) -> str:
    """A random run of whole words, its length log-uniform: short and long lines alike."""
    words = text.split()
    count = min(len(words), max(1, int(round(len(words) ** rng.random()))))
    start = rng.randrange(len(words) - count + 1)
    return " ".join(words[start:start + count])


def english_line(rng: random.Random) -> str:
    questions, solutions, _, _ = gsm8k_train()
    source = rng.choices((english_paragraphs(), solutions, questions), weights=(0.5, 0.3, 0.2))[0]
    return word_span(rng.choice(source), rng)


def equations_text(rng: random.Random) -> str:
    """An equation line: GSM8k's calculator notes alone (the implicit-CoT layout), inside their solution text,
    or generated with random numbers."""
    _, _, noted, equations = gsm8k_train()
    kind = rng.random()
    if kind < 0.4:
        return rng.choice(equations)
    if kind < 0.7:
        return word_span(rng.choice(noted), rng)
    return equation_line(rng)


def long_line(rng: random.Random, pieces, characters: int) -> str:
    """Pieces from ``pieces(rng)`` joined until about ``characters`` long (the renderer cuts at --max-tokens)."""
    text = ""
    while len(text) < characters:
        text = f"{text} {pieces(rng)}".strip()
    return text
