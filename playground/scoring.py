"""Ground-truth composition scoring on the playground world: what a generated image got right about a case.

Pure numpy (the exact :mod:`.detector` does the looking). A :class:`Case` is a prompt with regions, each a
normalised box, the region's own prompt, the object wanted there (shape, colour, texture) and the concepts it
carries (the names of :data:`.world.CONCEPTS`, whose LoRAs teach them). One image scores, per region, whether
the wanted object is ``present`` (all three attributes); per concept, whether it ``vanished`` (its attribute
value — the star or ring shape, the striped texture — is found in no region) or was ``confused`` (found in a
case region other than its own); and the ``leakage``: the share of non-background pixels where no object can
be: outside every region's box cut to :data:`OBJECT_BAND`, the rows the world draws objects into (the halves
alone cover the whole canvas, so paint outside them could never show).
:func:`aggregate` turns many scores into the rates a benchmark row reports.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .detector import Detection, background_leakage, detect
from .world import ALL_SHAPES, ALL_TEXTURES, COLOURS, Concept, concept

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
LEFT: Box = (0.0, 0.0, 0.5, 1.0)
RIGHT: Box = (0.5, 0.0, 1.0, 1.0)
MAX_PROMPT_WORDS = 15
# Rows (y0, y1) as fractions of the canvas that world.place can paint: centre 32 +- 1 px, radius <= 13.5 px on 64 px
# (pixel rows 17..47); tests/unit/test_playground_scoring.py checks every shape at the extremes.
OBJECT_BAND = (0.25, 0.75)


@dataclass(frozen=True)
class CaseRegion:
    """One region of a case: ``box`` ``(x0, y0, x1, y1)`` in [0, 1], its ``prompt``, the wanted object and the
    names of the concepts it carries (each concept's value must be one of the wanted attributes)."""

    box: Box
    prompt: str
    shape: str
    colour: str
    texture: str
    concepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Case:
    """A composition to generate: ``name``, the global ``prompt`` and its ``regions`` (in canvas order)."""

    name: str
    prompt: str
    regions: tuple[CaseRegion, ...]

    @property
    def concepts(self) -> tuple[str, ...]:
        """Every concept the case carries, in region order."""
        return tuple(name for region in self.regions for name in region.concepts)

    @property
    def boxes(self) -> list[Box]:
        return [region.box for region in self.regions]

    @property
    def object_boxes(self) -> list[Box]:
        """Each region's box cut to :data:`OBJECT_BAND`: where leakage is not counted."""
        low, high = OBJECT_BAND
        return [(x0, max(y0, low), x1, min(y1, high)) for x0, y0, x1, y1 in self.boxes]

    def region_of(self, concept_name: str) -> int:
        """Index of the region that carries ``concept_name``."""
        for index, region in enumerate(self.regions):
            if concept_name in region.concepts:
                return index
        raise KeyError(f"playground/scoring.py: case {self.name!r} carries no concept {concept_name!r}")


def concept_value_in(item: Concept, shape: str | None, texture: str | None) -> bool:
    """True when an object with ``shape``/``texture`` shows ``item``'s attribute value."""
    return (shape if item.kind == "shape" else texture) == item.value


def validate_case(case: Case) -> Case:
    """Check a case: known attributes, at most :data:`MAX_PROMPT_WORDS` words per prompt, every concept carried
    by exactly one region whose object shows it and wanted by no other region. Raises ``ValueError``."""
    where = f"playground/scoring.py: case {case.name!r}"
    if not case.regions:
        raise ValueError(f"{where}: no regions")
    for prompt in (case.prompt, *(r.prompt for r in case.regions)):
        if len(prompt.split()) > MAX_PROMPT_WORDS:
            raise ValueError(f"{where}: prompt {prompt!r} has more than {MAX_PROMPT_WORDS} words")
    for index, region in enumerate(case.regions):
        x0, y0, x1, y1 = region.box
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise ValueError(f"{where}, region {index}: box {region.box} is not inside [0, 1]")
        if y0 >= OBJECT_BAND[1] or y1 <= OBJECT_BAND[0]:
            raise ValueError(f"{where}, region {index}: box {region.box} misses the rows objects are drawn in, "
                             f"{OBJECT_BAND}")
        if region.shape not in ALL_SHAPES or region.texture not in ALL_TEXTURES or region.colour not in COLOURS:
            raise ValueError(f"{where}, region {index}: unknown object ({region.shape}, {region.colour}, "
                             f"{region.texture})")
        for name in region.concepts:
            if not concept_value_in(concept(name), region.shape, region.texture):
                raise ValueError(f"{where}, region {index}: carries {name!r} but wants "
                                 f"({region.shape}, {region.texture})")
    names = case.concepts
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: a concept is carried by more than one region: {names}")
    for name in names:
        own = case.region_of(name)
        for index, region in enumerate(case.regions):
            if index != own and concept_value_in(concept(name), region.shape, region.texture):
                raise ValueError(f"{where}, region {index}: wants {name!r}'s value, which region {own} carries")
    return case


@dataclass(frozen=True)
class ImageScore:
    """One image against one case: ``present`` per region, ``vanished``/``confused`` per concept (in
    ``case.concepts`` order), ``leakage`` in [0, 1] and the detections per region."""

    case: str
    present: tuple[bool, ...]
    vanished: tuple[bool, ...]
    confused: tuple[bool, ...]
    leakage: float
    detections: tuple[Detection, ...]

    @property
    def complete(self) -> bool:
        """Every region holds its wanted object."""
        return all(self.present)


def score_image(image: np.ndarray, case: Case) -> ImageScore:
    """Score ``image`` ``[H, W, 3]`` (float, 0..1) against ``case``."""
    detections = tuple(detect(image, region.box) for region in case.regions)
    present = tuple(found.matches(region.shape, region.colour, region.texture)
                    for found, region in zip(detections, case.regions))
    vanished, confused = [], []
    for name in case.concepts:
        item, own = concept(name), case.region_of(name)
        shows = [found.present and concept_value_in(item, found.shape, found.texture) for found in detections]
        vanished.append(not any(shows))
        confused.append(any(shown for index, shown in enumerate(shows) if index != own))
    return ImageScore(case=case.name, present=present, vanished=tuple(vanished), confused=tuple(confused),
                      leakage=background_leakage(image, case.object_boxes), detections=detections)


@dataclass(frozen=True)
class Rates:
    """Rates over many scores: ``presence`` (share of regions with their object), ``complete`` (share of images
    with every region right), ``vanishing`` and ``confusion`` (share of concepts), mean ``leakage``."""

    images: int
    presence: float
    complete: float
    vanishing: float
    confusion: float
    leakage: float


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def aggregate(scores: Sequence[ImageScore]) -> Rates:
    """Pool ``scores`` (any cases) into :class:`Rates`; all zero for no scores."""
    return Rates(images=len(scores),
                 presence=_mean([p for s in scores for p in s.present]),
                 complete=_mean([s.complete for s in scores]),
                 vanishing=_mean([v for s in scores for v in s.vanished]),
                 confusion=_mean([c for s in scores for c in s.confused]),
                 leakage=_mean([s.leakage for s in scores]))


def _region(box: Box, side: str, colour: str, texture: str, shape: str, concepts: tuple[str, ...]) -> CaseRegion:
    words = ["a", colour] + ([texture] if texture != "solid" else []) + [shape, "on", "the", side]
    return CaseRegion(box, " ".join(words), shape, colour, texture, concepts)


def two_halves(name: str, left: tuple[str, str, str, tuple[str, ...]],
               right: tuple[str, str, str, tuple[str, ...]]) -> Case:
    """A case with one object per half; ``left``/``right`` are ``(colour, texture, shape, concepts)``. The global
    prompt joins the region prompts with "and"."""
    regions = (_region(LEFT, "left", *left), _region(RIGHT, "right", *right))
    return validate_case(Case(name, " and ".join(r.prompt for r in regions), regions))


CASES: tuple[Case, ...] = (
    two_halves("star-ring", ("red", "solid", "star", ("star",)), ("blue", "solid", "ring", ("ring",))),
    two_halves("ring-star", ("green", "solid", "ring", ("ring",)), ("yellow", "solid", "star", ("star",))),
    two_halves("star-stripes", ("yellow", "solid", "star", ("star",)),
               ("blue", "striped", "square", ("stripes",))),
    two_halves("stripes-star", ("red", "striped", "circle", ("stripes",)),
               ("green", "solid", "star", ("star",))),
    two_halves("ring-stripes", ("blue", "solid", "ring", ("ring",)),
               ("yellow", "striped", "triangle", ("stripes",))),
    two_halves("stripes-ring", ("green", "striped", "square", ("stripes",)),
               ("red", "solid", "ring", ("ring",))),
    two_halves("striped-star-ring", ("green", "striped", "star", ("star", "stripes")),
               ("yellow", "solid", "ring", ("ring",))),
    two_halves("star-striped-ring", ("red", "solid", "star", ("star",)),
               ("blue", "striped", "ring", ("ring", "stripes"))),
)


def case_named(name: str) -> Case:
    """The case of :data:`CASES` called ``name``; raises ``KeyError`` listing the names."""
    for case in CASES:
        if case.name == name:
            return case
    raise KeyError(f"playground/scoring.py: no case {name!r}; cases: {[c.name for c in CASES]}")
