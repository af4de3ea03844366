"""Pull the final answer out of generated text and compare it with the gold answer.

Numbers are compared as numbers ("1,000" == "1000.0", "$5.50" == "5.5", "3/4" == "0.75"); answers
that are not numbers (e.g. the digit strings of the multiplication sets) are compared as text with
whitespace normalised.
"""

from __future__ import annotations

import re
from fractions import Fraction

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")


def final_segment(text: str) -> str:
    """The part of a generation that holds the answer: after the last '####' or 'answer is', if any."""
    for marker in ("####", "answer is", "Answer:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    return text.strip()


def parse_number(text: str) -> float | None:
    """The last number in ``text`` ('$1,234.50 dollars' -> 1234.5, '-3/4' -> -0.75), or None."""
    matches = NUMBER.findall(text.replace("$", "").replace("\u2212", "-"))
    if not matches:
        return None
    token = matches[-1].replace(",", "").replace(" ", "")
    try:
        return float(Fraction(token)) if "/" in token else float(token)
    except (ValueError, ZeroDivisionError):
        return None


def is_correct(prediction: str, gold: str) -> bool:
    gold_text, predicted_text = " ".join(gold.split()), " ".join(final_segment(prediction).split())
    if predicted_text == gold_text:
        return True
    gold_number = parse_number(gold_text) if NUMBER.fullmatch(gold_text.replace(",", "").replace("$", "")) else None
    if gold_number is None:
        return False
    predicted_number = parse_number(predicted_text)
    return predicted_number is not None and abs(predicted_number - gold_number) <= 1e-4 * max(1.0, abs(gold_number))
