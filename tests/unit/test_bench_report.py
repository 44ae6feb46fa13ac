"""Perf tables, CSV, goal checks and the PNG plot from hand-made rows (no ComfyUI, no timing)."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from lora_loom.bench.plot import plot_rows
from lora_loom.bench.report import (
    check_goals,
    format_goals,
    format_markdown,
    format_table,
    write_csv,
)
from PIL import Image


@dataclass(frozen=True)
class Row:
    resolution: int
    adapters: int
    regions: int
    method: str
    passes: int = 1
    step_ms: float = float("nan")
    step_ms_min: float = float("nan")
    step_ms_max: float = float("nan")
    ratio: float = float("nan")
    limit: float = float("nan")
    peak_mib: float = float("nan")
    note: str = ""
    image_tokens: int = 4096
    text_tokens: int = 77


def _rows(regional_ratio: float, regional_peak: float, resolution: int = 1024) -> list[Row]:
    """Regional carries 4 region prompts more (5 x 77 text tokens): its memory allowance scales by 4481/4173."""
    return [Row(resolution, 4, 4, "merged", 1, 100.0, 99.0, 101.0, 1.0, 1.0, 100.0),
            Row(resolution, 4, 4, "regional", 1, 100.0 * regional_ratio, 0, 0, regional_ratio, 1.03, regional_peak,
                text_tokens=385),
            Row(resolution, 4, 4, "hooks", 4, 420.0, 0, 0, 4.2, 4.0, 300.0),
            Row(resolution, 4, 4, "gates", note="gates: not available")]


@pytest.mark.parametrize(("ratio", "peak", "on_gpu", "met"), [
    (1.05, 120.0, True, [True, True]), (1.2, 120.0, True, [False, True]), (1.2, 120.0, False, [True, True]),
    (1.05, 900.0, True, [True, False]), (1.05, 1.5 * 100 * 4481 / 4173 + 63, True, [True, True]),
    (1.05, 1.5 * 100 * 4481 / 4173 + 65, True, [True, False])])
def test_goals(ratio: float, peak: float, on_gpu: bool, met: list[bool]) -> None:
    goals = check_goals(_rows(ratio, peak), on_gpu)
    assert [g.met for g in goals] == met
    assert ("MISSED" in format_goals(goals)) == (False in met)


def test_goal_not_measured_without_a_1024_row_on_gpu() -> None:
    goals = check_goals(_rows(1.0, 1.0, resolution=512), on_gpu=True)
    assert [g.met for g in goals] == [None] and "not measured" in format_goals(goals)


def test_table_markdown_and_csv(tmp_path: Path) -> None:
    rows = _rows(1.08, 120.0)
    table = format_table(rows, "title")
    assert table.splitlines()[0] == "title" and "gates: not available" in table
    assert "0.95" in table and "4096+385" in table  # efficiency of regional: 1.03 / 1.08; its tokens
    assert format_markdown(rows).count("\n") == len(rows) + 1
    with write_csv(rows, tmp_path / "perf.csv").open() as handle:
        read = list(csv.DictReader(handle))
    assert [r["method"] for r in read] == ["merged", "regional", "hooks", "gates"]
    assert float(read[1]["efficiency"]) == pytest.approx(1.03 / 1.08)
    assert math.isnan(float(read[3]["efficiency"]))


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = plot_rows(_rows(1.08, 120.0) + [Row(512, 1, 1, "merged", ratio=1.0, limit=1.0)], tmp_path / "p.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 480
        assert len(image.convert("RGB").getcolors(maxcolors=4096) or []) > 3  # bars and ticks were drawn
    with pytest.raises(ValueError, match="no measured rows"):
        plot_rows([Row(512, 1, 1, "gates")], tmp_path / "q.png")
