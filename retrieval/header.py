"""Safetensors header reader with strict limits. It parses the 8-byte length and the JSON header itself and
never touches tensor data, so indexing a 2 GB LoRA costs one small read.

File layout (safetensors spec): ``[u64 little-endian N][N bytes of UTF-8 JSON][tensor bytes]``. The JSON maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the byte after the
header) and may hold a ``"__metadata__"`` object of string → string.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_SUFFIXES = frozenset({".safetensors", ".sft"})
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".bin", ".pth"})
ADAPTER_SUFFIXES = SAFETENSORS_SUFFIXES | PICKLE_SUFFIXES


class HeaderError(ValueError):
    """A file is not a readable safetensors file; ``reason`` says why in words a user can act on."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it; ``begin``/``end`` are byte offsets after the header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one file: string metadata and the tensor table (no tensor bytes)."""

    path: str
    metadata: Mapping[str, str]
    tensors: Mapping[str, TensorEntry]
    header_bytes: int


def _metadata_text(value: object) -> str:
    """Metadata values are strings by spec; a few trainers write numbers or lists, kept as their JSON text."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _tensor_entry(path: str, name: str, raw: object, data_bytes: int) -> TensorEntry:
    if not isinstance(raw, dict):
        raise HeaderError(path, f"tensor {name!r}: entry is {type(raw).__name__}, expected an object")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(dtype, str):
        raise HeaderError(path, f"tensor {name!r}: field 'dtype' missing or not a string")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise HeaderError(path, f"tensor {name!r}: field 'shape' is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise HeaderError(path, f"tensor {name!r}: field 'data_offsets' {offsets!r} lies outside the "
                                f"{data_bytes} data bytes of the file")
    return TensorEntry(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def read_header(path: str | os.PathLike[str], *, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Read and validate the header of ``path``. Raises :class:`HeaderError` on anything malformed.

    The declared header length must satisfy ``2 <= N <= file size - 8`` and ``N <= max_header_bytes``; absurd
    lengths (a pickle or a zip misnamed ``.safetensors`` decodes to petabytes) fail before any large read.
    """
    path = os.fspath(path)
    size = os.stat(path).st_size
    if size < 8:
        raise HeaderError(path, f"file is {size} bytes, too short for the 8-byte safetensors header length")
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > size - 8:
            raise HeaderError(path, f"declared header length {length} exceeds the file size {size} - 8; "
                                    "not a safetensors file (or truncated)")
        if length > max_header_bytes:
            raise HeaderError(path, f"declared header length {length} exceeds the {max_header_bytes}-byte limit")
        if length < 2:
            raise HeaderError(path, f"declared header length {length} is too small for a JSON object")
        raw = fh.read(length)
    if len(raw) != length:
        raise HeaderError(path, f"file ended after {len(raw)} of {length} header bytes")
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise HeaderError(path, f"header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise HeaderError(path, f"header is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    if not isinstance(parsed, dict):
        raise HeaderError(path, f"header is a JSON {type(parsed).__name__}, expected an object")
    raw_meta = parsed.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict):
        raise HeaderError(path, "field '__metadata__' is not an object")
    data_bytes = size - 8 - length
    tensors = {name: _tensor_entry(path, name, entry, data_bytes) for name, entry in parsed.items()}
    metadata = {str(key): _metadata_text(value) for key, value in raw_meta.items()}
    return SafetensorsHeader(path=path, metadata=metadata, tensors=tensors, header_bytes=length)


def refusal_reason(path: Path) -> str | None:
    """Why a candidate file is refused without opening it, or ``None`` when it may be read as safetensors."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return (f"pickle format ({suffix}) is never opened: loading a pickle can run arbitrary code; "
                "convert it to .safetensors")
    if suffix not in SAFETENSORS_SUFFIXES:
        return f"unsupported file type {suffix or '(no suffix)'}"
    return None
