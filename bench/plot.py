"""A PNG bar chart of a perf run with PIL only: per cell, each method's ratio to merged, with its FLOP limit.

Bars are the measured ratios (log scale, 1× = merged); a black tick on each bar marks the method's limit, so a
bar far above its tick is overhead, not arithmetic. One group of bars per (resolution, adapters, regions) cell.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..files.writing import replaced_atomically

logger = logging.getLogger(__name__)

PALETTE = {"base": (150, 150, 150), "merged": (90, 90, 90), "regional": (31, 119, 180),
           "regional_noblend": (23, 190, 207), "gates": (44, 160, 44),
           "clora": (148, 103, 189), "hooks": (214, 39, 40), "dense_per_head": (255, 127, 14),
           "composite": (140, 86, 75)}
HEIGHT, MARGIN, BAR, GAP = 420, 60, 12, 18


def _y(ratio: float, top: float) -> float:
    """Pixel row of ``ratio`` on a log axis from 0.5× (bottom) to ``top``."""
    low = math.log(0.5)
    return HEIGHT - MARGIN - (math.log(max(ratio, 0.5)) - low) / (math.log(top) - low) * (HEIGHT - 2 * MARGIN)


def plot_rows(rows: Sequence[Any], path: Path, title: str = "step time / merged-LoRA step (ticks: FLOP limit)") -> Path:
    """Write the chart to ``path`` (PNG) and return it."""
    measured = [r for r in rows if not math.isnan(r.ratio)]
    if not measured:
        raise ValueError(f"{path}: no measured rows to plot")
    methods = list(dict.fromkeys(r.method for r in measured))
    cells = list(dict.fromkeys((r.resolution, r.adapters, r.regions) for r in measured))
    top = max(2.0, *(max(r.ratio, r.limit if not math.isnan(r.limit) else 0.0) for r in measured)) * 1.2
    group = len(methods) * BAR + GAP
    width = max(480, 2 * MARGIN + len(cells) * group + 160)
    image = Image.new("RGB", (width, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((MARGIN, 10), title, fill="black", font=font)
    for tick in (0.5, 1, 2, 4, 8, 16, 32, 64):
        if tick <= top:
            y = _y(tick, top)
            draw.line([(MARGIN, y), (width - 160, y)], fill=(225, 225, 225))
            draw.text((8, y - 6), f"{tick:g}x", fill="black", font=font)
    for c, cell in enumerate(cells):
        x0 = MARGIN + c * group
        for m, method in enumerate(methods):
            row = next((r for r in measured if (r.resolution, r.adapters, r.regions) == cell and r.method == method),
                       None)
            if row is None:
                continue
            x = x0 + m * BAR
            draw.rectangle([x, _y(row.ratio, top), x + BAR - 2, _y(0.5, top)], fill=PALETTE.get(method, (0, 0, 0)))
            if not math.isnan(row.limit):
                y = _y(row.limit, top)
                draw.line([(x - 1, y), (x + BAR - 1, y)], fill="black", width=2)
        draw.text((x0, HEIGHT - MARGIN + 6), f"{cell[0]}px", fill="black", font=font)
        draw.text((x0, HEIGHT - MARGIN + 20), f"A{cell[1]} R{cell[2]}", fill="black", font=font)
    for m, method in enumerate(methods):
        y = MARGIN + m * 16
        draw.rectangle([width - 150, y, width - 140, y + 10], fill=PALETTE.get(method, (0, 0, 0)))
        draw.text((width - 134, y - 1), method, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as temporary:
        image.save(temporary, format="PNG")
    return path


__all__ = ["PALETTE", "plot_rows"]
