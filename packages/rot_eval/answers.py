"""Pull the final answer out of generated text and compare it with the gold answer.

Numbers are compared as numbers ("1,000" == "1000.0", "$5.50" == "5.5", "3/4" == "0.75"): whole numbers exactly,
others up to what float formatting can change (a relative 1e-15, a few float64 steps: GSM-Hard's targets are floats such as
3.3333333333333335, and its answers are large, so a looser tolerance would count answers off by hundreds as right); answers
that are not numbers (e.g. the digit strings of the multiplication sets) are compared as text with
whitespace normalised.
"""

from __future__ import annotations

import re
from fractions import Fraction

FLOAT_FORMATTING = 1e-15  # relative: what printing a float with fewer digits changes, nothing more
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
    if predicted_number is None:
        return False
    if predicted_number.is_integer() and gold_number.is_integer():
        return predicted_number == gold_number  # exact (floats hold whole numbers exactly up to 2**53)
    return abs(predicted_number - gold_number) <= FLOAT_FORMATTING * max(1.0, abs(gold_number))
