"""``loom bench quality`` in-process: every method builds its MODEL/CONDITIONING with the real Loom nodes on the
playground model, samples through ComfyUI and is scored; the grid holds one tile per case and method; the CLI
prints JSON and writes the CSV and the grid."""
import csv
import dataclasses
import json

import folder_paths
import numpy as np
import pytest
import torch
from lora_loom.bench import quality
from lora_loom.cli import main
from lora_loom.cli.bench_quality import format_concept_table, format_group_table, format_quality_table
from lora_loom.playground.model import LORA_DIR, load_playground
from PIL import Image

CASE = "striped-star-ring/blue-red"


@pytest.fixture(scope="module")
def report() -> quality.QualityReport:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and stays fast on a shared machine
    try:
        return quality.run_quality(quality.QualityConfig(cases=(CASE,), seeds=1, steps=4))
    finally:
        torch.set_num_threads(threads)


def test_rows_come_in_method_order_and_the_loras_folder_is_restored(report):
    assert [r.method for r in report.rows] == list(quality.METHODS)
    assert str(LORA_DIR) not in folder_paths.get_folder_paths("loras")


@pytest.mark.parametrize("method", quality.METHODS)
def test_every_method_samples_and_is_scored(report, method):
    row = next(r for r in report.rows if r.method == method)
    assert row.error == ""
    assert row.images == 1 and row.seconds_per_image > 0
    for rate in (row.presence, row.clean, row.complete, row.vanishing, row.confusion, row.leakage):
        assert 0.0 <= rate <= 1.0
    assert row.clean <= row.presence
    (score,) = report.scores[method]
    assert len(score.present) == 2 and len(score.vanished) == len(score.confused) == 3
    image = report.samples[(CASE, method)]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("method", ["merged", "switch", "composite", "regional", "regional+refine",
                                    "regional@0.4"])
def test_lora_methods_change_the_image(report, method):
    assert not np.array_equal(report.samples[(CASE, method)], report.samples[(CASE, "base")])


def test_grid_has_one_tile_per_case_and_method(report):
    grid = quality.grid_image(report)
    cell = 64 * quality.GRID_SCALE + quality.GRID_GAP
    assert grid.size == (quality.GRID_LABEL_WIDTH + len(quality.METHODS) * cell, quality.GRID_HEADER + cell)
    column = quality.METHODS.index("regional")
    left, top = quality.GRID_LABEL_WIDTH + column * cell, quality.GRID_HEADER
    tile = np.asarray(grid)[top:top + 64 * quality.GRID_SCALE, left:left + 64 * quality.GRID_SCALE]
    expected = (np.clip(report.samples[(CASE, "regional")], 0, 1) * 255).round().astype(np.uint8)
    assert np.array_equal(tile[::quality.GRID_SCALE, ::quality.GRID_SCALE], expected)


def test_unknown_cases_splits_and_methods_are_refused():
    with pytest.raises(quality.QualityError, match="no case 'moon'"):
        quality.QualityConfig(cases=("moon",)).validate()
    with pytest.raises(quality.QualityError, match="not one of"):
        quality.QualityConfig(split="test").validate()
    with pytest.raises(quality.QualityError, match="heldout"):
        quality.QualityConfig(cases=(CASE,), split="heldout").validate()
    with pytest.raises(quality.QualityError, match=r"\['regions'\] are not Loom Compose inputs"):
        quality.QualityConfig(compose=(("base_ratio", 0.0), ("regions", 1))).validate()
    with pytest.raises(quality.QualityError, match=r"\['prompt'\] are not Loom CLoRA inputs"):
        quality.QualityConfig(clora=(("prompt", "x"),)).validate()


def test_compose_overrides_reach_the_node():
    """An ablation's override changes the sampled image; the node default given explicitly does not."""
    config = quality.QualityConfig(cases=(CASE,), seeds=1, steps=3, methods=("regional",))
    playground = load_playground()
    case = config.selected_cases()[0]
    with quality.playground_loras():
        images = [quality.generate(*quality.method_setup("regional", playground, case, c), 0, c)
                  for c in (config, dataclasses.replace(config, compose=(("base_ratio", 0.2),)),
                            dataclasses.replace(config, compose=(("base_ratio", 0.0),)))]
    assert np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])
    with pytest.raises(quality.QualityError, match="hooks"):
        quality.QualityConfig(methods=("base", "hooks")).validate()


def test_cli_prints_json_and_writes_csv_and_grid(tmp_path, capsys):
    out_csv, out_grid = tmp_path / "quality.csv", tmp_path / "grid.png"
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "quality", "--cases", "ring-star/blue-yellow", "--seeds", "1", "--steps", "2",
                     "--methods", "base,merged", "--threads", "1", "--json", "--csv", str(out_csv),
                     "--grid", str(out_grid)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["cases"] == ["ring-star/blue-yellow"] and printed["config"]["cfg"] == 3.0
    assert [r["method"] for r in printed["rows"]] == ["base", "merged"]
    assert all(r["images"] == 1 and r["error"] == "" for r in printed["rows"])
    with out_csv.open() as handle:
        assert [r["method"] for r in csv.DictReader(handle)] == ["base", "merged"]
    assert Image.open(out_grid).size == (quality.GRID_LABEL_WIDTH + 2 * (128 + quality.GRID_GAP),
                                         quality.GRID_HEADER + 128 + quality.GRID_GAP)


def test_table_has_a_line_per_method_and_lists_errors_below(report):
    rows = [*report.rows[:2], dataclasses.replace(report.rows[2], error="ValueError: boom")]
    lines = format_quality_table(rows).splitlines()
    assert lines[0].split() == ["method", "images", "present", "clean", "vanished", "confused", "leakage",
                                "s/image"]
    assert lines[2].split()[:2] == ["base", "1"] and lines[3].split()[0] == "merged"
    assert lines[4].split() == ["switch", "0", "-", "-", "-", "-", "-", "failed"]
    assert lines[5] == "switch failed: ValueError: boom"


def test_split_seeds_and_groups():
    config = quality.QualityConfig(split="heldout", seeds=2, steps=1, methods=("base", "merged"),
                                   cases=("star-ring/blue-red", "bars-plain/red-blue"))
    playground = load_playground()
    report = quality.run_quality(config, playground)
    assert [c.split for c in config.selected_cases()] == ["heldout", "heldout"]
    case = config.selected_cases()[0]
    first = quality.generate(*quality.method_setup("base", playground, case), 1000, config)
    assert np.array_equal(report.samples[(case.name, "base")], first)  # held-out seeds start at 1000
    lines = format_group_table(report).splitlines()
    assert lines[0].split()[-4:] == ["heldout", "interfering", "heldout", "non-interfering"] and len(lines) == 4
    for method in ("base", "merged"):
        interfering = report.rates(method, lambda case: case.interfering)
        assert interfering.images == 2 and report.rates(method).images == 4
        cells = next(line for line in lines if line.split()[0] == method).split()[1:]
        assert cells[:2] == [f"{interfering.presence:.2f}", f"{interfering.clean:.2f}"]


def test_concept_vanishing_counts_each_concept_over_its_cases(report):
    table = quality.concept_vanishing(report)
    assert set(table) == set(quality.METHODS)
    for method, row in table.items():
        (score,) = report.scores[method]
        assert row == {name: float(gone) for name, gone in zip(quality.case_named(CASE).concepts, score.vanished)}
    lines = format_concept_table({"merged": {"ring": 0.25, "star": 0.5}, "base": {"star": 1.0}}).splitlines()
    assert lines[0].split() == ["vanished", "per", "concept", "ring", "star"]
    assert lines[2].split() == ["merged", "0.25", "0.50"] and lines[3].split() == ["base", "-", "1.00"]
