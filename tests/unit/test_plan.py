"""Plan: Loom Compose's options and the rules they imply, token masks (boxes, masks, odd sizes), text spans and
every error case."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_loom.composition.plan import (
    ComposeOptions,
    Plan,
    PlanError,
    Region,
    RegionMask,
    RuleSchedule,
    TextSpans,
    TokenSpan,
    parse_rule_blocks,
    region_token_masks,
)


def _mask(h: int, w: int, rows: slice, cols: slice, batch: int | None = None) -> RegionMask:
    m = torch.zeros(h, w)
    m[rows, cols] = 1.0
    return RegionMask.from_array(m if batch is None else m.expand(batch, h, w))


def test_options_give_the_rules_and_defaults_are_the_nodes() -> None:
    plan = Plan("g", ())
    assert plan.background == "global" and plan.options.latent_reinit and plan.options.end_percent == 1.0
    # isolation and global-text adapters off by default (chosen on the playground tune split, BENCHMARKS.md)
    assert not plan.options.isolation and not plan.options.global_text_adapters
    assert [r.rule for r in plan.rules] == ["injection", "base_blend"]
    assert all(r == RuleSchedule(r.rule) for r in plan.rules)  # every block, the whole of sampling
    assert [r.rule for r in ComposeOptions(isolation=True).rules()] == ["injection", "isolation", "base_blend"]
    options = ComposeOptions(isolation=False, base_ratio=0.0, double_blocks=frozenset({1}), end_percent=0.4)
    assert options.rules() == (RuleSchedule("injection", frozenset({1}), None, 0.0, 0.4),)


@pytest.mark.parametrize("changes, field", [
    (dict(background="everywhere"), "plan.options.background"),
    (dict(base_ratio=1.5), "plan.options.base_ratio"),
    (dict(region_threshold=0.0), "plan.options.region_threshold"),
    (dict(attention_path="sparse"), "plan.options.attention_path"),
    (dict(start_percent=0.9, end_percent=0.2), "plan.options.start_percent"),
    (dict(double_blocks=frozenset({-1})), "plan.options.double_blocks"),
])
def test_option_errors_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(PlanError, match=field):
        Plan("g", (), ComposeOptions(**changes)).validate()


def test_rule_blocks_text() -> None:
    assert parse_rule_blocks("all") == (None, None)
    assert parse_rule_blocks("d0-2 s5, single7") == (frozenset({0, 1, 2}), frozenset({5, 7}))
    with pytest.raises(PlanError, match="cannot read 'dx'"):
        parse_rule_blocks("dx")


@pytest.mark.parametrize("region, field", [
    (Region("r", box=(0.2, 0.2, 0.2, 0.8)), "regions[0].box: zero"),
    (Region("r", box=(0.2, 0.9, 0.6, 0.3)), "regions[0].box: zero"),
    (Region("r", box=(-0.1, 0.0, 0.5, 0.5)), "regions[0].box: .* outside"),
    (Region("r", box=(0.0, 0.0, 1.2, 0.5)), "regions[0].box: .* outside"),
    (Region("r", box=(0, 0, 20, 50)), "regions[0].box: .* outside"),
    (Region("r", box=(0, 0, 1)), "regions[0].box: expected 4 numbers"),
    (Region("r"), "regions[0].box: give exactly one"),
    (Region("r", box=(0, 0, 1, 1), mask=_mask(4, 4, slice(0, 2), slice(0, 2))), "regions[0].box: give exactly one"),
])
def test_region_validation_errors(region: Region, field: str) -> None:
    with pytest.raises(PlanError, match=field.replace("[", r"\[").replace("]", r"\]")):
        Plan("g", (region,)).validate()


@pytest.mark.parametrize("array, message", [
    (np.zeros((4,)), "expected \\[H, W\\] or \\[B, H, W\\]"),
    (np.zeros((1, 1, 4, 4)), "expected \\[H, W\\] or \\[B, H, W\\]"),
    (np.zeros((0, 4)), "empty shape"),
    (np.full((4, 4), 1.5), "values must lie in \\[0, 1\\]"),
    (np.full((4, 4), np.nan), "contains NaN"),
])
def test_mask_construction_errors(array: np.ndarray, message: str) -> None:
    with pytest.raises(PlanError, match=f"regions\\[3\\].mask: {message}"):
        RegionMask.from_array(array, region_index=3)


@pytest.mark.parametrize("latent_h, latent_w, patch, grid", [(8, 8, 2, (4, 4)), (9, 7, 2, (5, 4)), (12, 6, 3, (4, 2))])
def test_box_coverage_is_fractional_and_grid_matches_flux(latent_h: int, latent_w: int, patch: int,
                                                          grid: tuple[int, int]) -> None:
    plan = Plan("g", (Region("left", box=(0.0, 0.0, 0.5, 1.0)), Region("all", box=(0.0, 0.0, 1.0, 1.0))))
    masks = region_token_masks(plan, latent_h, latent_w, patch=patch, batch=2)
    assert masks.shape == (2, 2, grid[0] * grid[1])
    assert torch.allclose(masks[1], torch.ones_like(masks[1]))  # padded tokens are covered: real cells only
    left = masks[0, 0].reshape(grid)
    covered_cells = latent_w / 2  # the box covers latent columns [0, w/2)
    expected = torch.tensor([min(max(covered_cells - j * patch, 0.0), min(patch, latent_w - j * patch))
                             / min(patch, latent_w - j * patch) for j in range(grid[1])])
    assert torch.allclose(left, expected[None].expand(grid), atol=1e-6)


def test_box_partial_token_coverage_value() -> None:
    plan = Plan("g", (Region("r", box=(0.0, 0.0, 0.375, 0.25)),))  # 3 of 8 columns, 2 of 8 rows
    grid = region_token_masks(plan, 8, 8)[0, 0].reshape(4, 4)
    assert grid[0].tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert grid[1:].abs().sum() == 0


@pytest.mark.parametrize("mask_h, mask_w", [(64, 64), (8, 8), (4, 4), (96, 32)])
def test_mask_resize_to_token_grid(mask_h: int, mask_w: int) -> None:
    """A left-half mask of any size gives the left half of the token grid (area when shrinking, bilinear up)."""
    mask = _mask(mask_h, mask_w, slice(None), slice(0, mask_w // 2))
    masks = region_token_masks(Plan("g", (Region("r", mask=mask),)), 8, 8)
    grid = masks[0, 0].reshape(4, 4)
    assert grid[:, 0].min() > 0.99 and grid[:, 3].max() < 0.01
    assert torch.allclose(grid.sum(dim=1), torch.full((4,), 2.0), atol=0.05)


def test_mask_batch_broadcast_and_per_item() -> None:
    per_item = torch.zeros(2, 8, 8)
    per_item[0, :, :4] = 1.0
    per_item[1, :, 4:] = 1.0
    plan = Plan("g", (Region("r", mask=RegionMask.from_array(per_item)),))
    masks = region_token_masks(plan, 8, 8, batch=2)
    assert masks[0, 0].reshape(4, 4)[:, :2].min() == 1 and masks[0, 1].reshape(4, 4)[:, :2].max() == 0
    single = Plan("g", (Region("r", mask=_mask(8, 8, slice(0, 4), slice(None))),))
    broadcast = region_token_masks(single, 8, 8, batch=3)
    assert torch.equal(broadcast[0, 0], broadcast[0, 2])


@pytest.mark.parametrize("region, batch, message", [
    (Region("r", mask=_mask(8, 8, slice(0, 4), slice(None), batch=2)), 3, "regions\\[0\\].mask: mask batch 2"),
    (Region("r", mask=RegionMask.from_array(torch.zeros(8, 8))), 1, "regions\\[0\\].mask: mask is empty"),
])
def test_token_mask_errors(region: Region, batch: int, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        region_token_masks(Plan("g", (region,)), 8, 8, batch=batch)


def test_bad_grid_raises() -> None:
    with pytest.raises(PlanError, match="bad grid"):
        region_token_masks(Plan("g", ()), 0, 8)


def test_text_spans_from_lengths_and_errors() -> None:
    spans = TextSpans.from_lengths(5, [3, 4])
    assert spans.global_span == TokenSpan(0, 5)
    assert spans.region_spans == (TokenSpan(5, 8), TokenSpan(8, 12)) and spans.total == 12
    with pytest.raises(PlanError, match="region_spans\\[1\\]: overlaps"):
        TextSpans(TokenSpan(0, 5), (TokenSpan(5, 8), TokenSpan(7, 9)), 12).validate()
    with pytest.raises(PlanError, match="region_spans\\[0\\]: .* empty or outside"):
        TextSpans(TokenSpan(0, 5), (TokenSpan(10, 14),), 12).validate()
    with pytest.raises(PlanError, match="region_spans\\[0\\]"):
        TextSpans.from_lengths(5, [0])
