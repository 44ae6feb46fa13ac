"""Bridge tier: ComfyUI imported in-process (``--cpu``, a throw-away base directory), the pack loaded as
``lora_loom`` the way ComfyUI loads custom nodes."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from lora_loom.comfy_env import find_comfyui, import_comfy

BASE_DIR = Path(tempfile.mkdtemp(prefix="loom-bridge-"))
atexit.register(shutil.rmtree, BASE_DIR, True)
import_comfy(find_comfyui(os.environ.get("COMFYUI_PATH") or str(Path(__file__).parents[2] / ".loom" / "comfyui")),
             cpu=True, base_directory=str(BASE_DIR))

