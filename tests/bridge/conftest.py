"""Bridge tier: ComfyUI imported in-process (``--cpu``, a throw-away base directory), the pack loaded as
``lora_loom`` the way ComfyUI loads custom nodes."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from lora_loom.comfy_env import find_comfyui, import_comfy

BASE_DIR = Path(tempfile.mkdtemp(prefix="loom-bridge-"))
atexit.register(shutil.rmtree, BASE_DIR, True)
import_comfy(find_comfyui(os.environ.get("COMFYUI_PATH") or str(Path(__file__).parents[2] / ".loom" / "comfyui")),
             cpu=True, base_directory=str(BASE_DIR))

from comfy_models import empty_loras_folder, tiny_flux  # noqa: E402  (imports ComfyUI, which needs the set-up above)


@pytest.fixture(scope="module")
def flux():
    """A tiny Flux ModelPatcher (seed 0, :func:`comfy_models.tiny_flux`) shared by one module's tests."""
    return tiny_flux(seed=0)


@pytest.fixture()
def loras_folder() -> Path:
    """ComfyUI's (bridge-tier) loras folder, empty before and after the test."""
    yield empty_loras_folder()
    empty_loras_folder()
