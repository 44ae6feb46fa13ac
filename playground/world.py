"""The playground world: flat objects on a plain background, drawn exactly from a seed, with captions.

Everything here is pure (numpy + stdlib). An image is ``float32 [H, W, 3]`` in ``[0, 1]``; a scene holds at most
one object per half of the canvas. Objects have a shape, a colour, a texture and a position word. Textures paint
the object's dark shade (``DARK_SHADE`` x colour) in a pattern aligned to the canvas grid, so an object's outline
never depends on its texture. The base model sees :data:`BASE_SHAPES` and :data:`BASE_TEXTURES`; each
:class:`Concept` adds one shape or texture that only its concept LoRA is trained on.

World v2 adds LoRAs that interfere when merged, as real ones do: two *object* LoRAs taught on the same class
word ("a red toy on the left": one draws a star, the other a ring), and a *style* LoRA with no trigger word that
repaints every object it reaches with vertical bars (a texture no caption names). Captions name an object's
attributes with the words of :meth:`Concept.caption_words`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
BACKGROUND = (0.92, 0.92, 0.92)
DARK_SHADE = 0.45
TEXTURE_CELL = 4  # pixels per checker cell / stripe, aligned to the canvas grid

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.72, 0.22),
    "blue": (0.15, 0.30, 0.92),
    "yellow": (0.96, 0.84, 0.10),
}
BASE_SHAPES = ("circle", "square", "triangle")
BASE_TEXTURES = ("solid", "checkered")
ALL_SHAPES = ("circle", "square", "triangle", "star", "ring")
ALL_TEXTURES = ("solid", "checkered", "striped", "barred")
STYLE_TEXTURES = ("barred",)  # textures no word names: only a trigger-less style LoRA draws them
CLASS_WORDS = ("toy",)  # nouns that name no base shape: object LoRAs share them
POSITIONS = ("left", "right", "center")
RING_HOLE = 0.55  # inner radius of a ring, as a fraction of its outer radius
STAR_INNER = 0.45  # inner radius of a five-pointed star, as a fraction of its outer radius
RADIUS_RANGE = (12.0, 13.5)  # pixels; an object's outer radius is drawn uniformly from this range
CENTRE_JITTER = 1.0  # pixels; an object's centre lies within this of its position's anchor, in x and in y
ANCHORS = {"left": (16.0, 32.0), "right": (48.0, 32.0), "center": (32.0, 32.0)}


@dataclass(frozen=True)
class Concept:
    """A concept the base never saw: one new shape or texture (``value``), taught by a LoRA.

    ``trigger`` is the caption word that stands for the value: its own name (``star``), a class word several
    concepts share (``toy``), or ``""`` for a style: a LoRA trained on captions that never mention it, which
    paints its value onto every object of its training scenes (and so onto every object it reaches)."""

    name: str
    trigger: str
    kind: str  # "shape" | "texture"
    value: str

    @property
    def is_style(self) -> bool:
        """No trigger word: the LoRA acts on every object, whatever the prompt says."""
        return not self.trigger

    def caption_words(self) -> dict[str, str]:
        """``{value: word}`` for captions: the word a caption uses for this concept's value (``""``: none)."""
        return {self.value: self.trigger}


CONCEPTS: tuple[Concept, ...] = (
    Concept(name="star", trigger="star", kind="shape", value="star"),
    Concept(name="ring", trigger="ring", kind="shape", value="ring"),
    Concept(name="stripes", trigger="striped", kind="texture", value="striped"),
    Concept(name="star_toy", trigger="toy", kind="shape", value="star"),
    Concept(name="ring_toy", trigger="toy", kind="shape", value="ring"),
    Concept(name="bars", trigger="", kind="texture", value="barred"),
)


@dataclass(frozen=True)
class WorldObject:
    """One object: centre ``(cx, cy)`` and outer ``radius`` in pixels; ``position`` is its caption word."""

    shape: str
    colour: str
    texture: str
    position: str
    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """A canvas of ``size x size`` pixels with its objects and the caption the model is trained on."""

    objects: tuple[WorldObject, ...]
    caption: str
    size: int = IMAGE_SIZE


def concept(name: str) -> Concept:
    """The :class:`Concept` called ``name``; raises ``KeyError`` listing the known names."""
    for item in CONCEPTS:
        if item.name == name:
            return item
    raise KeyError(f"playground/world.py: unknown concept {name!r}; known: {[c.name for c in CONCEPTS]}")


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x [H, W], y [H, W])``."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(coords, coords, indexing="xy")


def _polygon_mask(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon for pixel centres; ``vertices`` ``[N, 2]`` as (x, y). Returns bool ``[H, W]``."""
    inside = np.zeros(x.shape, dtype=bool)
    count = len(vertices)
    for index in range(count):
        (x0, y0), (x1, y1) = vertices[index], vertices[(index + 1) % count]
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_cross)
    return inside


def star_vertices(cx: float, cy: float, radius: float) -> np.ndarray:
    """The ten corners ``[10, 2]`` of a five-pointed star pointing up."""
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, radius, radius * STAR_INNER)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bool ``[size, size]``: the pixels whose centres fall inside ``shape`` at ``(cx, cy)`` with ``radius``."""
    x, y = _pixel_grid(size)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "ring":
        distance = dx * dx + dy * dy
        return (distance <= radius * radius) & (distance >= (RING_HOLE * radius) ** 2)
    if shape == "square":
        return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "triangle":
        corners = np.array([[cx, cy - radius], [cx + radius, cy + radius], [cx - radius, cy + radius]])
        return _polygon_mask(x, y, corners)
    if shape == "star":
        return _polygon_mask(x, y, star_vertices(cx, cy, radius))
    raise ValueError(f"playground/world.py: unknown shape {shape!r}; known: {ALL_SHAPES}")


def shape_extent(shape: str) -> tuple[float, float, float, float]:
    """The shape's bounding box ``(u0, v0, u1, v1)`` in units of its radius, relative to its centre."""
    if shape == "star":
        corners = star_vertices(0.0, 0.0, 1.0)
        return (float(corners[:, 0].min()), -1.0, float(corners[:, 0].max()), float(corners[:, 1].max()))
    if shape in ALL_SHAPES:
        return (-1.0, -1.0, 1.0, 1.0)
    raise ValueError(f"playground/world.py: unknown shape {shape!r}; known: {ALL_SHAPES}")


def texture_mask(texture: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bool ``[size, size]``: where ``texture`` paints the dark shade (nowhere for ``solid``)."""
    cells = np.arange(size) // TEXTURE_CELL
    if texture == "solid":
        return np.zeros((size, size), dtype=bool)
    if texture == "checkered":
        return (cells[:, None] + cells[None, :]) % 2 == 1
    if texture == "striped":
        return np.broadcast_to(cells[:, None] % 2 == 1, (size, size)).copy()
    if texture == "barred":
        return np.broadcast_to(cells[None, :] % 2 == 1, (size, size)).copy()
    raise ValueError(f"playground/world.py: unknown texture {texture!r}; known: {ALL_TEXTURES}")


def render(scene: Scene) -> np.ndarray:
    """Draw ``scene`` exactly: float32 ``[size, size, 3]`` in ``[0, 1]``; later objects paint over earlier ones."""
    image = np.empty((scene.size, scene.size, 3), dtype=np.float32)
    image[:] = BACKGROUND
    for item in scene.objects:
        if item.colour not in COLOURS:
            raise ValueError(f"playground/world.py: unknown colour {item.colour!r}; known: {tuple(COLOURS)}")
        mask = shape_mask(item.shape, item.cx, item.cy, item.radius, scene.size)
        colour = np.asarray(COLOURS[item.colour], dtype=np.float32)
        dark = texture_mask(item.texture, scene.size)
        image[mask & ~dark] = colour
        image[mask & dark] = colour * DARK_SHADE
    return image


def _object_phrase(item: WorldObject, rng: np.random.Generator, with_position: bool,
                   names: dict[str, str]) -> str:
    """``"a red checkered circle on the left"``; a solid texture is named only sometimes; ``names`` renames an
    attribute value (``{"star": "toy"}``; ``""`` leaves it unnamed)."""
    words = ["a"]
    if rng.random() > 0.1:
        words.append(item.colour)
    if item.texture != "solid":
        words.append(names.get(item.texture, item.texture))
    elif rng.random() < 0.25:
        words.append("solid")
    words.append(names.get(item.shape, item.shape))
    if with_position:
        words += ["on", "the", item.position] if item.position != "center" else ["in", "the", "center"]
    return " ".join(word for word in words if word)


def describe(objects: tuple[WorldObject, ...], rng: np.random.Generator, names: dict[str, str] | None = None) -> str:
    """A caption for ``objects``: one phrase per object joined by "and", in random order; ``names`` as in
    :func:`_object_phrase`."""
    if not objects:
        return "empty"
    with_position = len(objects) > 1 or rng.random() < 0.8
    order = list(objects) if len(objects) < 2 or rng.random() < 0.5 else list(objects)[::-1]
    return " and ".join(_object_phrase(item, rng, with_position, names or {}) for item in order)


def place(position: str, rng: np.random.Generator, shape: str, colour: str, texture: str) -> WorldObject:
    """An object at ``position``: radius in :data:`RADIUS_RANGE`, centre within :data:`CENTRE_JITTER` of its anchor.

    The geometry is kept tight on purpose: a few thousand CPU steps teach a tiny Flux the shapes when objects sit
    where their position word says (tried: radius 9-12.5 with 8 px of vertical jitter left shapes at chance).
    """
    radius = float(rng.uniform(*RADIUS_RANGE))
    anchor_x, anchor_y = ANCHORS[position]
    cx = anchor_x + float(rng.uniform(-CENTRE_JITTER, CENTRE_JITTER))
    cy = anchor_y + float(rng.uniform(-CENTRE_JITTER, CENTRE_JITTER))
    return WorldObject(shape=shape, colour=colour, texture=texture, position=position, cx=cx, cy=cy, radius=radius)


def sample_scene(rng: np.random.Generator, shapes: tuple[str, ...] = BASE_SHAPES,
                 textures: tuple[str, ...] = BASE_TEXTURES, featured: Concept | None = None,
                 empty_caption: float = 0.0) -> Scene:
    """A random scene of one or two objects drawn from ``shapes`` x ``textures``.

    With ``featured`` the first object always carries that concept (its shape or texture; a style: every object),
    and the caption names it by the concept's trigger word (a style: not at all). ``empty_caption`` is the
    chance of an empty caption (for classifier-free guidance).
    """
    count = 1 if rng.random() < 0.5 else 2
    positions = [str(rng.choice(POSITIONS))] if count == 1 else list(rng.permutation(["left", "right"]))
    objects = []
    for index, position in enumerate(positions):
        shape, texture = str(rng.choice(shapes)), str(rng.choice(textures))
        if featured is not None and (index == 0 or featured.is_style):
            shape = featured.value if featured.kind == "shape" else shape
            texture = featured.value if featured.kind == "texture" else texture
        objects.append(place(position, rng, shape, str(rng.choice(list(COLOURS))), texture))
    names = featured.caption_words() if featured is not None else None
    caption = "" if rng.random() < empty_caption else describe(tuple(objects), rng, names)
    return Scene(objects=tuple(objects), caption=caption)


def scene_batch(seed: int, count: int, featured: Concept | None = None,
                empty_caption: float = 0.0) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``count`` scenes from ``seed``: images ``[count, H, W, 3]``, captions, and the scenes themselves."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, featured=featured, empty_caption=empty_caption) for _ in range(count)]
    return np.stack([render(scene) for scene in scenes]), [scene.caption for scene in scenes], scenes
