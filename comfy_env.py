"""Finding and importing ComfyUI outside a running server (the ``loom`` commands, the benchmarks, playground
training), the way ComfyUI's main.py prepares itself."""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent


class ComfyNotFound(RuntimeError):
    """No ComfyUI installation could be located."""


def is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "folder_paths.py").is_file()


def find_comfyui(explicit: str | None = None) -> Path:
    """``--comfyui`` > ``$COMFYUI_PATH`` > the ComfyUI whose ``custom_nodes`` holds this pack > a dev checkout's
    ``.loom/comfyui`` > an importable one."""
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("--comfyui", Path(explicit)))
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(("$COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"])))
    if PACK_DIR.parent.name == "custom_nodes":
        candidates.append(("pack location", PACK_DIR.parent.parent))
    if (PACK_DIR / ".loom" / "comfyui").is_dir():  # a development checkout set up by dev/bootstrap.sh
        candidates.append(("dev checkout", PACK_DIR / ".loom" / "comfyui"))
    for entry in sys.path:
        if entry and is_comfyui(Path(entry)):
            candidates.append(("sys.path", Path(entry)))
    for source, path in candidates:
        if is_comfyui(path):
            return path.resolve()
        if source != "sys.path":
            raise ComfyNotFound(f"{source} points at {path}, which is not a ComfyUI folder (no main.py/comfy/)")
    raise ComfyNotFound("ComfyUI not found: pass --comfyui PATH, set COMFYUI_PATH, or run from ComfyUI/custom_nodes")


def comfyui_version(path: Path) -> str:
    """Read ``__version__`` from ComfyUI's comfyui_version.py without importing ComfyUI."""
    version_file = path / "comfyui_version.py"
    if version_file.is_file():
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def import_comfy(path: Path, cpu: bool = True, base_directory: str | None = None) -> None:
    """Put ComfyUI on sys.path and let it parse its own argv (``--cpu``, ``--base-directory``) once."""
    if str(path) not in sys.path:
        sys.path.append(str(path))
    if "comfy.cli_args" in sys.modules:
        return
    argv = ["main.py"] + (["--cpu"] if cpu else [])
    if base_directory:
        argv += ["--base-directory", str(base_directory)]
    import comfy.options

    comfy.options.enable_args_parsing()
    saved, sys.argv = sys.argv, argv
    try:
        import comfy.cli_args  # noqa: F401  (parses argv here)
    finally:
        sys.argv = saved
