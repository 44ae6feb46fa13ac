"""CLoRA math: NT-Xent loss, step sizes, masks and morphology, fusion; concept tokens from word alignment."""
from __future__ import annotations

import pytest
import torch
from lora_loom.composition.clora import (
    CLoraError,
    CLoraOptions,
    concept_masks,
    contrastive_loss,
    fuse_predictions,
    map_overlap,
    morphology,
    normalise_maps,
    step_sizes,
)
from lora_loom.composition.concept_tokens import (
    ConceptTokenError,
    PromptWord,
    concept_positions,
    parse_token_override,
    word_token_positions,
)
from lora_loom.composition.refine import (
    Box,
    RefineOptions,
    enhancement_loss,
    fill_loss,
    gaussian_smooth,
    refinement_step_sizes,
    region_loss,
    should_stop,
)


def blob(h: int, w: int, row: int, col: int, radius: float = 1.5) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return torch.exp(-((ys - row) ** 2 + (xs - col) ** 2) / (2 * radius ** 2))


def test_normalised_maps_span_zero_to_one():
    maps = torch.stack([blob(6, 6, 1, 1) * 3 + 2, blob(6, 6, 4, 4) * 0.01])
    flat = normalise_maps(maps)
    assert flat.shape == (2, 36)
    assert torch.allclose(flat.min(dim=1).values, torch.zeros(2)) and torch.allclose(flat.max(dim=1).values,
                                                                                       torch.ones(2), atol=1e-5)


def test_loss_is_lower_when_concepts_separate():
    """Two prompts x two concepts: separated concepts give a lower loss than both concepts on one spot."""
    a, b = blob(8, 8, 2, 2), blob(8, 8, 5, 5)
    labels = torch.tensor([0, 1, 0, 1])
    assert contrastive_loss(torch.stack([a, b, a, b]), labels) < contrastive_loss(torch.stack([a, a, a, a]), labels)


def test_loss_matches_a_hand_computed_nt_xent():
    maps = torch.rand(4, 3, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 1])
    z = torch.nn.functional.normalize(normalise_maps(maps), dim=1)
    s = z @ z.T / 0.5
    total = 0.0
    for i in range(4):
        j = i ^ 1  # the one positive
        denominator = sum(torch.exp(s[i, k]) for k in range(4) if k != i)
        total += -torch.log(torch.exp(s[i, j]) / denominator)
    assert torch.allclose(contrastive_loss(maps, labels, 0.5), total / 4, atol=1e-5)


def test_loss_without_positive_pairs_is_zero_and_differentiable():
    maps = torch.rand(2, 3, 3, requires_grad=True)
    loss = contrastive_loss(maps, torch.tensor([0, 1]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and maps.grad is not None


@pytest.mark.parametrize("steps, expected", [(0, []), (1, [20.0]), (3, [20.0, 20 * 0.75 ** 0.5, 20 * 0.5 ** 0.5])])
def test_step_sizes_follow_the_sqrt_schedule(steps, expected):
    assert step_sizes(20.0, steps) == pytest.approx(expected)


@pytest.mark.parametrize("operation, expected_sum", [("none", 1), ("dilate", 9), ("erode", 0), ("open", 0),
                                                     ("close", 1)])
def test_morphology_on_a_single_pixel(operation, expected_sum):
    mask = torch.zeros(1, 1, 5, 5)
    mask[0, 0, 2, 2] = 1
    assert float(morphology(mask, operation, 3).sum()) == expected_sum


@pytest.mark.parametrize("alpha, covered", [(0.0, 36), (0.5, None), (1.0, 1)])
def test_masks_threshold_at_alpha_of_the_peak(alpha, covered):
    maps = blob(6, 6, 2, 3)[None, None]
    masks = concept_masks(maps, alpha)
    expected = covered if covered is not None else int((maps >= 0.5 * maps.max()).sum())
    assert int(masks.sum()) == expected


def test_fusion_averages_overlaps_and_keeps_base_elsewhere():
    base = torch.zeros(1, 2, 2, 2)
    preds = torch.stack([torch.full((1, 2, 2, 2), 1.0), torch.full((1, 2, 2, 2), 3.0)])
    masks = torch.tensor([[[[1, 1], [0, 0]], [[0, 1], [0, 1]]]]).float()  # [1, 2, 2, 2]
    fused = fuse_predictions(base, preds, masks)
    assert fused[0, :, 0, 0].tolist() == [1.0, 1.0]   # only concept 0
    assert fused[0, :, 0, 1].tolist() == [2.0, 2.0]   # both: average
    assert fused[0, :, 1, 1].tolist() == [3.0, 3.0]   # only concept 1
    assert fused[0, :, 1, 0].tolist() == [0.0, 0.0]   # none: base
    with pytest.raises(CLoraError, match="fuse_predictions"):
        fuse_predictions(base, preds[:1], masks)


def test_overlap_is_one_for_identical_maps_and_low_for_separate_ones():
    a, b = blob(8, 8, 1, 1, 1.0), blob(8, 8, 6, 6, 1.0)
    assert map_overlap(torch.stack([a, a])) == pytest.approx(1.0)
    assert map_overlap(torch.stack([a, b])) < 0.1


@pytest.mark.parametrize("field, value", [("temperature", 0.0), ("alpha", 1.5), ("morphology", "blur"),
                                          ("kernel", 2), ("iterations", -1)])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(CLoraError, match=field.split("_")[0]):
        CLoraOptions(**{field: value}).validate()


# --- concept tokens ---------------------------------------------------------------------------------------
START, END = 100, 101
SPECIAL = {START, END}


def aligned(words, word_ids):
    flat = [START] + [t for ids in word_ids for t in ids] + [END, END]
    return word_token_positions(flat, SPECIAL, words, word_ids, " ".join(words)), flat


@pytest.mark.parametrize("words, word_ids, concept, expected", [
    (["a", "red", "fox"], [[1], [2], [3]], "fox", (3,)),
    (["a", "tiramisu", "cake"], [[1], [7, 8, 9], [4]], "tiramisu", (2, 3, 4)),      # multi-token word
    (["a", "cat", "and", "a", "cat"], [[1], [5], [6], [1], [5]], "cat", (2, 5)),      # repeated word
    (["a", "red", "fox,", "a", "fox"], [[1], [2], [3, 9], [1], [3]], "red fox", (2, 3, 4)),  # phrase, punctuation
    (["A", "Fox"], [[1], [3]], "fox", (2,)),                                         # case-insensitive
])
def test_concept_positions(words, word_ids, concept, expected):
    prompt_words, _ = aligned(words, word_ids)
    assert concept_positions(prompt_words, concept, " ".join(words)) == expected


def test_missing_concept_names_prompt_and_word():
    prompt_words, _ = aligned(["a", "cat"], [[1], [5]])
    with pytest.raises(ConceptTokenError, match="'dog' is not in the prompt 'a cat'"):
        concept_positions(prompt_words, "dog", "a cat")


def test_misaligned_tokens_are_an_error_not_a_guess():
    with pytest.raises(ConceptTokenError, match="word 'b'"):
        word_token_positions([START, 1, 2, END], SPECIAL, ["a", "b"], [[1], [3]], "a b")


def test_truncated_prompt_leaves_late_words_without_positions():
    words = word_token_positions([START, 1, 2, END], SPECIAL, ["a", "b", "c"], [[1], [2], [3]], "a b c")
    assert words[-1] == PromptWord("c", ())


@pytest.mark.parametrize("text, expected", [("0", (1,)), ("1,2", (2, 3)), ("0-2", (1, 2, 3))])
def test_token_override(text, expected):
    assert parse_token_override(text, [START, 1, 2, 3, END], SPECIAL) == expected


@pytest.mark.parametrize("text", ["x", "5", "2-1", ""])
def test_bad_token_override(text):
    with pytest.raises(ConceptTokenError, match="token indices"):
        parse_token_override(text, [START, 1, 2, 3, END], SPECIAL)


# --- LoRA-Composer refinement losses -----------------------------------------------------------------------

BOX = Box(top=1, left=1, bottom=4, right=4)


def test_smoothing_keeps_shape_and_mass_of_a_flat_map():
    flat = torch.ones(2, 6, 6)
    assert torch.allclose(gaussian_smooth(flat), flat)


def test_enhancement_is_zero_when_attention_fills_the_box_and_high_when_it_is_elsewhere():
    whole = Box(0, 0, 6, 6)
    assert float(enhancement_loss(torch.ones(1, 6, 6), whole)) < 1e-6
    elsewhere = torch.zeros(1, 6, 6)
    elsewhere[0, 5, 5] = 1.0
    assert float(enhancement_loss(elsewhere, BOX)) > 7.0


def test_fill_loss_is_zero_for_a_map_equal_to_the_box():
    assert float(fill_loss(BOX.mask(6, 6)[None], BOX)) == 0.0
    assert float(fill_loss(Box(0, 0, 1, 1).mask(6, 6)[None], BOX)) > 0.0


def test_region_loss_counts_only_keys_outside_the_region():
    region = torch.tensor([1.0, 1.0, 0.0, 0.0])
    inside_only = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    leaking = torch.tensor([[0.2, 0.2, 0.6, 0.0]])
    assert float(region_loss(inside_only, region)) == 0.0
    top2 = RefineOptions(region_top_k=2)
    assert float(region_loss(leaking, region, top2)) == pytest.approx(10 * 0.6 / 2)  # the two outside keys


@pytest.mark.parametrize("step, losses, stop", [(3, [1.0, 2.0], False), (6, [1.0, 2.0], True),
                                                (6, [2.0, 1.0], False), (25, [2.0, 1.0], True)])
def test_stop_rule(step, losses, stop):
    assert should_stop(step, losses) == stop


def test_refinement_schedule():
    assert refinement_step_sizes(2) == pytest.approx([20.0, 20 * 0.5 ** 0.5])
