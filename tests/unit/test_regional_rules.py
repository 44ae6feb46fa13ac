"""Regional attention rules: labelling, allowed matrix per background mode, schedule, blending, probes."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from lora_loom.composition.plan import (
    ComposeOptions,
    Plan,
    PlanError,
    Region,
    RegionOptions,
    TextSpans,
    region_token_masks,
)
from lora_loom.composition.regional import (
    BACKGROUND_IMAGE,
    GLOBAL_TEXT,
    ActiveRules,
    active_rules,
    allowed_groups,
    base_allowed,
    blend_base,
    label_joint_sequence,
    region_image_group,
    region_text_group,
    region_token_weights,
    rule_applies,
)
from lora_loom.kernels.probes import attention_probabilities

T0, BG = GLOBAL_TEXT, BACKGROUND_IMAGE
T1, I1, T2, I2 = region_text_group(0), region_image_group(0), region_text_group(1), region_image_group(1)


def _plan(background: str = "global", isolate_second: bool = True) -> Plan:
    """Region 0: left third, region 1: right third, background: the middle column band."""
    return Plan("a street", (Region("a cat", box=(0.0, 0.0, 0.25, 1.0)),
                             Region("a dog", box=(0.75, 0.0, 1.0, 1.0),
                                    options=RegionOptions(isolate=isolate_second))),
                ComposeOptions(background=background)).validate()


ON = ActiveRules(injection=True, isolation=True, base_blend=False)


@pytest.mark.parametrize("background, rules, query, key, expected", [
    # concept injection
    ("global", ON, I1, T1, True), ("global", ON, I1, T0, False), ("global", ON, I1, T2, False),
    ("global", ON, T1, T1, True), ("global", ON, T1, I1, True), ("global", ON, T1, T0, False),
    ("global", ON, T1, T2, False), ("global", ON, T1, I2, False), ("global", ON, T1, BG, False),
    ("global", ON, T0, T0, True), ("global", ON, T0, T1, False), ("global", ON, T0, I1, True),
    ("global", ON, T0, BG, True), ("global", ON, BG, T0, True), ("global", ON, BG, T1, False),
    ("shared", ON, BG, T1, True), ("shared", ON, BG, T2, True), ("isolated", ON, BG, T1, False),
    # concept isolation
    ("global", ON, I1, I2, False), ("global", ON, I2, I1, False), ("global", ON, I1, I1, True),
    ("global", ON, I1, BG, True), ("global", ON, BG, I2, True), ("shared", ON, I1, BG, True),
    ("isolated", ON, I1, BG, False), ("isolated", ON, BG, I1, False), ("isolated", ON, BG, BG, True),
    # rules switched off
    ("isolated", ActiveRules(True, False, False), I1, I2, True),
    ("isolated", ActiveRules(True, False, False), BG, I1, True),
    ("global", ActiveRules(False, True, False), I1, T2, True),
    ("global", ActiveRules(False, True, False), T1, I2, True),
    ("global", ActiveRules(False, True, False), I1, I2, False),
])
def test_allowed_matrix(background: str, rules: ActiveRules, query: int, key: int, expected: bool) -> None:
    assert bool(allowed_groups(_plan(background), rules)[query, key]) is expected


def test_regions_see_the_global_prompt_only_when_asked() -> None:
    plan = _plan()
    seeing = dataclasses.replace(plan, options=dataclasses.replace(plan.options, regions_see_global=True))
    strict, open_ = allowed_groups(plan, ON), allowed_groups(seeing, ON)
    assert not strict[I1, T0] and not strict[I2, T0] and open_[I1, T0] and open_[I2, T0]
    changed = (strict != open_).nonzero().tolist()
    assert sorted(changed) == sorted([[I1, T0], [I2, T0]])


def test_all_rules_off_is_unrestricted() -> None:
    assert allowed_groups(_plan(), ActiveRules(False, False, False)).all()


def test_region_without_isolation_sees_all_images() -> None:
    allowed = allowed_groups(_plan("isolated", isolate_second=False), ON)
    assert allowed[I2, I1] and allowed[I1, I2] and allowed[I2, BG] and allowed[BG, I2]
    assert not allowed[I1, BG]


def test_labels_layout_and_image_first() -> None:
    plan = _plan()
    masks = region_token_masks(plan, 8, 8)  # grid 4x4: column 0 -> region 0, column 3 -> region 1
    spans = TextSpans.from_lengths(3, [2, 4])
    labels = label_joint_sequence(plan, masks, spans)
    assert labels[:9].tolist() == [T0] * 3 + [T1] * 2 + [T2] * 4
    assert labels[9:].reshape(4, 4).tolist() == [[I1, BG, BG, I2]] * 4
    flipped = label_joint_sequence(plan, masks, spans, image_first=True, n_image_tokens=18)
    assert flipped[:16].tolist() == labels[9:].tolist() and flipped[16:18].tolist() == [BG, BG]
    assert flipped[18:].tolist() == labels[:9].tolist()


@pytest.mark.parametrize("values, threshold, expected", [
    ([[0.6], [0.9]], 0.5, I2),   # the largest coverage wins
    ([[0.7], [0.7]], 0.5, I1),   # ties go to the lowest region index
    ([[0.4], [0.3]], 0.5, BG),   # below the threshold: background
    ([[0.4], [0.3]], 0.25, I1),
])
def test_overlap_assignment(values: list[list[float]], threshold: float, expected: int) -> None:
    plan = Plan("g", _plan().regions, ComposeOptions(region_threshold=threshold))
    labels = label_joint_sequence(plan, torch.tensor(values), TextSpans.from_lengths(1, [1, 1]))
    assert labels[-1].item() == expected


@pytest.mark.parametrize("masks, spans, message", [
    (torch.zeros(3, 16), TextSpans.from_lengths(1, [1, 1]), "3 masks and 2 text spans for 2 regions"),
    (torch.zeros(2, 16), TextSpans.from_lengths(1, [1]), "2 masks and 1 text spans"),
    (torch.zeros(2, 1, 1, 16), TextSpans.from_lengths(1, [1, 1]), "expected \\[N, L_img\\]"),
    (torch.stack([torch.eye(2)[:, :1].expand(2, 16), torch.eye(2)[:, 1:].expand(2, 16)], 1),
     TextSpans.from_lengths(1, [1, 1]), "batch items assign tokens to different regions"),
])
def test_label_errors(masks: torch.Tensor, spans: TextSpans, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        label_joint_sequence(_plan(), masks, spans)


def test_n_image_tokens_smaller_than_grid_raises() -> None:
    with pytest.raises(PlanError, match="smaller than the token grid"):
        label_joint_sequence(_plan(), torch.zeros(2, 16), TextSpans.from_lengths(1, [1, 1]), n_image_tokens=4)


def test_rule_schedule_follows_the_options() -> None:
    options = ComposeOptions(isolation=False, double_blocks=frozenset({0, 2}), single_blocks=frozenset({3}),
                             start_percent=0.2, end_percent=0.5)
    plan = Plan("g", (), options)
    cases = [("injection", "double", 0, 0.2, True), ("injection", "double", 1, 0.3, False),
             ("injection", "double", 2, 0.49, True), ("injection", "double", 2, 0.5, False),
             ("injection", "double", 0, 0.1, False), ("injection", "single", 3, 0.3, True),
             ("injection", "single", 37, 0.3, False), ("isolation", "double", 0, 0.3, False),
             ("base_blend", "double", 0, 0.3, True)]
    for rule, block_type, index, percent, expected in cases:
        assert rule_applies(plan, rule, block_type, index, percent) is expected, (rule, block_type, index, percent)
    assert active_rules(plan, "double", 0, 0.3) == ActiveRules(True, False, True)
    isolated = ComposeOptions(base_ratio=0.0, isolation=True)
    assert active_rules(Plan("g", (), isolated), "double", 0, 0.0) == ActiveRules(True, True, False)
    assert active_rules(Plan("g", ()), "double", 0, 0.0) == ActiveRules(True, False, True)  # the defaults
    assert rule_applies(Plan("g", (), isolated), "isolation", "single", 37, 1.0)  # a window ending at 1: included
    with pytest.raises(PlanError, match="block_type 'triple'"):
        rule_applies(plan, "injection", "triple", 0, 0.0)


def test_base_allowed_and_blend() -> None:
    plan = _plan()
    regional = allowed_groups(plan, ON)
    base = base_allowed(plan, regional)
    assert torch.equal(base[T1], regional[T1]) and torch.equal(base[T2], regional[T2])
    for q in (T0, BG, I1, I2):
        assert base[q].tolist() == [True, True, False, True, False, True]
    h_regional, h_base = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    assert torch.allclose(blend_base(h_regional, h_base, 0.25), torch.full((2, 3, 4), 0.25))
    assert blend_base(h_regional, h_base, 0.0) is h_regional
    with pytest.raises(PlanError, match="beta 1.5"):
        blend_base(h_regional, h_base, 1.5)
    with pytest.raises(PlanError, match="shapes differ"):
        blend_base(h_regional, h_base[:, :2], 0.5)


def test_region_token_weights() -> None:
    plan = Plan("g", (Region("a", box=(0, 0, 0.375, 1)), Region("b", box=(0.5, 0, 1, 1))))
    masks = region_token_masks(plan, 8, 8, batch=2)
    spans = TextSpans.from_lengths(2, [3, 1])
    weights = region_token_weights(plan, masks, spans)
    assert weights.shape == (2, 6 + 16, 2)
    assert weights[:, 2:5, 0].eq(1).all() and weights[:, :2].eq(0).all() and weights[:, 5, 1].eq(1).all()
    assert weights[:, 2:5, 1].eq(0).all() and weights[:, 5, 0].eq(0).all()
    assert weights[0, 6:10, 0].tolist() == [1.0, 0.5, 0.0, 0.0] and weights[0, 6:10, 1].tolist() == [0, 0, 1, 1]
    shared = region_token_weights(plan, masks, spans, global_text=True)
    assert shared[:, :2].eq(1).all()  # the global prompt is read with every region's adapters
    assert torch.equal(shared[:, 2:], weights[:, 2:])


def test_region_token_weights_of_entries_without_the_composed_prompt() -> None:
    """An uncond batched with the composed prompt keeps the image weights and gets no text weights; a call with no
    composed entry may have another text length; extra image tokens (reference latents) weigh 0."""
    plan = Plan("g", (Region("a", box=(0, 0, 0.5, 1)),))
    masks = region_token_masks(plan, 8, 8, batch=2)
    spans = TextSpans.from_lengths(2, [3])
    mixed = region_token_weights(plan, masks, spans, n_image_tokens=18, global_text=True, composed=(True, False))
    assert mixed.shape == (2, 5 + 18, 1) and mixed[0, :5].eq(1).all() and mixed[1, :5].eq(0).all()
    assert torch.equal(mixed[0, 5:], mixed[1, 5:]) and mixed[:, -2:].eq(0).all()
    other = region_token_weights(plan, masks, spans, composed=(False, False), text_length=7)
    assert other.shape == (2, 7 + 16, 1) and other[:, :7].eq(0).all() and torch.equal(other[:, 7:], mixed[:, 5:21])
    with pytest.raises(PlanError, match="text length 7, the plan has 5"):
        region_token_weights(plan, masks, spans, composed=(True, False), text_length=7)


@pytest.mark.parametrize("background", ["global", "isolated", "shared"])
def test_probed_probabilities_respect_rules(background: str) -> None:
    """Through the kernels: forbidden probabilities are exactly 0 and every row sums to 1."""
    torch.manual_seed(0)
    plan = _plan(background)
    spans = TextSpans.from_lengths(3, [2, 2])
    labels, allowed = label_joint_sequence(plan, region_token_masks(plan, 8, 8), spans), allowed_groups(plan, ON)
    length = labels.shape[0]
    q, k = torch.randn(2, 1, 2, length, 8).unbind(0)
    everything = torch.arange(length)
    probe = attention_probabilities(q, k, everything, everything, labels=labels, allowed=allowed, chunk=5)
    assert torch.allclose(probe.row_sums, torch.ones_like(probe.row_sums), atol=1e-5)
    forbidden = ~allowed[labels[:, None], labels[None, :]]
    assert probe.probabilities[..., forbidden].abs().max() == 0
    assert probe.probabilities[..., ~forbidden].min() > 0
    region0_images = (labels == I1).nonzero().flatten()
    region1_prompt = (labels == T2).nonzero().flatten()
    cross = attention_probabilities(q, k, region0_images, region1_prompt, labels=labels, allowed=allowed)
    assert cross.probabilities.abs().max() == 0
