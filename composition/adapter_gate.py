"""Gates attached to LoRA stack rows: what the ``LOOM_GATE`` socket carries and how it finds its rows.

An :class:`AdapterGate` names the row it belongs to (``lora``; empty = every row of the stack it reaches) and
holds a keyframed :class:`~.gates.GateSchedule` and/or AutoLoRA's :class:`~.learned_gate.LearnedGates`.
``LOOM_GATE`` is a tuple of them, so several gate nodes can be chained. :func:`attach_gates` puts each on the
matching :class:`~.stack.StackEntry`; a name matches a row's file name, its path without ``.safetensors``
or its bare stem (``<lora:style:0.8>`` finds ``flux/style.safetensors``).

:class:`GateBook` is the composition-wide table the patched layers read: gate ``i`` (an integer each
adapter slot carries) is schedule ``i`` evaluated at (block type, block index, progress).

:func:`parse_keyframes` reads the ``Loom Gate Schedule`` widget, ``"0:1, 0.5:0.2, 1:0"`` (progress:value
pairs; one bare number = constant), with a caret under the offending character on error.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .block_weights import point_at
from .gates import GateError, GateSchedule, Keyframe
from .learned_gate import LearnedGates
from .numbers import STRENGTH_LIMIT
from .stack import StackEntry

logger = logging.getLogger(__name__)

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
STEM_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class AdapterGate:
    """One row's gate: a schedule (None = strength 1 throughout) and/or a learned gate (None = plain sum).

    ``lora`` is the row's name; empty means "every row this gate reaches". ``learned_source`` names the
    checkpoint file for messages and the workflow."""

    lora: str = ""
    schedule: GateSchedule | None = None
    learned: LearnedGates | None = None
    learned_source: str = ""

    def describe(self) -> str:
        """A short human description (for logs and node tooltips)."""
        parts = []
        if self.schedule is not None:
            frames = ", ".join(f"{k.progress:g}:{k.value:g}" for k in self.schedule.keyframes)
            parts.append(f"{self.schedule.interpolation} [{frames}]")
        if self.learned is not None:
            parts.append(f"learned ({self.learned_source or 'in memory'})")
        return f"{self.lora or '*'}: " + ("; ".join(parts) or "constant 1")


def _gate_value(token: str, text: str, position: int) -> float:
    value = float(token)
    if not math.isfinite(value) or abs(value) > STRENGTH_LIMIT:
        raise GateError(f"gate value {token} is outside [-{STRENGTH_LIMIT:g}, {STRENGTH_LIMIT:g}] at "
                        f"{point_at(text, position)}")
    return value


def parse_keyframes(text: str) -> tuple[Keyframe, ...]:
    """``"0:1, 0.5:0.2"`` -> keyframes sorted as written; ``"0.7"`` -> constant 0.7; errors show a caret."""
    stripped = text.strip()
    if not stripped:
        raise GateError(f"keyframes are empty; write e.g. '0:1, 0.5:0' at {point_at(text, 0)}")
    frames: list[Keyframe] = []
    position = 0
    for item in text.replace(";", ",").split(","):
        start = position + len(item) - len(item.lstrip())
        position += len(item) + 1
        body = item.strip()
        if not body:
            raise GateError(f"empty keyframe at {point_at(text, start)}")
        if ":" not in body:
            if len(frames) or stripped.count(",") or not _NUMBER.fullmatch(body):
                raise GateError(f"keyframe {body!r} needs the form progress:value at {point_at(text, start)}")
            return (Keyframe(0.0, _gate_value(body, text, start)),)
        left, _, right = body.partition(":")
        for raw, offset in ((left.strip(), 0), (right.strip(), len(left) + 1)):
            if not _NUMBER.fullmatch(raw):
                where = start + offset + (len(body[offset:]) - len(body[offset:].lstrip()))
                raise GateError(f"{raw!r} is not a number at {point_at(text, where)}")
        progress, value = float(left), _gate_value(right.strip(), text, start + len(left) + 1)
        if not 0.0 <= progress <= 1.0:
            raise GateError(f"progress {progress:g} is outside [0, 1] at {point_at(text, start)}")
        if frames and progress < frames[-1].progress:
            raise GateError(f"keyframe at {progress:g} comes before the previous one ({frames[-1].progress:g}) "
                            f"at {point_at(text, start)}")
        frames.append(Keyframe(progress, value))
    return tuple(frames)


def lora_name_matches(gate_name: str, row_lora: str) -> bool:
    """Whether ``gate_name`` addresses the row of file ``row_lora`` (empty gate name: every row)."""
    wanted = gate_name.replace("\\", "/").strip()
    if not wanted:
        return True
    row = row_lora.replace("\\", "/").strip()
    stem = row
    for suffix in STEM_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return wanted in (row, stem, stem.rsplit("/", 1)[-1], row.rsplit("/", 1)[-1])


def _pick(gates: Sequence[AdapterGate], row: str, kind: str) -> AdapterGate | None:
    named = [g for g in gates if g.lora and getattr(g, kind) is not None and lora_name_matches(g.lora, row)]
    if len(named) > 1:
        raise GateError(f"row {row!r} gets {len(named)} {kind} gates ({', '.join(g.lora for g in named)}); "
                        "give each row at most one")
    if named:
        return named[0]
    unnamed = [g for g in gates if not g.lora and getattr(g, kind) is not None]
    if len(unnamed) > 1:
        raise GateError(f"{len(unnamed)} {kind} gates without a LoRA name would all apply to row {row!r}; "
                        "name the rows they belong to")
    return unnamed[0] if unnamed else None


def attach_gates(entries: Sequence[StackEntry], gates: Sequence[AdapterGate] | None) -> tuple[StackEntry, ...]:
    """Entries with their ``gate`` set from ``gates`` (a named gate beats an unnamed one for its row).

    Raises GateError when a named gate matches no row (listing the rows) or a row gets two gates of a kind.
    """
    entries = tuple(entries)
    if not gates:
        return entries
    for gate in gates:
        if not isinstance(gate, AdapterGate):
            raise GateError(f"LOOM_GATE holds {type(gate).__name__}, expected AdapterGate")
        if gate.lora and not any(lora_name_matches(gate.lora, e.row.lora) for e in entries):
            raise GateError(f"gate for LoRA {gate.lora!r} matches no row of this stack; rows: "
                            f"{[e.row.lora for e in entries]}")
    attached = []
    for entry in entries:
        schedule = _pick(gates, entry.row.lora, "schedule")
        learned = _pick(gates, entry.row.lora, "learned")
        if schedule is None and learned is None:
            attached.append(entry)
            continue
        gate = AdapterGate(lora=entry.row.lora, schedule=None if schedule is None else schedule.schedule,
                           learned=None if learned is None else learned.learned,
                           learned_source="" if learned is None else learned.learned_source)
        attached.append(replace(entry, gate=gate))
    return tuple(attached)


@dataclass(frozen=True)
class GateBook:
    """Schedules of every gated adapter of a composition; slot ``gate`` indexes ``schedules``."""

    schedules: tuple[GateSchedule | None, ...]

    def __len__(self) -> int:
        return len(self.schedules)

    def values(self, block_type: str, block_index: int, progress: float) -> tuple[float, ...]:
        """One float per gate (exactly 0.0 when off) for a layer of (block type, index) at ``progress``."""
        return tuple(1.0 if s is None else s.value(block_type, block_index, progress) for s in self.schedules)

    def curves(self, progress: float) -> tuple[float, ...]:
        """Each gate's keyframed strength at ``progress``, block weights left out (LoRA Composite's passes)."""
        return tuple(1.0 if s is None else s.curve(progress) for s in self.schedules)


def schedule_samples(schedule: GateSchedule, steps: int) -> list[float]:
    """The curve at the start of each of ``steps`` steps (progress ``i / steps``, as Flux's simple scheduler)."""
    if steps < 1:
        raise GateError(f"steps must be at least 1, got {steps}")
    values = [schedule.curve(i / steps) for i in range(steps)]
    if not all(math.isfinite(v) for v in values):
        raise GateError(f"gate schedule for {schedule.adapter!r} gives a non-finite value")
    return values


__all__ = ["AdapterGate", "GateBook", "attach_gates", "lora_name_matches", "parse_keyframes", "schedule_samples"]
