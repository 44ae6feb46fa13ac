"""Thumbnails of the example workflows from their real outputs: ``python -m loomdev.thumbnails``.

Runs every example of :data:`loomdev.examples.EXAMPLES_LIST` on a server of its own, takes the images its
SaveImage nodes wrote (side by side, same height) and writes ``example_workflows/<title>.jpg``: the name
ComfyUI's template browser asks for. Each JPEG's comment holds the sha256 of the workflow JSON it was made
from, so a test can tell a thumbnail made from another version of its workflow (regenerate after
``python -m loomdev.examples``).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from PIL import Image

from .examples import EXAMPLES, EXAMPLES_LIST
from .run import run_workflow
from .server import ComfyServer, prepare_workspace

log = logging.getLogger(__name__)

HEIGHT = 256
GAP = 8
COMMENT_PREFIX = "lora-loom workflow sha256 "


def workflow_digest(path: Path) -> str:
    """sha256 of a workflow file's bytes (what a thumbnail's comment names)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def thumbnail_digest(path: Path) -> str | None:
    """The workflow sha256 a thumbnail was made from (``None`` when it names none)."""
    with Image.open(path) as img:
        comment = img.info.get("comment", b"")
    text = comment.decode() if isinstance(comment, bytes) else str(comment)
    return text.removeprefix(COMMENT_PREFIX) if text.startswith(COMMENT_PREFIX) else None


def side_by_side(images: list[Path]) -> Image.Image:
    """The images at one height (nearest: the playground's pixels stay sharp), left to right on white."""
    tiles = []
    for path in images:
        with Image.open(path) as img:
            tiles.append(img.convert("RGB").resize((round(img.width * HEIGHT / img.height), HEIGHT), Image.NEAREST))
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + GAP * (len(tiles) - 1), HEIGHT), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + GAP
    return sheet


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[loom thumbnails] %(message)s")
    with ComfyServer(prepare_workspace()) as server:
        for item in EXAMPLES_LIST:
            workflow = EXAMPLES / item.file_name
            images = sorted(run_workflow(server, workflow), key=lambda p: p.name)
            if not images:
                raise RuntimeError(f"{workflow.name} produced no image")
            out = workflow.with_suffix(".jpg")
            side_by_side(images).save(out, quality=88, comment=(COMMENT_PREFIX + workflow_digest(workflow)).encode())
            log.info("wrote %s from %s", out.name, ", ".join(p.name for p in images))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
