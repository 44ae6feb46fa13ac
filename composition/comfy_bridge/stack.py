"""``Loom LoRA Stack``'s one function: rows (+ an incoming LORA_STACK) -> loaded entries -> merged patches, or
per-token gated layers (the gated controller, ``runtime/gated.py``, installed with the runtime) when the rows carry
gates or a per-token mode is chosen.

Modes: ``auto`` (merged unless a gate is attached), ``merged`` (ComfyUI's weight patches; gates refused, as
merged weights cannot change during sampling), ``gated``, ``switch``, ``composite`` (see ``runtime/gated.py``).
CLIP parts are merged into CLIP in every mode (the text encoder runs once, so a gate over sampling has no meaning
there). Every wrapper and object patch lives on a clone; the input MODEL is untouched and no weight is written."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..adapter_gate import AdapterGate, attach_gates
from ..gates import GateError
from ..loading import load_adapter_set
from ..runtime.core import Runtime
from ..runtime.gated import MODES, GatedController, GatedOptions
from ..stack import StackEntry, StackRow, parse_rows, rows_from_lora_stack, to_lora_stack, trigger_words
from .merged import apply_merged
from .runtime import install

logger = logging.getLogger(__name__)

Resolver = Callable[[str, "str | None"], str]
STACK_MODES = ("auto", "merged", *MODES)


@dataclass(frozen=True)
class StackResult:
    model: object
    clip: object | None
    entries: tuple[StackEntry, ...]   # LOOM_ADAPTERS: the enabled, loaded rows for the composition nodes
    lora_stack: list                  # LORA_STACK for other packs: incoming items + our enabled rows
    trigger_words: str


@dataclass(frozen=True)
class GatedResult:
    """The gated clone, its controller (the gates), its runtime and the adapter parts that cannot act per token."""

    model: Any
    gates: GatedController
    runtime: Runtime
    skipped: tuple[str, ...] = field(default_factory=tuple)


def install_gated(model: Any, entries: Sequence[StackEntry], options: GatedOptions = GatedOptions()) -> GatedResult:
    """Clone ``model`` and apply ``entries`` per token with their gates (``StackEntry.gate``) in ``options.mode``."""
    controller = GatedController(entries, options)
    installed = install(model, controller)
    logger.info("gated LoRA stack: %d rows, mode %s", len(entries), options.mode)
    return GatedResult(installed.model, controller, installed.runtime, installed.skipped)


def load_entries(rows: list[StackRow], resolve: Resolver) -> list[StackEntry]:
    """Resolve and parse every enabled row (disabled rows are not even opened); a row pinned by sha256 is
    loaded only if the file's content, hashed as it is opened, still has that hash."""
    entries = []
    for row in rows:
        if not row.on:
            continue
        path = resolve(row.lora, row.sha256)
        adapter_set = load_adapter_set(path, sha256=row.sha256)
        entries.append(StackEntry(row=row, adapter_set=adapter_set, path=path,
                                  trigger_words=trigger_words(dict(adapter_set.metadata))))
    return entries


def stack_mode(mode: str, entries: Sequence[StackEntry]) -> str:
    """The mode actually used: ``auto`` -> ``gated`` when any row has a gate, else ``merged``."""
    if mode not in STACK_MODES:
        raise GateError(f"Loom LoRA Stack: mode {mode!r} is not one of {STACK_MODES}")
    gated = [e.row.lora for e in entries if e.gate is not None]
    if mode == "auto":
        return "gated" if gated else "merged"
    if mode == "merged" and gated:
        raise GateError(f"Loom LoRA Stack: rows {gated} have gates, which change strength during sampling; merged "
                        "weights cannot (choose mode 'gated', 'switch', 'composite' or 'auto')")
    return mode


def apply_stack(model, clip, rows_json: str, incoming: list | None, resolve: Resolver,
                gates: Sequence[AdapterGate] | None = None, mode: str = "auto",
                switch_every: int = 1) -> StackResult:
    """Apply the incoming LORA_STACK rows first, then this node's rows, to clones of model/clip: merged, or per
    token with ``gates`` attached to their rows by name (``entries`` carry the gates to regions too)."""
    incoming_rows = rows_from_lora_stack(incoming)
    rows = incoming_rows + parse_rows(rows_json)
    entries = list(attach_gates(load_entries(rows, resolve), gates))
    chosen = stack_mode(mode, entries)
    merged = apply_merged(model, clip, entries)
    if chosen != "merged" and entries:
        merged = replace(merged, model=install_gated(model, entries, GatedOptions(chosen, switch_every)).model)
    words: dict[str, None] = {}
    for e in entries:
        for w in e.trigger_words:
            words.setdefault(w, None)
    return StackResult(model=merged.model, clip=merged.clip, entries=tuple(entries),
                       lora_stack=list(incoming or []) + to_lora_stack(parse_rows(rows_json)),
                       trigger_words=", ".join(words))
