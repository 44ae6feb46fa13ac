"""Numbers a workflow carries (strengths, block weights, boxes, keyframes, schedule weights): each is checked
here, finite and within its range, with an error naming the field, before it reaches a model. NaN slips
through comparisons (``not 0 <= nan <= 1`` is False), so finiteness is always checked first.

``STRENGTH_LIMIT`` is ComfyUI's own limit for LoRA strengths (``LoraLoader``: -100 ... 100); block weights and
gate values multiply strengths, so they get the same bound.
"""
from __future__ import annotations

import math
from typing import Any

STRENGTH_LIMIT = 100.0


def checked_number(value: Any, where: str, low: float = -STRENGTH_LIMIT, high: float = STRENGTH_LIMIT,
                   error: type[ValueError] = ValueError) -> float:
    """``value`` as a float if it is a real number (not a bool), finite and in ``[low, high]``; otherwise
    ``error(f"{where} ...")`` saying what was expected and what was given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{where} must be a number, got {value!r}"[:300])
    number = float(value) if not isinstance(value, int) or abs(value) < 2 ** 1023 else math.inf
    if not math.isfinite(number):
        raise error(f"{where} must be a finite number, got {value!r}"[:300])
    if not low <= number <= high:
        raise error(f"{where} must lie in [{low:g}, {high:g}], got {number:g}")
    return number
