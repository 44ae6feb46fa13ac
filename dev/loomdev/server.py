"""Start and stop a real ComfyUI server for this clone, and talk to it over HTTP.

The server runs ComfyUI's own ``main.py`` (from the cached runtime or ``$COMFYUI_PATH``) with
``--base-directory .loom/workspace``: that folder holds ``custom_nodes/lora-loom`` (a link to this clone), the demo
and playground LoRAs, and ``extra_model_paths.yaml`` registering the demo models' cache folder. Whatever is started
here is stopped here (context manager, process group, SIGKILL fallback).
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
    """Create the ComfyUI base directory with this pack linked into custom_nodes, the demo models registered and the
    demo LoRAs (``loom_demo_*.safetensors``) and the playground's concept LoRAs (``playground_*.safetensors``),
    with previews, copied into ``models/loras``."""
    for sub in ("custom_nodes", "input", "output", "temp", "user", *(f"models/{m}" for m in MODEL_FOLDERS)):
        (workspace / sub).mkdir(parents=True, exist_ok=True)
    _link(workspace / "custom_nodes" / "lora-loom", REPO)
    fixtures = ensure_fixtures()
    for folder, name in (("diffusion_models", FLUX_FILE), ("text_encoders", CLIP_FILE), ("vae", VAE_FILE)):
        old_link = workspace / "models" / folder / name  # earlier set-ups linked each file into models/
        if old_link.is_symlink():
            old_link.unlink()
    # The demo models stay in the fixture cache, registered as a model folder the way a user registers models kept
    # elsewhere (extra_model_paths.yaml): their real paths lie inside a configured folder, as the pack requires.
    extra_paths(workspace).write_text(
        "loom_demo_models:\n"
        f"    base_path: {fixtures}\n"
        "    diffusion_models: .\n    text_encoders: .\n    vae: .\n", encoding="utf-8")
    place_demo_loras(workspace / "models" / "loras")
    place_playground_loras(workspace / "models" / "loras")
    return workspace


def extra_paths(workspace: Path) -> Path:
    """The workspace's model-folder config, passed to the server with ``--extra-model-paths-config``."""
    return workspace / "extra_model_paths.yaml"


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
        paths = ["--extra-model-paths-config", str(extra_paths(workspace))] if extra_paths(workspace).is_file() else []
        super().__init__(comfyui_path(), workspace, port=port, log_path=log_path,
                         extra_args=[*paths, *(extra_args or [])])


__all__ = ["ComfyServer", "free_port", "prepare_workspace"]
