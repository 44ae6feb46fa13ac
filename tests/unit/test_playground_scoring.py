"""Composition scoring on the playground world, checked on images drawn by world.render: a perfect drawing of a
case is perfect, swapped objects are confused, a missing object vanishes, stray paint is leakage."""
import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from lora_loom.playground import scoring, text, world

REPO = Path(__file__).resolve().parents[2]
SIDE = {scoring.LEFT: "left", scoring.RIGHT: "right"}


def draw(*objects: tuple[scoring.CaseRegion, str], seed: int = 0) -> np.ndarray:
    """Render each (region's wanted object, side) with world.place's random size and jitter."""
    rng = np.random.default_rng(seed)
    items = tuple(world.place(side, rng, r.shape, r.colour, r.texture) for r, side in objects)
    return world.render(world.Scene(objects=items, caption=""))


def perfect(case: scoring.Case, seed: int = 0) -> np.ndarray:
    return draw(*((r, SIDE[r.box]) for r in case.regions), seed=seed)


def tune(family: str) -> scoring.Case:
    """The tune case of ``family``."""
    (case,) = [c for c in scoring.split_cases("tune") if c.name.split("/")[0] == family]
    return case


def test_cases_speak_playground_words_and_cover_every_pair_on_both_sides():
    names = [case.name for case in scoring.CASES]
    assert len(set(names)) == len(names)
    pairs = set()
    for case in scoring.CASES:
        for prompt in (case.prompt, *(r.prompt for r in case.regions)):
            assert 0 < len(text.tokenize(prompt).words) <= scoring.MAX_PROMPT_WORDS
        assert case.boxes == [scoring.LEFT, scoring.RIGHT]
        assert len(case.concepts) in (1, 2, 3) and set(case.concepts) <= {c.name for c in world.CONCEPTS}
        assert scoring.validate_case(case) is case
        pairs.add(tuple(r.concepts for r in case.regions))
    for a, b in [("star", "ring"), ("star", "stripes"), ("ring", "stripes"), ("star_toy", "ring_toy"),
                 ("bars", ())]:
        a, b = (a,), (b,) if b else ()
        assert (a, b) in pairs and (b, a) in pairs
    assert sum(len(case.concepts) == 3 for case in scoring.CASES) >= 2


def test_splits_are_disjoint_in_colours_and_seeds_and_cover_every_family():
    tune_cases, heldout = scoring.split_cases("tune"), scoring.split_cases("heldout")
    assert scoring.CASES == tune_cases + heldout
    assert {c.split for c in tune_cases} == {"tune"} and {c.split for c in heldout} == {"heldout"}
    for family in scoring.FAMILIES:
        mine = [c for c in scoring.CASES if c.name.split("/")[0] == family.name]
        assert [c.split for c in mine] == ["tune", "heldout", "heldout"]
        assert len({tuple((r.colour, r.shape, r.texture) for r in c.regions) for c in mine}) == 3
        assert {c.interfering for c in mine} == {family.interfering}
    assert not {c.name for c in tune_cases} & {c.name for c in heldout}
    tune_seeds = {s for c in tune_cases for s in scoring.case_seeds(c, 8)}
    heldout_seeds = {s for c in heldout for s in scoring.case_seeds(c, 8)}
    assert tune_seeds == set(range(8)) and not tune_seeds & heldout_seeds
    assert list(scoring.case_seeds(heldout[0], 2, first_seed=3)) == [1003, 1004]
    with pytest.raises(KeyError, match="unknown split"):
        scoring.split_cases("test")


def test_interfering_cases_share_a_class_word_or_carry_a_style():
    for case in scoring.CASES:
        items = [world.concept(name) for name in case.concepts]
        triggers = [item.trigger for item in items if not item.is_style]
        shared = len(triggers) != len(set(triggers))
        assert case.interfering == (shared or any(item.is_style for item in items)), case.name
    both = scoring.case_named("startoy-ringtoy/yellow-red")
    assert both.prompt == "a yellow toy on the left and a red toy on the right"
    assert [both.subject_of(n) for n in both.concepts] == ["yellow toy", "red toy"]
    styled = tune("bars-plain")
    assert styled.regions[0].texture == "barred" and "barred" not in styled.prompt
    assert styled.regions[1].concepts == () and styled.regions[1].texture == "solid"
    for case in scoring.CASES:  # the words naming each concept's object occur once in the global prompt
        for name in case.concepts:
            assert f" {case.subject_of(name)} " in f" {case.prompt} "
            assert case.prompt.count(case.subject_of(name)) == 1


@pytest.mark.parametrize("case", scoring.CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_perfect_drawing_of_every_case_scores_perfectly(case, seed):
    score = scoring.score_image(perfect(case, seed), case)
    assert score.present == (True, True) and score.clean == (True, True) and score.complete
    assert score.vanished == (False,) * len(case.concepts)
    assert score.confused == (False,) * len(case.concepts)
    assert score.leakage == 0.0


def test_swapped_objects_are_confused_not_vanished():
    case = tune("star-ring")
    star, ring = case.regions
    score = scoring.score_image(draw((star, "right"), (ring, "left")), case)
    assert case.concepts == ("star", "ring")
    assert score.present == (False, False) and score.clean == (False, False)
    assert score.vanished == (False, False)
    assert score.confused == (True, True)
    assert score.leakage == 0.0


def test_a_missing_object_vanishes_and_a_wrong_texture_loses_only_its_concept():
    case = tune("striped-star-ring")
    star, ring = case.regions
    assert case.concepts == ("star", "stripes", "ring")
    score = scoring.score_image(draw((ring, "right")), case)
    assert score.present == (False, True)
    assert score.vanished == (True, True, False) and score.confused == (False, False, False)
    solid_star = dataclasses.replace(star, texture="solid")
    score = scoring.score_image(draw((solid_star, "left"), (ring, "right")), case)
    assert score.present == (False, True)
    assert score.vanished == (False, True, False) and score.confused == (False, False, False)


def test_a_concept_painted_in_both_halves_is_confused():
    case = tune("star-stripes")
    star, square = case.regions
    striped_star = dataclasses.replace(star, texture="striped")
    score = scoring.score_image(draw((striped_star, "left"), (square, "right")), case)
    assert score.present == (False, True)
    assert score.vanished == (False, False) and score.confused == (False, True)


def test_a_style_that_bleeds_into_the_other_half_is_confused_and_that_half_is_wrong():
    case = tune("bars-plain")
    styled, plain = case.regions
    score = scoring.score_image(draw((styled, "left"), (dataclasses.replace(plain, texture="barred"), "right")), case)
    assert case.concepts == ("bars",)
    assert score.present == (True, False) and score.vanished == (False,) and score.confused == (True,)


def test_toys_drawn_alike_in_both_halves_are_confused():
    case = tune("startoy-ringtoy")
    star, ring = case.regions
    score = scoring.score_image(draw((star, "left"), (dataclasses.replace(ring, shape="star"), "right")), case)
    assert score.present == (True, False)
    assert score.vanished == (False, True) and score.confused == (True, False)


def test_leakage_counts_paint_where_no_object_can_be():
    case = tune("ring-star")
    image = perfect(case)
    image[0:4, 0:16] = world.COLOURS["blue"]  # 64 px in the top band, outside OBJECT_BAND
    band_rows = round(scoring.OBJECT_BAND[1] * 64) - round(scoring.OBJECT_BAND[0] * 64)
    score = scoring.score_image(image, case)
    assert score.present == (True, True)
    assert score.leakage == pytest.approx(64 / (64 * (64 - band_rows)))


def test_object_band_holds_every_shape_world_place_can_draw():
    low, high = (round(v * world.IMAGE_SIZE) for v in scoring.OBJECT_BAND)
    for shape in world.ALL_SHAPES:
        for cy in (32.0 - world.CENTRE_JITTER, 32.0 + world.CENTRE_JITTER):
            mask = world.shape_mask(shape, 16.0, cy, world.RADIUS_RANGE[1])
            rows = np.nonzero(mask.any(axis=1))[0]
            assert low <= rows.min() and rows.max() < high, (shape, cy, rows.min(), rows.max())


def test_aggregate_pools_regions_concepts_and_images():
    case = tune("star-ring")
    star, ring = case.regions
    scores = [scoring.score_image(perfect(case), case),
              scoring.score_image(draw((star, "right"), (ring, "left")), case),
              scoring.score_image(draw((ring, "right")), case)]
    rates = scoring.aggregate(scores)
    assert rates == scoring.Rates(images=3, presence=pytest.approx(3 / 6), clean=pytest.approx(3 / 6),
                                  complete=pytest.approx(1 / 3), vanishing=pytest.approx(1 / 6),
                                  confusion=pytest.approx(2 / 6), leakage=0.0)
    assert scoring.aggregate([]) == scoring.Rates(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("change,match", [
    ({"concepts": ("ring",)}, "carries 'ring'"),
    ({"shape": "hexagon"}, "unknown object"),
    ({"box": (0.0, 0.0, 0.5, 0.1)}, "misses the rows"),
])
def test_validate_case_names_what_is_wrong(change, match):
    case = tune("star-ring")
    bad = dataclasses.replace(case, regions=(dataclasses.replace(case.regions[0], **change), case.regions[1]))
    with pytest.raises(ValueError, match=match):
        scoring.validate_case(bad)


def test_a_concept_wanted_outside_its_region_is_refused():
    case = tune("star-ring")
    bad = dataclasses.replace(case, regions=(case.regions[0], dataclasses.replace(case.regions[1], shape="star",
                                                                                    concepts=())))
    with pytest.raises(ValueError, match="which region 0 carries"):
        scoring.validate_case(bad)


def test_scoring_is_pure():
    tree = ast.parse((REPO / "playground" / "scoring.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    assert not [name for name in imported if name.split(".")[0] in ("comfy", "comfy_api", "nodes", "torch")]


def test_a_case_outside_the_splits_is_refused():
    with pytest.raises(ValueError, match="split 'test'"):
        scoring.validate_case(dataclasses.replace(tune("star-ring"), split="test"))
