"""Where the development environment lives: the clone's ignored .loom/ folder and the shared cache."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOOM_DIR = REPO / ".loom"
WORKSPACE = LOOM_DIR / "workspace"          # ComfyUI --base-directory for this clone
CACHE = Path(os.environ.get("LOOM_CACHE", Path.home() / ".cache" / "lora-loom"))


def comfyui_path() -> Path:
    """The ComfyUI code in use: $COMFYUI_PATH (a user's own) or the runtime the bootstrap installed."""
    env = os.environ.get("COMFYUI_PATH")
    path = Path(env) if env else LOOM_DIR / "comfyui"
    if not (path / "main.py").is_file():
        raise SystemExit(f"no ComfyUI at {path}: run `bash dev/bootstrap.sh` (or set COMFYUI_PATH)")
    return path.resolve()


def comfyui_version(path: Path | None = None) -> str:
    """ComfyUI's version string, read from comfyui_version.py without importing ComfyUI."""
    text = ((path or comfyui_path()) / "comfyui_version.py").read_text()
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"
