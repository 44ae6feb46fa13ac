"""Plan: JSON round trip, token masks (boxes, masks, odd sizes), text spans and every error case."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lora_loom.composition.plan import (PLAN_VERSION, AdapterRef, MethodOptions, Plan, PlanError,
                                        RefinementOptions, Region, RegionMask, RegionOptions, RuleSchedule,
                                        TextSpans, TokenSpan, region_token_masks)


def _mask(h: int, w: int, rows: slice, cols: slice, batch: int | None = None) -> RegionMask:
    m = torch.zeros(h, w)
    m[rows, cols] = 1.0
    return RegionMask.from_array(m if batch is None else m.expand(batch, h, w))


def _full_plan() -> Plan:
    return Plan(
        global_prompt="two friends in a park",
        regions=(
            Region("a cat", box=(0.0, 0.0, 0.5, 1.0), adapters=(AdapterRef("cat.safetensors", "ab" * 32, 0.8),)),
            Region("a dog", box=(64, 0, 128, 96), box_units="pixels", canvas_width=128, canvas_height=96,
                   options=RegionOptions(isolate=False, adapters_on_text=False)),
            Region("a hat", mask=RegionMask.from_array(torch.rand(1, 7, 5) * 0.9 + 0.05),
                   adapters=(AdapterRef("hat"), AdapterRef("style", None, -0.5))),
        ),
        background="shared",
        rules=(RuleSchedule("injection", frozenset({0, 2, 4}), None, 0.0, 0.3),
               RuleSchedule("isolation", None, frozenset(), 0.1, 1.0)),
        options=MethodOptions(base_ratio=0.3, latent_reinit=True,
                              refinement=RefinementOptions(enabled=True, max_steps=10)),
    ).validate()


def test_json_round_trip_is_exact() -> None:
    plan = _full_plan()
    text = json.dumps(plan.to_dict())
    again = Plan.from_dict(json.loads(text))
    assert again == plan
    assert json.loads(text)["version"] == PLAN_VERSION
    assert torch.equal(again.regions[2].mask.to_tensor(), plan.regions[2].mask.to_tensor())


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(version=99), "plan.version"),
    (lambda d: d.update(background="everywhere"), "plan.background"),
    (lambda d: d["rules"][0].update(rule="teleport"), "plan.rules[0].rule"),
    (lambda d: d["rules"][1].update(start_percent=0.9, end_percent=0.2), "plan.rules[1].start_percent"),
    (lambda d: d["rules"][0].pop("rule"), "plan.rules[0]"),
    (lambda d: d["options"].update(base_ratio=1.5), "plan.options.base_ratio"),
    (lambda d: d["options"].update(colour="red"), "plan.options"),
    (lambda d: d["regions"][2]["mask"].update(shape=[3, 3]), "plan.regions[2].mask"),
    (lambda d: d["regions"][0].update(box=[0.5, 0.0, 0.5, 1.0]), "plan.regions[0].box"),
    (lambda d: d["regions"][0]["adapters"][0].update(name=""), "plan.regions[0].adapters[0].name"),
    (lambda d: d["regions"][1]["adapters"].append({"name": "x", "bogus": 1}), "plan.regions[1].adapters/options"),
])
def test_from_dict_errors_name_the_field(mutate, field: str) -> None:
    d = json.loads(json.dumps(_full_plan().to_dict()))
    mutate(d)
    with pytest.raises(PlanError, match=field.replace("[", r"\[").replace("]", r"\]")):
        Plan.from_dict(d)


@pytest.mark.parametrize("region, field", [
    (Region("r", box=(0.2, 0.2, 0.2, 0.8)), "regions[0].box: zero"),
    (Region("r", box=(0.2, 0.9, 0.6, 0.3)), "regions[0].box: zero"),
    (Region("r", box=(-0.1, 0.0, 0.5, 0.5)), "regions[0].box: .* outside"),
    (Region("r", box=(0.0, 0.0, 1.2, 0.5)), "regions[0].box: .* outside"),
    (Region("r", box=(0, 0, 200, 50), box_units="pixels", canvas_width=128, canvas_height=96),
     "regions[0].box: .* outside"),
    (Region("r", box=(0, 0, 20, 50), box_units="pixels"), "regions[0].canvas_width"),
    (Region("r", box=(0, 0, 1, 1), box_units="inches"), "regions[0].box_units"),
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


def test_pixel_box_equals_normalised_box() -> None:
    pixels = Plan("g", (Region("r", box=(32, 24, 96, 72), box_units="pixels", canvas_width=128, canvas_height=96),))
    normalised = Plan("g", (Region("r", box=(0.25, 0.25, 0.75, 0.75)),))
    assert torch.equal(region_token_masks(pixels, 12, 16), region_token_masks(normalised, 12, 16))


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


def test_json_without_rules_gets_default_rules() -> None:
    d = _full_plan().to_dict()
    d.pop("rules")
    assert Plan.from_dict(d).rules == Plan("g", ()).rules and len(Plan("g", ()).rules) == 3
