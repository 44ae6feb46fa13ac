"""Tables, CSV and goal checks for :class:`~.perf.PerfRow` lists (pure: no torch, no ComfyUI).

Every table prints, per method, the measured ratio to the merged-LoRA step of the same cell next to the FLOP
limit, and ``eff`` = limit / ratio (1.0 = the method runs as fast as its arithmetic allows relative to merged).
"""
from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..files.writing import replaced_atomically

logger = logging.getLogger(__name__)

COLUMNS = (("resolution", "res", "{:d}"), ("adapters", "A", "{:d}"), ("regions", "R", "{:d}"),
           ("method", "method", "{}"), ("tokens", "tokens", "{}"), ("passes", "passes", "{:d}"),
           ("step_ms", "step ms", "{:.1f}"),
           ("step_ms_min", "min", "{:.1f}"), ("step_ms_max", "max", "{:.1f}"), ("ratio", "x merged", "{:.3f}"),
           ("limit", "limit", "{:.3f}"), ("efficiency", "eff", "{:.2f}"), ("peak_mib", "peak MiB", "{:.1f}"),
           ("note", "note", "{}"))


@dataclass(frozen=True)
class Goal:
    """One goal of the issue: ``name``, the measured ``value`` (None when not measured), ``target`` and ``met``."""

    name: str
    value: float | None
    target: float
    met: bool | None


def _value(row: Any, name: str) -> Any:
    if name == "tokens":
        return f"{row.image_tokens}+{row.text_tokens}" if getattr(row, "image_tokens", 0) else "-"
    if name == "efficiency":
        ratio, limit = row.ratio, row.limit
        return limit / ratio if ratio and not math.isnan(ratio) and not math.isnan(limit) else float("nan")
    return getattr(row, name)


def _cell(value: Any, spec: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return spec.format(value)


def format_table(rows: Sequence[Any], title: str = "") -> str:
    """A fixed-width text table (one line per row; ``-`` where a value was not measured)."""
    head = [label for _, label, _ in COLUMNS]
    body = [[_cell(_value(r, name), spec) for name, _, spec in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def format_markdown(rows: Sequence[Any]) -> str:
    """The same table as GitHub markdown (for BENCHMARKS.md)."""
    head = [label for _, label, _ in COLUMNS]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(_cell(_value(r, name), spec) for name, _, spec in COLUMNS) + " |" for r in rows]
    return "\n".join(out)


def write_csv(rows: Sequence[Any], path: Path) -> Path:
    """All fields of every row plus ``efficiency``; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError(f"{path}: no rows to write")
    names = [f.name for f in fields(rows[0])] + ["efficiency"]
    with replaced_atomically(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for r in rows:
            writer.writerow({**asdict(r), "efficiency": _value(r, "efficiency")})
    return path


def check_goals(rows: Sequence[Any], on_gpu: bool) -> list[Goal]:
    """The issue's goals: regional with 4 adapters in 4 regions ≤ 1.10× merged (GPU, at 1024²) or ≤ 1.25× (CPU,
    largest resolution run); its peak ≤ base + O(L): at most 1.5 × the merged peak scaled by the token ratio
    (regional tokens / merged tokens; region prompts add tokens) + 64 MiB. Linear growth in L itself is proven by
    the bridge memory test."""
    target = 1.10 if on_gpu else 1.25
    cells = [r for r in rows if r.method == "regional" and r.adapters == 4 and r.regions == 4
             and not math.isnan(r.ratio)]
    if on_gpu:
        cells = [r for r in cells if r.resolution == 1024]
    goals = []
    if not cells:
        goals.append(Goal(f"regional 4x4 <= {target}x merged", None, target, None))
        return goals
    best = max(cells, key=lambda r: r.resolution)
    goals.append(Goal(f"regional 4x4 <= {target}x merged at {best.resolution}px", best.ratio, target,
                      best.ratio <= target))
    merged = [r for r in rows if r.method == "merged" and (r.resolution, r.adapters, r.regions)
              == (best.resolution, best.adapters, best.regions)]
    if merged and not math.isnan(best.peak_mib):
        m = merged[0]
        tokens = (best.image_tokens + best.text_tokens) / max(1, m.image_tokens + m.text_tokens)
        bound = m.peak_mib * 1.5 * tokens + 64.0
        goals.append(Goal(f"regional peak <= 1.5 x merged peak x token ratio {tokens:.2f} + 64 MiB at "
                          f"{best.resolution}px", best.peak_mib, bound, best.peak_mib <= bound))
    return goals


def format_goals(goals: Sequence[Goal]) -> str:
    lines = []
    for g in goals:
        state = "not measured" if g.met is None else ("met" if g.met else "MISSED")
        value = "-" if g.value is None else f"{g.value:.3f}"
        lines.append(f"goal {g.name}: {value} (target {g.target:.3f}) {state}")
    return "\n".join(lines)


__all__ = ["COLUMNS", "Goal", "check_goals", "format_goals", "format_markdown", "format_table", "write_csv"]
