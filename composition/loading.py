"""Safe loading of LoRA files: safetensors only, header validated before any tensor is touched.

Pickle-based files (``.ckpt``, ``.pt``, ``.bin``, ``.pth``, ``.pkl``, or anything whose first bytes are a zip or
pickle signature) are refused: unpickling can execute arbitrary code, so they are never opened with torch.
The header goes through the pack's one validator (:mod:`lora_loom.files.safetensors_header`: length, JSON,
dtypes, shapes against byte ranges, offsets tiling the data section) before anything else; tensors are then
read through ``safetensors.safe_open`` and must hold finite values (a NaN in a LoRA turns every image black).

Parsed AdapterSets are kept in one :class:`~lora_loom.bounded_cache.BoundedCache` by content hash, device and
dtype, bounded by bytes (``LOOM_ADAPTER_CACHE_MB``, default 2048); file hashes are cached by
``(path, size, mtime_ns)``. A load pinned to a sha256 (a workflow row, a library pick) hashes the file it opens
every time instead: a file rewritten with its size and mtime restored is caught, never used in its place.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..bounded_cache import BoundedCache, tensor_bytes
from ..files.safetensors_header import HeaderError, SafetensorsHeader, TensorEntry, UnsafeFileError, read_header
from .adapters import AdapterSet
from .formats import read_adapter_set

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
DEFAULT_ADAPTER_CACHE_MB = 2048


def _adapter_cache_mb() -> int:
    """``LOOM_ADAPTER_CACHE_MB`` (MiB of parsed LoRAs kept in memory), or the default when unset or unreadable."""
    raw = os.environ.get("LOOM_ADAPTER_CACHE_MB", str(DEFAULT_ADAPTER_CACHE_MB))
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        logger.warning("LOOM_ADAPTER_CACHE_MB=%r is not a whole number of MiB >= 0; using %d", raw,
                       DEFAULT_ADAPTER_CACHE_MB)
        return DEFAULT_ADAPTER_CACHE_MB
    return value


ADAPTER_CACHE_MB = _adapter_cache_mb()


class CorruptTensorError(ValueError):
    """A tensor whose values cannot be used (NaN or infinity, or integers where weights belong)."""


class PinnedHashError(ValueError):
    """The file at a pinned path no longer has the content the workflow asked for."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of the whole file, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


_SHA_BY_STAT: BoundedCache[tuple[str, int, int], str] = BoundedCache("file hashes", max_entries=16384)
_SETS: BoundedCache[tuple[str, str, str], AdapterSet] = BoundedCache(
    "adapter sets", max_bytes=ADAPTER_CACHE_MB << 20, weigh=tensor_bytes)


def _stat_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def cached_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of ``path``, recomputed only when its ``(path, size, mtime_ns)`` changes."""
    key = _stat_key(path)
    return _SHA_BY_STAT.get_or_put(key, lambda: file_sha256(path))


def verified_sha256(path: str | os.PathLike[str], expected: str) -> str:
    """Hash ``path`` now (no stat shortcut) and require ``expected`` (64 hex); raise :class:`PinnedHashError`."""
    key = _stat_key(path)
    actual = _SHA_BY_STAT.put(key, file_sha256(path))
    if actual != expected.strip().lower():
        raise PinnedHashError(f"{os.fspath(path)}: has sha256 {actual[:12]}…, but {expected[:12]}… was asked for "
                              "(the file changed since it was indexed or picked); refusing to use other content")
    return actual


def clear_cache() -> None:
    """Forget every cached hash and AdapterSet."""
    _SHA_BY_STAT.clear()
    _SETS.clear()


def _checked(path: Path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if its values can be used; :class:`CorruptTensorError` naming the file and key otherwise."""
    if tensor.is_floating_point():
        values = tensor if tensor.element_size() > 1 else tensor.float()
        if tensor.numel() and not bool(torch.isfinite(values).all()):
            raise CorruptTensorError(f"{path.name}: tensor {key!r} holds NaN or infinite values; the file is "
                                     "corrupt (a LoRA like this turns every image black)")
    elif tensor.numel() > 1:
        raise CorruptTensorError(f"{path.name}: tensor {key!r} has integer dtype {tensor.dtype}; LoRA weights "
                                 "are floating point")
    return tensor


def load_adapter_set(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None, sha256: str | None = None) -> AdapterSet:
    """Parse a LoRA file into an AdapterSet (cached by content hash, device and dtype).

    ``sha256`` pins the content: the file is hashed now and must match (:class:`PinnedHashError`).
    Raises UnsafeFileError (pickles), HeaderError (bad header), CorruptTensorError (NaN/inf weights),
    formats.NotFluxLoRAError (foreign model / no Flux keys) or ValueError naming the file and key for
    malformed adapters. ``dtype`` casts floating tensors.
    """
    path = Path(path)
    header = read_header(path)
    sha = verified_sha256(path, sha256) if sha256 else cached_sha256(path)
    cache_key = (sha, str(device), str(dtype))
    cached = _SETS.get(cache_key)
    if cached is not None:
        return cached
    state_dict: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                t = _checked(path, key, f.get_tensor(key))
                state_dict[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    except (CorruptTensorError, OSError):
        raise
    except Exception as err:  # safetensors' own errors (the file changed after its header was checked)
        raise HeaderError(path, f"safetensors could not read it ({err})") from err
    logger.info("%s: %d tensors, sha256 %s", path.name, len(state_dict), sha[:10])
    adapter_set = read_adapter_set(state_dict, path.name, metadata=dict(header.metadata), sha256=sha)
    return _SETS.put(cache_key, adapter_set)


__all__ = ["CorruptTensorError", "HeaderError", "PinnedHashError", "SafetensorsHeader", "TensorEntry",
           "UnsafeFileError", "cached_sha256", "clear_cache", "file_sha256", "load_adapter_set", "read_header",
           "verified_sha256"]
