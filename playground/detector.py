"""The exact detector of the playground world: what object (shape, colour, texture) a region of an image holds.

Pure numpy. We own the renderer, so the detector inverts it: every pixel is labelled with the nearest of the
world's reference colours (background, each colour, each colour's dark shade); the largest 4-connected blob of
non-background pixels in the region is the object; its colour is the majority colour; its texture comes from
the layout of dark-shade pixels (none: solid; rows of one shade: striped; alternating within rows: checkered);
its shape is the rendering primitive that, re-drawn at the blob's bounding box, overlaps the blob best (IoU).
On rendered images this recovers every attribute exactly (tests/unit/test_playground_world.py); on generated
images it is the same measurement with imperfect pixels, and ``shape_fit`` says how well the best shape fits.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .world import ALL_SHAPES, BACKGROUND, COLOURS, DARK_SHADE, shape_extent, shape_mask, texture_mask

logger = logging.getLogger(__name__)

MIN_AREA = 40           # pixels: a smaller blob is noise, not an object
CLEAN_TOLERANCE = 0.15  # per channel: a pixel this close to what the renderer paints there is clean
# Share of an object's pixels that must be clean. Calibrated on the base model's own plain objects (no LoRA, the
# benchmark's sampler: "a red circle on the left", seeds 0-3, cfg 3: shares 0.86-0.90; cfg 1: 0.89-0.95), so
# that what the base draws counts as clean and a speckled object does not (one star LoRA alone: 0.52-0.66).
CLEAN_SHARE = 0.8
CLEAN_FIT = 0.75        # shape fit a clean object needs (a rendered object fits at 0.82 or better, star worst)
SOLID_BELOW = 0.15      # dark-shade fraction under which a texture is solid
STRIPED_BELOW = 0.2     # mean row (column) impurity under which a patterned texture is striped (barred)
COLOUR_NAMES = tuple(COLOURS)
# Reference colours [9, 3]: background, full colours, dark shades (index 1 + k and 1 + K + k for colour k).
REFERENCE = np.array([BACKGROUND, *COLOURS.values(), *(np.array(c) * DARK_SHADE for c in COLOURS.values())],
                     dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    """What the detector found in one region. Attribute fields are None when nothing is ``present``.

    ``box_pixels`` is the region ``(x0, y0, x1, y1)`` in pixels; ``area`` the blob's pixel count;
    ``shape_fit`` the IoU of the best re-drawn shape with the blob (1.0 on a clean rendering, lower on noise);
    ``blob`` the object's pixels (bool ``[H, W]``), kept for :meth:`clean_share`.
    """

    present: bool
    shape: str | None
    colour: str | None
    texture: str | None
    area: int
    shape_fit: float
    box_pixels: tuple[int, int, int, int]
    blob: np.ndarray | None = field(default=None, compare=False, repr=False)

    def clean_share(self, image: np.ndarray, colour: str, texture: str) -> float:
        """Share of the object's pixels within :data:`CLEAN_TOLERANCE` (every channel) of what the renderer paints
        there for ``colour`` and ``texture``; 0.0 when nothing is present."""
        if not self.present or self.blob is None:
            return 0.0
        full = np.asarray(COLOURS[colour], dtype=np.float32)
        wanted = np.where(texture_mask(texture, image.shape[0])[..., None], full * DARK_SHADE, full)
        close = (np.abs(np.asarray(image, dtype=np.float32) - wanted) <= CLEAN_TOLERANCE).all(-1)
        return float(close[self.blob].mean())

    def is_clean(self, image: np.ndarray, shape: str, colour: str, texture: str) -> bool:
        """The wanted object, well formed: it :meth:`matches`, fits its shape at :data:`CLEAN_FIT` or better and
        :data:`CLEAN_SHARE` of its pixels are clean (a noisy, half-formed object that the detector still reads
        right is not)."""
        return (self.matches(shape, colour, texture) and self.shape_fit >= CLEAN_FIT
                and self.clean_share(image, colour, texture) >= CLEAN_SHARE)

    def matches(self, shape: str | None = None, colour: str | None = None, texture: str | None = None) -> bool:
        """True when an object is present and every attribute given equals the detected one."""
        wanted = {"shape": shape, "colour": colour, "texture": texture}
        return self.present and all(getattr(self, k) == v for k, v in wanted.items() if v is not None)


def pixel_labels(image: np.ndarray) -> np.ndarray:
    """Label every pixel of ``image`` ``[H, W, 3]`` (0..1) with its nearest reference colour: int ``[H, W]``.

    0 is background, ``1 + k`` colour k, ``1 + K + k`` colour k's dark shade (K = number of colours).
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"playground/detector.py: expected an image [H, W, 3], got shape {image.shape}")
    distance = ((image[:, :, None, :] - REFERENCE[None, None]) ** 2).sum(-1)
    return distance.argmin(-1)


def box_to_pixels(box: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int]:
    """A normalised box ``(x0, y0, x1, y1)`` in [0, 1] as whole pixels ``(x0, y0, x1, y1)``, end exclusive."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"playground/detector.py: box {box} is not a normalised (x0, y0, x1, y1) inside [0, 1]")
    return (int(round(x0 * width)), int(round(y0 * height)), int(round(x1 * width)), int(round(y1 * height)))


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of bool ``mask`` ``[H, W]`` as a bool mask of the same shape."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        blob, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def line_impurity(dark: np.ndarray, blob: np.ndarray) -> float:
    """Mean over the rows of ``blob`` (3 pixels or more) of the minority shade's share in that row; 1.0 when no
    row qualifies. 0 when every row is of one shade."""
    impurities = []
    for row in range(blob.shape[0]):
        inside = blob[row]
        if inside.sum() >= 3:
            share = float(dark[row][inside].mean())
            impurities.append(min(share, 1.0 - share))
    return float(np.mean(impurities)) if impurities else 1.0


def classify_texture(dark: np.ndarray, blob: np.ndarray) -> str:
    """``solid`` / ``striped`` / ``barred`` / ``checkered`` from the dark-shade pixels ``dark`` inside ``blob``
    (bool [H, W])."""
    if float(dark[blob].mean()) < SOLID_BELOW:
        return "solid"
    if line_impurity(dark, blob) < STRIPED_BELOW:
        return "striped"
    if line_impurity(dark.T, blob.T) < STRIPED_BELOW:
        return "barred"
    return "checkered"


def fit_shape(blob: np.ndarray, shapes: tuple[str, ...] = ALL_SHAPES) -> tuple[str, float]:
    """The shape whose drawing fills the blob's bounding box best, and its IoU with ``blob`` (bool ``[H, W]``)."""
    ys, xs = np.nonzero(blob)
    x0, x1, y0, y1 = float(xs.min()), float(xs.max() + 1), float(ys.min()), float(ys.max() + 1)
    best_shape, best_iou = shapes[0], -1.0
    for shape in shapes:
        u0, v0, u1, v1 = shape_extent(shape)
        radius = 0.5 * ((x1 - x0) / (u1 - u0) + (y1 - y0) / (v1 - v0))
        cx, cy = x0 - u0 * radius + 0.5 * ((x1 - x0) - (u1 - u0) * radius), y0 - v0 * radius
        cy += 0.5 * ((y1 - y0) - (v1 - v0) * radius)
        drawn = shape_mask(shape, cx, cy, radius, size=max(blob.shape))[: blob.shape[0], : blob.shape[1]]
        iou = float((drawn & blob).sum() / max((drawn | blob).sum(), 1))
        if iou > best_iou:
            best_shape, best_iou = shape, iou
    return best_shape, best_iou


def detect(image: np.ndarray, box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> Detection:
    """Detect the object in the normalised ``box`` of ``image`` ``[H, W, 3]`` (float 0..1).

    Pixels outside the box are ignored, so an object cut by the box is judged by its visible part.
    """
    labels = pixel_labels(image)
    height, width = labels.shape
    bx0, by0, bx1, by1 = box_to_pixels(box, height, width)
    region = np.zeros_like(labels, dtype=bool)
    region[by0:by1, bx0:bx1] = True
    blob = largest_blob((labels != 0) & region)
    area = int(blob.sum())
    if area < MIN_AREA:
        return Detection(present=False, shape=None, colour=None, texture=None, area=area, shape_fit=0.0,
                         box_pixels=(bx0, by0, bx1, by1))
    count = len(COLOUR_NAMES)
    colour_index = (labels[blob] - 1) % count
    colour = COLOUR_NAMES[int(np.bincount(colour_index, minlength=count).argmax())]
    texture = classify_texture(labels > count, blob)
    shape, fit = fit_shape(blob)
    return Detection(present=True, shape=shape, colour=colour, texture=texture, area=area, shape_fit=fit,
                     box_pixels=(bx0, by0, bx1, by1), blob=blob)


def background_leakage(image: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> float:
    """Fraction of the pixels outside every normalised box that are not background (0 = a clean background)."""
    labels = pixel_labels(image)
    height, width = labels.shape
    outside = np.ones_like(labels, dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = box_to_pixels(box, height, width)
        outside[y0:y1, x0:x1] = False
    if not outside.any():
        return 0.0
    return float((labels[outside] != 0).mean())
