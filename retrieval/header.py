"""The index reads headers through the pack's one validator (:mod:`lora_loom.files.safetensors_header`): a file
is listed as ``ok`` only if the loader could load it. It never touches tensor data, so indexing a 2 GB LoRA
costs one small read. This module adds what the scan needs besides: which suffixes are candidates at all and
why one is refused without being opened.
"""
from __future__ import annotations

from pathlib import Path

from ..files.folders import suffix_refusal
from ..files.safetensors_header import (
    MAX_HEADER_BYTES,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    HeaderError,
    SafetensorsHeader,
    TensorEntry,
    UnsafeFileError,
    read_header,
)

ADAPTER_SUFFIXES = frozenset(SAFETENSORS_SUFFIXES) | frozenset(PICKLE_SUFFIXES)


def refusal_reason(path: Path) -> str | None:
    """Why a candidate file is refused without opening it, or ``None`` when it may be read as safetensors."""
    return suffix_refusal(path.name)


__all__ = ["ADAPTER_SUFFIXES", "MAX_HEADER_BYTES", "HeaderError", "SafetensorsHeader", "TensorEntry",
           "UnsafeFileError", "read_header", "refusal_reason"]
