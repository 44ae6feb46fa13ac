"""The one path-confinement check. Every file the pack opens because of a workflow, a route or the library
index goes through :func:`confine`: the path's symlinks are resolved, the real path must lie inside the real
path of one of the configured folders, and both the name and the real file must have an allowed suffix.

:func:`find_in_folders` turns a name from a workflow (``styles/ink.safetensors``) into such a path; absolute
names, ``..`` segments and drive letters are refused before anything is looked up, so the answer never says
whether some path outside the folders exists.
"""
from __future__ import annotations

import os
import re
from collections.abc import Collection, Sequence
from pathlib import Path

from .safetensors_header import SAFETENSORS_SUFFIXES, pickle_refusal


class OutsideFoldersError(ValueError):
    """A name or path that is not a file of an allowed type inside the configured folders."""


def inside(real_path: str, real_folders: Sequence[str]) -> bool:
    """Whether ``real_path`` (already resolved) is one of ``real_folders`` (resolved) or below one."""
    return any(real_path == f or real_path.startswith(f.rstrip(os.sep) + os.sep) for f in real_folders)


def suffix_refusal(name: str, suffixes: Collection[str] = SAFETENSORS_SUFFIXES) -> str | None:
    """Why a file named ``name`` is never opened (a pickle, or a type not in ``suffixes``), else ``None``."""
    suffix = Path(name).suffix.lower()
    if suffix in suffixes:
        return None
    return pickle_refusal(name) or (f"{suffix or '(no suffix)'} files are not read here (only "
                                    f"{', '.join(sorted(suffixes))})")


def relative_name(name: str, what: str = "name") -> str:
    """``name`` as a ``/``-separated path relative to a folder; absolute paths, drive letters, ``..`` segments
    and NUL bytes raise :class:`OutsideFoldersError` (without looking at the disk)."""
    ref = name.replace("\\", "/").strip()
    parts = [p for p in ref.split("/") if p not in ("", ".")]
    if (not ref or ref.startswith("/") or re.match(r"^[A-Za-z]:", ref) or ".." in parts or "\0" in ref
            or not parts):
        raise OutsideFoldersError(f"{what} {name[:200]!r} must be a path relative to the model folder (no "
                                  "absolute paths, no '..')")
    return "/".join(parts)


def confine(path: str | os.PathLike[str], folders: Sequence[str | os.PathLike[str]],
            suffixes: Collection[str] = SAFETENSORS_SUFFIXES, *, what: str = "file") -> str:
    """``path`` (absolute, as joined from a folder) if it is a regular file whose real path, symlinks resolved,
    lies inside the real path of one of ``folders`` and whose name and real name end in one of ``suffixes``.

    Returns the path as given (so messages show the user's name for it); raises :class:`OutsideFoldersError`
    with one message for "outside" whether or not the path exists.
    """
    shown = os.fspath(path)
    real_folders = [os.path.realpath(f) for f in folders]
    real = os.path.realpath(shown)
    if not inside(real, real_folders):
        raise OutsideFoldersError(f"{what} {shown!r} is outside the configured folders "
                                  f"({', '.join(map(os.fspath, folders)) or 'none'}); not opened")
    for name in (shown, real):
        refusal = suffix_refusal(name, suffixes)
        if refusal:
            raise OutsideFoldersError(f"{what} {shown!r}: {refusal}")
    if not os.path.isfile(real):
        raise FileNotFoundError(f"{what} {shown!r} is not a file in "
                                f"{', '.join(map(os.fspath, folders)) or 'the configured folders'}")
    return shown


def find_in_folders(name: str, folders: Sequence[str | os.PathLike[str]],
                    suffixes: Collection[str] = SAFETENSORS_SUFFIXES, *, what: str = "file") -> str | None:
    """The confined path of ``name`` (relative) in the first of ``folders`` that has it, else ``None``.

    A file that exists but fails :func:`confine` (a symlink leading outside, a pickle) raises
    :class:`OutsideFoldersError` rather than being skipped for a same-named file further down.
    """
    relative = relative_name(name, what)
    for folder in folders:
        candidate = os.path.join(os.fspath(folder), *relative.split("/"))
        if os.path.lexists(candidate):
            if os.path.isdir(candidate):
                continue
            return confine(candidate, folders, suffixes, what=what)
    return None
