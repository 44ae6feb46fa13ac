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


def test_cases_speak_playground_words_and_cover_every_pair_on_both_sides():
    names = [case.name for case in scoring.CASES]
    assert len(set(names)) == len(names)
    pairs = set()
    for case in scoring.CASES:
        for prompt in (case.prompt, *(r.prompt for r in case.regions)):
            assert 0 < len(text.tokenize(prompt).words) <= scoring.MAX_PROMPT_WORDS
        assert case.boxes == [scoring.LEFT, scoring.RIGHT]
        assert len(case.concepts) in (2, 3) and set(case.concepts) <= {c.name for c in world.CONCEPTS}
        assert scoring.validate_case(case) is case
        pairs.add(tuple(r.concepts for r in case.regions))
    for a, b in [("star", "ring"), ("star", "stripes"), ("ring", "stripes")]:
        assert ((a,), (b,)) in pairs and ((b,), (a,)) in pairs
    assert sum(len(case.concepts) == 3 for case in scoring.CASES) >= 2


@pytest.mark.parametrize("case", scoring.CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_perfect_drawing_of_every_case_scores_perfectly(case, seed):
    score = scoring.score_image(perfect(case, seed), case)
    assert score.present == (True, True) and score.complete
    assert score.vanished == (False,) * len(case.concepts)
    assert score.confused == (False,) * len(case.concepts)
    assert score.leakage == 0.0


def test_swapped_objects_are_confused_not_vanished():
    case = scoring.case_named("star-ring")
    star, ring = case.regions
    score = scoring.score_image(draw((star, "right"), (ring, "left")), case)
    assert case.concepts == ("star", "ring")
    assert score.present == (False, False)
    assert score.vanished == (False, False)
    assert score.confused == (True, True)
    assert score.leakage == 0.0


def test_a_missing_object_vanishes_and_a_wrong_texture_loses_only_its_concept():
    case = scoring.case_named("striped-star-ring")
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
    case = scoring.case_named("star-stripes")
    star, square = case.regions
    striped_star = dataclasses.replace(star, texture="striped")
    score = scoring.score_image(draw((striped_star, "left"), (square, "right")), case)
    assert score.present == (False, True)
    assert score.vanished == (False, False) and score.confused == (False, True)


def test_leakage_counts_paint_where_no_object_can_be():
    case = scoring.case_named("ring-star")
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
    case = scoring.case_named("star-ring")
    star, ring = case.regions
    scores = [scoring.score_image(perfect(case), case),
              scoring.score_image(draw((star, "right"), (ring, "left")), case),
              scoring.score_image(draw((ring, "right")), case)]
    rates = scoring.aggregate(scores)
    assert rates == scoring.Rates(images=3, presence=pytest.approx(3 / 6), complete=pytest.approx(1 / 3),
                                  vanishing=pytest.approx(1 / 6), confusion=pytest.approx(2 / 6), leakage=0.0)
    assert scoring.aggregate([]) == scoring.Rates(0, 0.0, 0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("change,match", [
    ({"concepts": ("ring",)}, "carries 'ring'"),
    ({"shape": "hexagon"}, "unknown object"),
    ({"box": (0.0, 0.0, 0.5, 0.1)}, "misses the rows"),
])
def test_validate_case_names_what_is_wrong(change, match):
    case = scoring.case_named("star-ring")
    bad = dataclasses.replace(case, regions=(dataclasses.replace(case.regions[0], **change), case.regions[1]))
    with pytest.raises(ValueError, match=match):
        scoring.validate_case(bad)


def test_a_concept_wanted_outside_its_region_is_refused():
    case = scoring.case_named("star-ring")
    bad = dataclasses.replace(case, regions=(case.regions[0], dataclasses.replace(case.regions[1], shape="star",
                                                                                    concepts=())))
    with pytest.raises(ValueError, match="which region 0 carries"):
        scoring.validate_case(bad)


def test_scoring_is_pure():
    tree = ast.parse((REPO / "playground" / "scoring.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    assert not [name for name in imported if name.split(".")[0] in ("comfy", "comfy_api", "nodes", "torch")]
