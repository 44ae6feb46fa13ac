"""``Loom LoRA Stack``'s one function: rows (+ an incoming LORA_STACK) -> loaded entries -> merged patches."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..loading import load_adapter_set
from ..stack import StackEntry, StackRow, parse_rows, rows_from_lora_stack, to_lora_stack, trigger_words
from .merged import apply_merged

logger = logging.getLogger(__name__)

Resolver = Callable[[str, "str | None"], str]


@dataclass(frozen=True)
class StackResult:
    model: object
    clip: object | None
    entries: tuple[StackEntry, ...]   # LOOM_ADAPTERS: the enabled, loaded rows for the composition nodes
    lora_stack: list                  # LORA_STACK for other packs: incoming items + our enabled rows
    trigger_words: str


def load_entries(rows: list[StackRow], resolve: Resolver) -> list[StackEntry]:
    """Resolve and parse every enabled row (disabled rows are not even opened)."""
    entries = []
    for row in rows:
        if not row.on:
            continue
        path = resolve(row.lora, row.sha256)
        adapter_set = load_adapter_set(path)
        entries.append(StackEntry(row=row, adapter_set=adapter_set, path=path,
                                  trigger_words=trigger_words(dict(adapter_set.metadata))))
    return entries


def apply_stack(model, clip, rows_json: str, incoming: list | None, resolve: Resolver) -> StackResult:
    """Apply the incoming LORA_STACK rows first, then this node's rows, merged into clones of model/clip."""
    incoming_rows = rows_from_lora_stack(incoming)
    rows = incoming_rows + parse_rows(rows_json)
    entries = load_entries(rows, resolve)
    merged = apply_merged(model, clip, entries)
    words: dict[str, None] = {}
    for e in entries:
        for w in e.trigger_words:
            words.setdefault(w, None)
    return StackResult(model=merged.model, clip=merged.clip, entries=tuple(entries),
                       lora_stack=list(incoming or []) + to_lora_stack(parse_rows(rows_json)),
                       trigger_words=", ".join(words))
