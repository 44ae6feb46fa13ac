"""The playground's concept LoRAs in the workspace: copied into ``models/loras`` with a preview each.

``prepare_workspace`` places ``playground_<concept>.safetensors`` (the committed files under
``playground/weights/loras``) where ComfyUI's LoRA loaders, the library and its web panel find them, each beside
a ``.preview.png`` drawn exactly by the playground renderer: the concept on a red object, scaled up. Copies, not
links (the library refuses links that leave the loras folders); a file is rewritten only when it differs.
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

from .demo_loras import write_if_different
from .paths import REPO

log = logging.getLogger(__name__)

PLAYGROUND_LORAS = REPO / "playground" / "weights" / "loras"
PREVIEW_SCALE = 2


def preview_png(concept_name: str) -> bytes:
    """A PNG of the concept drawn by the playground renderer: a red object carrying the concept, centred."""
    import numpy as np
    from lora_loom.playground import world
    from PIL import Image

    item = world.concept(concept_name)
    shape = item.value if item.kind == "shape" else "square"
    texture = item.value if item.kind == "texture" else "solid"
    size = world.IMAGE_SIZE
    thing = world.WorldObject(shape=shape, colour="red", texture=texture, position="center", cx=size / 2,
                              cy=size / 2, radius=size * 0.36)
    pixels = world.render(world.Scene(objects=(thing,), caption=""))
    image = Image.fromarray((pixels * 255).round().astype(np.uint8)).resize(
        (size * PREVIEW_SCALE, size * PREVIEW_SCALE), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def place_playground_loras(loras_folder: Path) -> list[Path]:
    """Copy every playground concept LoRA and write its preview into ``loras_folder``; the LoRA files placed."""
    placed = []
    for source in sorted(PLAYGROUND_LORAS.glob("playground_*.safetensors")):
        target = loras_folder / source.name
        write_if_different(target, source.read_bytes())
        concept_name = source.stem.removeprefix("playground_")
        write_if_different(loras_folder / f"{source.stem}.preview.png", preview_png(concept_name))
        placed.append(target)
    if not placed:
        raise FileNotFoundError(f"{PLAYGROUND_LORAS}: no playground_*.safetensors; train them with "
                                f"`loom playground train`")
    return placed


def playground_sha256(file_name: str) -> str:
    """The sha256 of a committed playground LoRA (what the example workflow pins)."""
    return hashlib.sha256((PLAYGROUND_LORAS / file_name).read_bytes()).hexdigest()
