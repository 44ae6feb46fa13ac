"""Argument types shared by every ``loom`` command and ``python -m lora_loom.playground.train``: numbers are
checked (finite, within a range) when the command line is parsed, so ``--strength nan`` or ``-k -5`` stop with
argparse's usage error naming the option, never a traceback or a NaN written to disk; ``--force`` is the one way
to replace an existing output file."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

SEED_MAX = 2 ** 63 - 1


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting whole numbers in ``[low, high]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float, *, open_low: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` accepting finite numbers in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < low or value > high or (open_low and value == low):
            bracket = "(" if open_low else "["
            raise argparse.ArgumentTypeError(f"must lie in {bracket}{low:g}, {high:g}], got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def add_force(parser: argparse.ArgumentParser, what: str = "output files") -> None:
    """``--force``: replace existing ``what`` (never the command's own input)."""
    parser.add_argument("--force", action="store_true", help=f"replace existing {what} (never an input file)")
