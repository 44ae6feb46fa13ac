"""The one safetensors header validator: the library index, the LoRA loader, the CLI and the learned-gate
loader all read headers through :func:`read_header`, so a file the index lists as ``ok`` is a file the loader
can load, and every bad file fails here, before any tensor byte is read, with an error naming the file and
the field.

Layout (safetensors spec): ``[u64 little-endian N][N bytes of UTF-8 JSON][data section]``. The JSON maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data section) and may
hold ``"__metadata__"``, an object of string -> string. Checked, as the safetensors library itself checks when
it opens the file (and a little stricter):

* the suffix and first bytes are not a pickle (zip archive or pickle opcodes): pickles are never opened;
* ``N`` fits the file and safetensors' 100,000,000-byte limit; the JSON is UTF-8, parses, nests no deeper
  than Python's parser allows, has no duplicate keys and no lone surrogates;
* every entry has exactly the three fields; the dtype is one LoRA Loom can load; the shape is a list of
  non-negative integers; ``shape x dtype size == end - begin``;
* sorted by offset, the tensors tile the data section exactly: no overlap, no gap, no trailing bytes.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .json_text import JsonTextError, check_text, parse_json

MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
METADATA_KEY = "__metadata__"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth", ".pkl", ".pickle")


class HeaderError(ValueError):
    """A file that is not a loadable safetensors file; ``reason`` says why in words a user can act on."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


class UnsafeFileError(HeaderError):
    """A pickle-based (code-executing) file was refused."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it; ``begin``/``end`` are byte offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one file: string metadata and the tensor table (no tensor bytes)."""

    path: str
    metadata: Mapping[str, str]
    tensors: Mapping[str, TensorEntry]
    header_bytes: int


def pickle_refusal(path: str | os.PathLike[str], head: bytes = b"") -> str | None:
    """Why ``path`` is refused as a pickle (by suffix, or by its first bytes ``head``), else ``None``."""
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        why = f"its extension {suffix} is a PyTorch pickle format"
    elif head[8:9] == b"{":
        return None
    elif head[:4] == b"PK\x03\x04":
        why = "it is a zip archive (a torch.save pickle)"
    elif len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        why = "it starts with a pickle signature"
    else:
        return None
    return (f"refused because {why}; pickles can execute code and are never loaded. Convert it to "
            ".safetensors with a tool you trust")


def read_header(path: str | os.PathLike[str], *, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Read and validate only the header of ``path``; raise :class:`HeaderError` (or its subclass
    :class:`UnsafeFileError` for pickles) naming the file and the field. Reads ``8 + N`` bytes at most."""
    shown = os.fspath(path)
    if pickle_refusal(shown):
        raise UnsafeFileError(shown, pickle_refusal(shown) or "")
    file = Path(path)
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(9)
        refusal = pickle_refusal(shown, head)
        if refusal:
            raise UnsafeFileError(shown, refusal)
        if size < 8:
            raise HeaderError(shown, f"file is {size} bytes, too short for the 8-byte header length field")
        (length,) = struct.unpack("<Q", head[:8])
        if length > size - 8:
            raise HeaderError(shown, f"header length field says {length} bytes but the file has only {size - 8} "
                                     "after it (truncated, or not a safetensors file)")
        if length > max_header_bytes:
            raise HeaderError(shown, f"header length field says {length} bytes, over the {max_header_bytes}-byte "
                                     "limit")
        if length < 2:
            raise HeaderError(shown, f"header length field says {length} bytes, too small for a JSON object")
        fh.seek(8)
        raw = fh.read(length)
    if len(raw) != length:
        raise HeaderError(shown, f"file ended after {len(raw)} of {length} header bytes (changed while reading)")
    metadata, tensors = _parse(shown, raw, size - 8 - length)
    return SafetensorsHeader(path=shown, metadata=metadata, tensors=tensors, header_bytes=length)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JsonTextError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _parse(shown: str, raw: bytes, data_bytes: int) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    try:
        parsed = parse_json(raw, "header", object_pairs_hook=_unique_keys)
    except JsonTextError as exc:
        raise HeaderError(shown, str(exc)) from None
    if not isinstance(parsed, dict):
        raise HeaderError(shown, f"header is a JSON {type(parsed).__name__}, not an object")
    raw_meta = parsed.pop(METADATA_KEY, None)
    metadata = _metadata(shown, raw_meta)
    tensors = {}
    for name, entry in parsed.items():
        _text(shown, name, "tensor name")
        tensors[name] = _entry(shown, name, entry, data_bytes)
    _check_layout(shown, tensors, data_bytes)
    return metadata, tensors


def _text(shown: str, value: str, what: str) -> None:
    try:
        check_text(value, what)
    except JsonTextError as exc:
        raise HeaderError(shown, f"{exc} ({value.encode('utf-8', 'backslashreplace')[:60]!r})") from None


def _metadata(shown: str, raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise HeaderError(shown, f"field {METADATA_KEY!r} is a {type(raw).__name__}, not an object of strings")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise HeaderError(shown, f"field {METADATA_KEY!r} key {key[:80]!r} holds {str(value)[:40]} "
                                     f"({type(value).__name__}), not a string (safetensors metadata maps strings "
                                     "to strings)")
        _text(shown, key, f"field {METADATA_KEY!r} key")
        _text(shown, value, f"field {METADATA_KEY!r} value of {key[:80]!r}")
    return dict(raw)


def _entry(shown: str, name: str, raw: object, data_bytes: int) -> TensorEntry:
    where = f"tensor {name[:200]!r}"
    if not isinstance(raw, dict):
        raise HeaderError(shown, f"{where}: entry is a {type(raw).__name__}, expected an object with fields "
                                 f"{', '.join(ENTRY_FIELDS)}")
    fields = sorted(set(raw) ^ set(ENTRY_FIELDS))
    if fields:
        extra, missing = sorted(set(raw) - set(ENTRY_FIELDS)), sorted(set(ENTRY_FIELDS) - set(raw))
        what = "; ".join(part for part in (f"unknown field(s) {[f[:40] for f in extra]}" if extra else "",
                                           f"missing field(s) {missing}" if missing else "") if part)
        raise HeaderError(shown, f"{where}: {what}")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise HeaderError(shown, f"{where} field 'dtype' is {str(dtype)[:40]!r}, not a safetensors dtype LoRA "
                                 f"Loom reads ({', '.join(DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise HeaderError(shown, f"{where} field 'shape' is {str(shape)[:80]}, not a list of non-negative "
                                 "integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise HeaderError(shown, f"{where} field 'data_offsets' is {str(offsets)[:80]}, not [begin, end] with "
                                 "0 <= begin <= end")
    begin, end = offsets
    if end > data_bytes:
        raise HeaderError(shown, f"truncated: {where} field 'data_offsets' ends at byte {end} but the data "
                                 f"section has only {data_bytes} bytes")
    numel = 1
    for d in shape:
        numel *= d
    needed = numel * DTYPE_BYTES[dtype]
    if end - begin != needed:
        raise HeaderError(shown, f"{where} field 'data_offsets' spans {end - begin} bytes, shape {shape} of "
                                 f"{dtype} needs {needed}")
    return TensorEntry(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _check_layout(shown: str, tensors: Mapping[str, TensorEntry], data_bytes: int) -> None:
    """The tensors, sorted by offset, must cover ``[0, data_bytes)`` exactly once."""
    position, previous = 0, None
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < position:
            raise HeaderError(shown, f"tensor {name[:200]!r} field 'data_offsets' [{entry.begin}, {entry.end}] "
                                     f"overlaps tensor {previous!r}, which ends at byte {position}")
        if entry.begin > position:
            after = f"after tensor {previous!r}" if previous is not None else "at the start of the data section"
            raise HeaderError(shown, f"tensor {name[:200]!r} field 'data_offsets' starts at byte {entry.begin}, "
                                     f"leaving a gap of {entry.begin - position} bytes {after}")
        if entry.end > entry.begin:
            position, previous = entry.end, name[:200]
    if position != data_bytes:
        raise HeaderError(shown, f"{data_bytes - position} trailing bytes after the last tensor's data "
                                 f"(data section {data_bytes} bytes, tensors cover {position})")
