"""The retrieval layer's one bridge to ComfyUI: the configured ``loras`` folders and resolving a LoRA reference
(name + sha256) to a file inside them. Never returns a path outside the configured folders."""
from __future__ import annotations

import logging
import os

import folder_paths

logger = logging.getLogger(__name__)


def lora_roots() -> list[str]:
    """Every folder ComfyUI is configured to read LoRAs from (models/loras, extra_model_paths.yaml, ...)."""
    return [os.path.realpath(p) for p in folder_paths.get_folder_paths("loras")]


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def inside_roots(path: str, roots: list[str] | None = None) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, root]) == root for root in (roots or lora_roots()))


def resolve_lora(name: str, sha256: str | None = None) -> str:
    """The file for a LoRA reference. With a sha256, the file must have that hash: a same-named file with other
    content is refused rather than silently used; a renamed file is found by hash through the library index."""
    path = folder_paths.get_full_path("loras", name)
    if path is not None and sha256:
        from ..composition.loading import file_sha256

        actual = file_sha256(path)
        if actual != sha256:
            found = _find_by_hash(sha256)
            if found:
                logger.info("LoRA %r: %s has another hash; using %s which matches %s", name, path, found, sha256[:12])
                return found
            raise ValueError(f"LoRA {name!r}: the file {path} has sha256 {actual[:12]}…, but the workflow asks "
                             f"for {sha256[:12]}…; refusing to use a different LoRA")
    if path is not None:
        return path
    if sha256:
        found = _find_by_hash(sha256)
        if found:
            return found
    hint = f" (sha256 {sha256})" if sha256 else ""
    raise FileNotFoundError(f"LoRA {name!r}{hint} is not in your loras folders: {', '.join(lora_roots())}")


def _find_by_hash(sha256: str) -> str | None:
    """Look the hash up in the library index (if the library has been scanned); only paths inside the roots."""
    try:
        from .library_bridge import library
    except ImportError:
        return None
    found = library().resolve(None, sha256)
    if found and inside_roots(str(found)):
        return str(found)
    return None
