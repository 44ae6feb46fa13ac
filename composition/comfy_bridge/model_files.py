"""ComfyUI's model folders (``folder_paths``) seen through the pack's one confinement check
(:func:`lora_loom.files.folders.confine`): every file a node, a route or a resolver opens by name comes from
:func:`model_file`, so it is a file of an allowed type whose real path lies inside the configured folders
of its kind (``models/loras``, ``models/loom_gates``, ``extra_model_paths.yaml`` entries ...).
"""
from __future__ import annotations

import os
from collections.abc import Collection

import folder_paths

from ...files.folders import OutsideFoldersError, confine, find_in_folders
from ...files.safetensors_header import SAFETENSORS_SUFFIXES


def model_folders(kind: str) -> list[str]:
    """The folders ComfyUI reads ``kind`` (``loras``, ``loom_gates``, ...) from; empty when unknown."""
    if kind not in folder_paths.folder_names_and_paths and folder_paths.map_legacy(kind) == kind:
        return []
    return list(folder_paths.get_folder_paths(kind))


def model_file(kind: str, name: str, suffixes: Collection[str] = SAFETENSORS_SUFFIXES) -> str:
    """The file ``name`` (relative, as a workflow or combo names it) in the ``kind`` folders.

    Raises :class:`~lora_loom.files.folders.OutsideFoldersError` for absolute names, ``..``, symlinks leading
    outside and refused types (pickles), and ``FileNotFoundError`` naming the folders when it is not there.
    """
    folders = model_folders(kind)
    found = find_in_folders(name, folders, suffixes, what=f"{kind} file")
    if found is None:
        raise FileNotFoundError(f"{kind} file {name!r} is not in your {kind} folders: {', '.join(folders) or 'none'}")
    return found


def confined_model_path(kind: str, path: str | os.PathLike[str],
                        suffixes: Collection[str] = SAFETENSORS_SUFFIXES) -> str:
    """``path`` (already joined, e.g. from the library index) if it passes the confinement check for ``kind``."""
    return confine(path, model_folders(kind), suffixes, what=f"{kind} file")


__all__ = ["OutsideFoldersError", "confined_model_path", "model_file", "model_folders"]
