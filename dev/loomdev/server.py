"""Start and stop a real ComfyUI server for this clone, and talk to it over HTTP.

The server runs ComfyUI's own ``main.py`` (from the cached runtime or ``$COMFYUI_PATH``) with
``--base-directory .loom/workspace``: that folder holds ``custom_nodes/lora-loom`` (a link to this clone) and the
demo models. Whatever is started here is stopped here (context manager, process group, SIGKILL fallback).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from lora_loom.bench.comfy_server import ComfyServer as _ComfyServer
from lora_loom.bench.comfy_server import _die_with_parent, free_port  # noqa: F401  (tests/e2e/test_server.py)

from .demo_loras import place_demo_loras
from .fixtures import CLIP_FILE, FLUX_FILE, VAE_FILE, ensure_fixtures
from .paths import REPO, WORKSPACE, comfyui_path
from .playground_loras import place_playground_loras

log = logging.getLogger(__name__)

MODEL_FOLDERS = ("diffusion_models", "text_encoders", "clip", "vae", "loras", "checkpoints")


def prepare_workspace(workspace: Path = WORKSPACE) -> Path:
    """Create the ComfyUI base directory with this pack linked into custom_nodes, the demo models linked and the
    demo LoRAs (``loom_demo_*.safetensors``) and the playground's concept LoRAs (``playground_*.safetensors``),
    with previews, copied into ``models/loras``."""
    for sub in ("custom_nodes", "input", "output", "temp", "user", *(f"models/{m}" for m in MODEL_FOLDERS)):
        (workspace / sub).mkdir(parents=True, exist_ok=True)
    _link(workspace / "custom_nodes" / "lora-loom", REPO)
    fixtures = ensure_fixtures()
    _link(workspace / "models" / "diffusion_models" / FLUX_FILE, fixtures / FLUX_FILE)
    _link(workspace / "models" / "text_encoders" / CLIP_FILE, fixtures / CLIP_FILE)
    _link(workspace / "models" / "vae" / VAE_FILE, fixtures / VAE_FILE)
    place_demo_loras(workspace / "models" / "loras")
    place_playground_loras(workspace / "models" / "loras")
    return workspace


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


class ComfyServer(_ComfyServer):
    """The pack's :class:`lora_loom.bench.comfy_server.ComfyServer` on this clone's ComfyUI and workspace."""

    def __init__(self, workspace: Path = WORKSPACE, port: int | None = None, log_path: Path | None = None,
                 extra_args: list[str] | None = None) -> None:
        super().__init__(comfyui_path(), workspace, port=port, log_path=log_path, extra_args=extra_args)


__all__ = ["ComfyServer", "free_port", "prepare_workspace"]
