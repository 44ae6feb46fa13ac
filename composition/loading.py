"""Safe loading of LoRA files: safetensors only, header validated before any tensor is touched.

Pickle-based files (``.ckpt``, ``.pt``, ``.bin``, ``.pth``, ``.pkl``, or anything whose first bytes are a zip or
pickle signature) are refused: unpickling can execute arbitrary code, so they are never opened with torch.
A safetensors file is ``u64 little-endian header length N | N bytes of JSON | tensor data``; we check the length
against the file size and a 100 MB ceiling, parse the JSON, and check every tensor's ``data_offsets`` against the
data section, all from the first ``8 + N`` bytes. Tensors are then read through ``safetensors.safe_open``
(memory-mapped). Parsed AdapterSets are cached in-process by file sha256 (the hash itself is cached by
``(path, size, mtime_ns)``), so the same file is hashed and parsed once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from .adapters import AdapterSet
from .formats import read_adapter_set

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth", ".pkl", ".pickle")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_CHUNK = 1 << 20


class UnsafeFileError(ValueError):
    """A pickle-based (code-executing) file was refused."""


class HeaderError(ValueError):
    """A safetensors header is malformed, absurd or points past the end of the file."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header index: dtype name, shape and byte range inside the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsHeader(NamedTuple):
    """``(metadata, tensors)``: the ``__metadata__`` strings and the tensor index by key."""

    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def _refuse_pickle(path: Path, head: bytes) -> None:
    """Raise UnsafeFileError for pickle extensions or zip/pickle first bytes (unless it is safetensors JSON)."""
    why = None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        why = f"its extension {path.suffix} is a PyTorch pickle format"
    elif head[8:9] != b"{":
        if head[:4] == b"PK\x03\x04":
            why = "it is a zip archive (a torch.save pickle)"
        elif len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            why = "it starts with a pickle signature"
    if why:
        raise UnsafeFileError(f"{path.name}: refused because {why}; pickles can execute code and are never "
                              f"loaded. Convert it to .safetensors with a tool you trust.")


def _entry(path: Path, key: str, raw: object, data_bytes: int) -> TensorEntry:
    """Validate one header entry; raise HeaderError naming the file, key and field."""
    if not isinstance(raw, dict):
        raise HeaderError(f"{path.name}: header entry {key!r} is not an object")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise HeaderError(f"{path.name}: tensor {key!r} field 'dtype' is {dtype!r}, not a safetensors dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise HeaderError(f"{path.name}: tensor {key!r} field 'shape' is {shape!r}, not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise HeaderError(f"{path.name}: tensor {key!r} field 'data_offsets' is {offsets!r}, not [begin, end]")
    begin, end = offsets
    if end > data_bytes:
        raise HeaderError(f"{path.name}: truncated: tensor {key!r} field 'data_offsets' ends at byte {end} but "
                          f"the data section has only {data_bytes} bytes")
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * DTYPE_BYTES[dtype]:
        raise HeaderError(f"{path.name}: tensor {key!r} field 'data_offsets' spans {end - begin} bytes, "
                          f"shape {shape} of {dtype} needs {numel * DTYPE_BYTES[dtype]}")
    return TensorEntry(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate only the header bytes of a safetensors file (refusing pickles first)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
        _refuse_pickle(path, head)
        if size < 8:
            raise HeaderError(f"{path.name}: file is {size} bytes, shorter than the 8-byte header length field")
        (length,) = struct.unpack("<Q", head[:8])
        if length > MAX_HEADER_BYTES:
            raise HeaderError(f"{path.name}: header length field says {length} bytes (limit {MAX_HEADER_BYTES})")
        if 8 + length > size:
            raise HeaderError(f"{path.name}: header length field says {length} bytes but the file has only "
                              f"{size - 8} after it (truncated or not safetensors)")
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HeaderError(f"{path.name}: header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise HeaderError(f"{path.name}: header JSON is a {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError(f"{path.name}: field '__metadata__' must map strings to strings")
    data_bytes = size - 8 - length
    tensors = {key: _entry(path, key, value, data_bytes) for key, value in header.items()}
    return SafetensorsHeader(metadata=dict(metadata), tensors=tensors)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of the whole file, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


_LOCK = threading.Lock()
_SHA_BY_STAT: dict[tuple[str, int, int], str] = {}
_SETS: dict[tuple[str, str, str], AdapterSet] = {}


def cached_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of ``path``, recomputed only when its ``(path, size, mtime_ns)`` changes."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _SHA_BY_STAT:
            return _SHA_BY_STAT[key]
    sha = file_sha256(path)
    with _LOCK:
        _SHA_BY_STAT[key] = sha
    return sha


def clear_cache() -> None:
    """Forget every cached hash and AdapterSet."""
    with _LOCK:
        _SHA_BY_STAT.clear()
        _SETS.clear()


def load_adapter_set(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None) -> AdapterSet:
    """Parse a LoRA file into an AdapterSet (cached by content hash, device and dtype).

    Raises UnsafeFileError (pickles), HeaderError (bad header), formats.NotFluxLoRAError (foreign model / no
    Flux keys) or ValueError naming the file and key for malformed adapters. ``dtype`` casts floating tensors.
    """
    path = Path(path)
    header = read_header(path)
    sha = cached_sha256(path)
    cache_key = (sha, str(device), str(dtype))
    with _LOCK:
        if cache_key in _SETS:
            return _SETS[cache_key]
    state_dict: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for key in f.keys():
            t = f.get_tensor(key)
            state_dict[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    logger.info("%s: %d tensors, sha256 %s", path.name, len(state_dict), sha[:10])
    adapter_set = read_adapter_set(state_dict, path.name, metadata=header.metadata, sha256=sha)
    with _LOCK:
        _SETS[cache_key] = adapter_set
    return adapter_set
