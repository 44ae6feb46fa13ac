"""A LoRA stack: rows of (LoRA file, on/off, strength, optional CLIP strength, block weights), as the
``Loom LoRA Stack`` node stores them in workflow JSON, plus the ``LORA_STACK`` list other packs pass around
(rgthree, Easy-Use, LoRA Manager: ``[(lora_name_or_path, model_strength, clip_strength), ...]``)."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..files.json_text import JsonTextError, parse_json
from .adapters import AdapterSet
from .numbers import checked_number

if TYPE_CHECKING:
    from .adapter_gate import AdapterGate

logger = logging.getLogger(__name__)

ROW_FIELDS = ("lora", "on", "strength", "clip_strength", "blocks", "sha256")


class StackError(ValueError):
    """A malformed stack row; the message names the row and the field."""


@dataclass(frozen=True)
class StackRow:
    """One row. ``clip_strength`` None means "same as strength"; ``blocks`` is a block-weight preset/spec/vector
    (empty = all blocks 1); ``sha256`` pins the exact file so a shared workflow never picks a different LoRA."""

    lora: str
    on: bool = True
    strength: float = 1.0
    clip_strength: float | None = None
    blocks: str = ""
    sha256: str | None = None

    @property
    def effective_clip_strength(self) -> float:
        return self.strength if self.clip_strength is None else self.clip_strength

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StackEntry:
    """A loaded, enabled row: the row plus its parsed adapters (what ``LOOM_ADAPTERS`` carries per LoRA).
    ``gate``: an optional :class:`~.adapter_gate.AdapterGate` (per-token modes scale the row by it over time)."""

    row: StackRow
    adapter_set: AdapterSet
    path: str
    trigger_words: tuple[str, ...] = field(default_factory=tuple)
    gate: AdapterGate | None = None

    @property
    def name(self) -> str:
        return self.row.lora


def _number(value: Any, row: int, name: str) -> float:
    return checked_number(value, f"stack row {row}: field {name!r}", error=StackError)


def row_from_dict(data: Any, row: int) -> StackRow:
    """Validate one JSON row; unknown fields and wrong types are errors naming the row and field."""
    if not isinstance(data, dict):
        raise StackError(f"stack row {row}: expected an object with fields {ROW_FIELDS}, got {data!r}")
    unknown = sorted(set(data) - set(ROW_FIELDS))
    if unknown:
        raise StackError(f"stack row {row}: unknown field(s) {unknown}; known: {list(ROW_FIELDS)}")
    lora = data.get("lora")
    if not isinstance(lora, str) or not lora.strip():
        raise StackError(f"stack row {row}: field 'lora' must name a LoRA file, got {lora!r}")
    on = data.get("on", True)
    if not isinstance(on, bool):
        raise StackError(f"stack row {row}: field 'on' must be true or false, got {on!r}")
    clip = data.get("clip_strength")
    blocks = data.get("blocks", "") or ""
    if not isinstance(blocks, str):
        raise StackError(f"stack row {row}: field 'blocks' must be a string, got {blocks!r}")
    sha = data.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                            or any(c not in "0123456789abcdef" for c in sha.lower())):
        raise StackError(f"stack row {row}: field 'sha256' must be 64 hex digits, got {sha!r}")
    return StackRow(lora=lora.strip(), on=on, strength=_number(data.get("strength", 1.0), row, "strength"),
                    clip_strength=None if clip is None else _number(clip, row, "clip_strength"),
                    blocks=blocks, sha256=sha.lower() if sha else None)


def parse_rows(text: str) -> list[StackRow]:
    """Parse the node's ``rows`` widget: a JSON list of row objects (empty text = no rows)."""
    if not text.strip():
        return []
    try:
        data = parse_json(text, "stack rows")
    except JsonTextError as err:
        raise StackError(str(err)) from None
    if not isinstance(data, list):
        raise StackError(f"stack rows must be a JSON list of rows, got {type(data).__name__}")
    return [row_from_dict(item, i) for i, item in enumerate(data)]


def rows_to_json(rows: list[StackRow]) -> str:
    return json.dumps([r.to_dict() for r in rows], indent=1)


def rows_from_lora_stack(stack: Any) -> list[StackRow]:
    """Rows from another pack's ``LORA_STACK`` list of ``(name, model_strength, clip_strength)`` tuples."""
    rows = []
    for i, item in enumerate(stack or []):
        if not isinstance(item, (list, tuple)) or len(item) < 2:
            raise StackError(f"LORA_STACK item {i}: expected (lora_name, model_strength, clip_strength), got {item!r}")
        name, strength = item[0], item[1]
        clip = item[2] if len(item) > 2 else None
        rows.append(row_from_dict({"lora": name, "strength": strength, "clip_strength": clip}, i))
    return rows


def to_lora_stack(rows: list[StackRow]) -> list[tuple[str, float, float]]:
    """The enabled rows as a ``LORA_STACK`` list for other packs' loaders."""
    return [(r.lora, r.strength, r.effective_clip_strength) for r in rows if r.on]


def trigger_words(metadata: dict[str, str], limit: int = 8) -> tuple[str, ...]:
    """Trigger words from safetensors header metadata: ``modelspec.trigger_phrase``, else the most frequent
    tags of ``ss_tag_frequency`` (kohya), deduplicated in order."""
    words: list[str] = []
    phrase = metadata.get("modelspec.trigger_phrase") or metadata.get("ss_trigger_phrase") or ""
    words += [w.strip() for w in phrase.split(",") if w.strip()]
    if not words and metadata.get("ss_tag_frequency"):
        try:
            freq = json.loads(metadata["ss_tag_frequency"])
            counts: dict[str, int] = {}
            for tags in freq.values():
                for tag, n in tags.items():
                    counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
            words += [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:limit] if t]
        except (ValueError, AttributeError, TypeError, OverflowError, RecursionError):
            logger.warning("ignoring unreadable ss_tag_frequency metadata")
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return tuple(seen)
