"""Multi-digit multiplication in the implicit-CoT format (Deng et al.), generated.

A line is ``question||cot #### answer`` with every number written digit by digit, least
significant digit first::

    5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + ... #### 5 5 6 0 8 2 0 1

The CoT lists the partial products ``a * b_i * 10^i`` (``n + 1 + i`` digits), with the running sum
in parentheses after each partial product from the second on, except the last: the answer is that
last sum. The shared valid/test files use this format; their training files are not available
offline, so training data is generated here (and a test checks that the generator reproduces
every shared line exactly).
"""

from __future__ import annotations

import random
from pathlib import Path


def digits(value: int, width: int) -> str:
    """``value`` as ``width`` space-separated digits, least significant first (zero-padded)."""
    text = str(value).zfill(width)
    if len(text) > width:
        raise ValueError(f"{value} has more than {width} digits")
    return " ".join(reversed(text))


def line(a: int, b: int, n: int) -> str:
    """The implicit-CoT line of ``a * b`` for ``n``-digit operands."""
    b_digits = [int(d) for d in reversed(str(b).zfill(n))]
    partials = [a * d * 10**i for i, d in enumerate(b_digits)]
    steps, total = [], 0
    for i, partial in enumerate(partials):
        total += partial
        step = digits(partial, n + 1 + i)
        if 0 < i < n - 1:
            step += f" ( {digits(total, n + 1 + i)} )"
        steps.append(step)
    return f"{digits(a, n)} * {digits(b, n)}||{' + '.join(steps)} #### {digits(a * b, 2 * n)}"


def question_of(text_line: str) -> str:
    return text_line.split("||", 1)[0].strip()


def excluded_questions(files) -> set[str]:
    """The questions of the given implicit-CoT files (e.g. the shared valid and test sets)."""
    questions = set()
    for path in files:
        for text in Path(path).read_text().splitlines():
            if "||" in text:
                questions.add(question_of(text))
    return questions


def random_line(n: int, rng: random.Random) -> str:
    """A uniformly random ``n x n`` product, operands in [10^(n-1), 10^n - 1]."""
    return line(rng.randint(10 ** (n - 1), 10**n - 1), rng.randint(10 ** (n - 1), 10**n - 1), n)


def generate(n: int, count: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """``count`` distinct ``n x n`` lines whose questions are not in ``exclude``."""
    rng, seen, lines = random.Random(seed), set(exclude), []
    space = (9 * 10 ** (n - 1)) ** 2
    if count > space - len(exclude):
        raise ValueError(f"only {space - len(exclude)} distinct {n}x{n} questions exist outside the excluded ones; ask for fewer")
    while len(lines) < count:
        text = random_line(n, rng)
        question = question_of(text)
        if question not in seen:
            seen.add(question)
            lines.append(text)
    return lines
