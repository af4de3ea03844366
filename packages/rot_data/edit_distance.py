"""Levenshtein distance between two strings, for scoring transcriptions (the anchor's reading, read-back latents)."""

from __future__ import annotations


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (Myers' bit-parallel algorithm: one pass over ``b`` with ``a`` as bit masks)."""
    if a == b:
        return 0
    if not a or not b:
        return max(len(a), len(b))
    masks: dict[str, int] = {}
    for i, char in enumerate(a):
        masks[char] = masks.get(char, 0) | 1 << i
    full, top = (1 << len(a)) - 1, 1 << (len(a) - 1)
    positive, negative, score = full, 0, len(a)
    for char in b:
        eq = masks.get(char, 0)
        xv = eq | negative
        xh = (((eq & positive) + positive) ^ positive) | eq
        ph = (negative | ~(xh | positive)) & full
        mh = positive & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph, mh = ((ph << 1) | 1) & full, (mh << 1) & full
        positive, negative = (mh | ~(xv | ph)) & full, ph & xv
    return score
