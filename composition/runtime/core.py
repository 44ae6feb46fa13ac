"""The per-token runtime: one object per Loom MODEL, shared by its wrapped layers, its attention override and its
``APPLY_MODEL`` wrapper, running one or more controllers (regional, gated, CLoRA) as a chain.

A :class:`Controller` is one composition method. It owns adapter *groups* (regions, CLoRA passes, a gated stack's
canvas), each a tuple of stack entries, and the gate schedules attached to them; for every model call it decides how
the call runs — one pass, or several whose predictions it fuses — and, per pass, its :class:`TokenState`: the
per-token weight of each of its groups per stream, the groups that act and the sampling percent. Controllers chain:
a Loom node given a MODEL that already carries a runtime gets a new runtime with the upstream controllers first, so a
gated stack feeds Loom Compose, CLoRA's MODEL feeds a regional composition, and so on, with every layer wrapped once.

Per call, :meth:`Runtime.apply_model` runs the chain: controller 0's ``run`` gets the :class:`Call` and a
continuation; every pass it runs continues with controller 1 (which may see a changed call: CLoRA batches its passes),
and the last continuation puts the passes' states in place — what the layers read through :meth:`stream_weights`,
:meth:`active_groups` and :meth:`adapter_gates`, with groups and gates of all controllers numbered one after the
other — and calls the model. Holds no ComfyUI object: ``comfy_bridge/runtime.py`` installs it on a clone.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..adapter_gate import GateBook
from ..block_weights import parse_block_weights
from ..stack import StackEntry
from .layers import AdapterEntry, AdapterSlot, layer_slots
from .progress import SamplingProgress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    """One model call as the ``APPLY_MODEL`` wrapper receives it: ``x [B, C, H, W]``, ``t`` (sigma ``[B]``),
    ``c_concat``, ``context [B, T, C]`` (c_crossattn), ``control``, the transformer ``options``, the other ``kwargs``
    (``y``, ``guidance``, ``ref_latents`` ...), ComfyUI's ``model`` (the BaseModel) and the sampling ``percent``."""

    x: torch.Tensor
    t: torch.Tensor
    c_concat: Any
    context: torch.Tensor | None
    control: Any
    options: dict
    kwargs: dict
    model: Any
    percent: float

    def changed(self, **fields: Any) -> Call:
        return replace(self, **fields)


@dataclass(frozen=True)
class TokenState:
    """What a controller tells the layers for one pass: ``weights`` per stream (``img``, ``txt``, ``joint``)
    ``[B | 1, L | 1, groups]``, the ``active`` groups (local indices; others are skipped) and the sampling
    ``percent`` its gates are read at."""

    weights: Mapping[str, torch.Tensor]
    active: frozenset[int]
    percent: float


@dataclass(frozen=True)
class Downstream:
    """Where a controller's attention goes next: ``call(q, k, v, heads, ...)``; ``direct`` when that is ComfyUI's own
    attention function (nothing else to chain to)."""

    call: Callable
    direct: bool


class Controller:
    """A composition method on the runtime; subclasses set up one options object and implement :meth:`state` (and
    :meth:`run` for several passes). ``entries[g]``: the stack entries of group ``g``. Entries with a gate schedule
    (every entry with ``gate_every_entry``) are numbered into :attr:`book`; learned gates ride on their entries.
    The token state of a call lives in the runtime, so one controller serves the runtimes of its MODEL and of any
    MODEL downstream; a controller keeps caches and what it reports (CLoRA's masks, a probe set around a pass).
    ``batched``: its token weights are per batch entry; ``changes_batch``: it batches passes into one call (such a
    controller cannot run inside a ``batched`` one)."""

    name = "a Loom per-token method"
    gate_every_entry = False
    batched = False
    changes_batch = False

    def __init__(self, entries: Sequence[Sequence[StackEntry]],
                 wrappers: Callable[[Controller, Runtime], dict] | None = None) -> None:
        self.entries = tuple(tuple(group) for group in entries)
        numbers, schedules = [], []
        for entry in (e for group in self.entries for e in group):
            schedule = None if entry.gate is None else entry.gate.schedule
            gated = self.gate_every_entry or schedule is not None
            numbers.append(len(schedules) if gated else -1)
            if gated:
                schedules.append(schedule)
        self._gate_numbers = tuple(numbers)
        self.book = GateBook(tuple(schedules))
        self._wrappers = wrappers

    def __deepcopy__(self, memo: dict) -> Controller:
        return self  # lives in model_options, which ComfyUI deep-copies on clone: shared, not copied

    @property
    def groups(self) -> int:
        return len(self.entries)

    def adapter_entries(self, depth: int, depth_single: int) -> list[AdapterEntry]:
        """Every entry as the layers apply it (local group and gate numbers; block weights for this model)."""
        flat = [(group, entry) for group, entries in enumerate(self.entries) for entry in entries]
        return [AdapterEntry(group, entry.row.strength, parse_block_weights(entry.row.blocks, depth, depth_single),
                             entry.adapter_set, gate, None if entry.gate is None else entry.gate.learned)
                for (group, entry), gate in zip(flat, self._gate_numbers)]

    def run(self, call: Call, inner: Callable[[Call, TokenState], torch.Tensor]) -> torch.Tensor:
        """The call's prediction: one pass by default."""
        return inner(call, self.state(call))

    def state(self, call: Call) -> TokenState:
        raise NotImplementedError

    def gate_values(self, state: TokenState, block_type: str, block_index: int) -> tuple[float, ...]:
        """This controller's gates for a layer of (block type, index) in the pass of ``state``."""
        return self.book.values(block_type, block_index, state.percent)

    attend: Callable | None = None  # attend(state, downstream, q, k, v, heads, **kwargs): attention rules / probes

    def wrappers(self, runtime: Runtime) -> dict[str, Callable]:
        """Other ComfyUI wrappers this method needs, by wrapper type (``"sampler_sample"``, ``"predict_noise"``),
        bound to ``runtime``: what the ``wrappers`` factory given by the bridge makes."""
        return {} if self._wrappers is None else self._wrappers(self, runtime)


class Runtime:
    """The controllers of one MODEL with their layer slots (groups and gates numbered across controllers) and the
    per-call state. ``current`` holds one :class:`TokenState` per controller while a model call runs, else None."""

    def __init__(self, controllers: Sequence[Controller], depth: int, depth_single: int) -> None:
        self.controllers = tuple(controllers)
        self.group_offsets, self.gate_offsets = [], []
        groups = gates = 0
        entries: list[AdapterEntry] = []
        for controller in self.controllers:
            self.group_offsets.append(groups)
            self.gate_offsets.append(gates)
            entries += [replace(e, group=e.group + groups, gate=e.gate + gates if e.gate >= 0 else -1)
                        for e in controller.adapter_entries(depth, depth_single)]
            groups += controller.groups
            gates += len(controller.book)
        self.gates = gates
        self.slots: dict[str, tuple[AdapterSlot, ...]] = {m: tuple(s) for m, s in layer_slots(entries).items()}
        self._progress = SamplingProgress()
        self._current: tuple[TokenState, ...] | None = None
        self._per_call: dict = {}  # what the layers asked in this call (weights per stream, active groups, gates)
        self._keep = False

    def __deepcopy__(self, memo: dict) -> Runtime:
        return self

    def extended(self, controller: Controller, depth: int, depth_single: int) -> Runtime:
        """A new runtime with ``controller`` after this one's (this one is left as it is)."""
        return Runtime((*self.controllers, controller), depth, depth_single)

    @property
    def current(self) -> tuple[TokenState, ...] | None:
        return self._current

    @current.setter
    def current(self, states: tuple[TokenState, ...] | None) -> None:
        self._current = states
        self._per_call = {}

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Model calls made inside leave their states in place after they return (a checkpointed backward recomputes
        blocks after the call and must see the same adapters); the state from before is back on exit."""
        saved, keep = self._current, self._keep
        self._keep = True
        try:
            yield
        finally:
            self._keep = keep
            self.current = saved

    # --- what wrapped layers read ---------------------------------------------------------------------------
    def stream_weights(self, stream: str) -> torch.Tensor | None:
        """``[B | 1, L | 1, groups]`` of every controller, side by side (None outside a call)."""
        if self._current is None:
            return None
        key = ("weights", stream)
        weights = self._per_call.get(key)
        if weights is None:
            parts = [state.weights[stream] for state in self._current]
            if len(parts) == 1:
                weights = parts[0]
            else:
                batch, length = max(p.shape[0] for p in parts), max(p.shape[1] for p in parts)
                weights = torch.cat([p.to(parts[0].device).expand(batch, length, p.shape[2]) for p in parts], dim=-1)
            self._per_call[key] = weights
        return weights

    def active_groups(self) -> frozenset[int]:
        if self._current is None:
            return frozenset()
        active = self._per_call.get("active")
        if active is None:
            active = frozenset(offset + g for offset, state in zip(self.group_offsets, self._current)
                               for g in state.active)
            self._per_call["active"] = active
        return active

    def adapter_gates(self, block_type: str, block_index: int) -> tuple[float, ...] | None:
        """Every gate for a layer of (block type, index) in this call (None: no gates, or outside a call)."""
        if self._current is None or not self.gates:
            return None
        key = (block_type, block_index)
        values = self._per_call.get(key)
        if values is None:
            values = tuple(v for controller, state in zip(self.controllers, self._current) if len(controller.book)
                           for v in controller.gate_values(state, block_type, block_index))
            self._per_call[key] = values
        return values

    # --- per call -------------------------------------------------------------------------------------------
    def percent_of(self, sigma: float, model_sampling: Any) -> float:
        return self._progress.percent_of(sigma, model_sampling)

    def apply_model(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                    c_crossattn: torch.Tensor | None = None, control: Any = None,
                    transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
        """``WrappersMP.APPLY_MODEL``: x ``[B, C, H, W]``, t = sigma ``[B]`` -> the (fused) prediction."""
        model = executor.class_obj
        call = Call(x, t, c_concat, c_crossattn, control, transformer_options if transformer_options is not None
                    else {}, kwargs, model, self.percent_of(float(t.flatten()[0]), model.model_sampling))
        return self.controllers[0].run(call, self._continuation(0, (), executor))

    def _continuation(self, index: int, states: tuple[TokenState, ...],
                      executor: Any) -> Callable[[Call, TokenState], torch.Tensor]:
        def inner(call: Call, state: TokenState) -> torch.Tensor:
            chain = (*states, state)
            if index + 1 < len(self.controllers):
                return self.controllers[index + 1].run(call, self._continuation(index + 1, chain, executor))
            previous = self._current
            self.current = chain
            try:
                return executor(call.x, call.t, call.c_concat, call.context, call.control, call.options, **call.kwargs)
            finally:
                if not self._keep:
                    self.current = previous
        return inner


class RuntimeAttention:
    """The ``optimized_attention_override`` of a runtime: the attention of every controller that has one (regional
    rules, CLoRA probes), outermost controller first, then downstream: the override installed before this runtime
    (chained, never clobbered), else ComfyUI's function. Outside a call of this runtime it only passes through."""

    def __init__(self, runtime: Runtime, previous: Callable | None = None) -> None:
        self.runtime = runtime
        self.previous = previous

    def __deepcopy__(self, memo: dict) -> RuntimeAttention:
        return self

    def __call__(self, func: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.previous is None:
            downstream = Downstream(func, True)
        else:
            downstream = Downstream(functools.partial(self.previous, func), False)
        states = self.runtime.current
        if states is not None:
            for controller, state in reversed(tuple(zip(self.runtime.controllers, states))):
                if controller.attend is not None:
                    downstream = Downstream(functools.partial(controller.attend, state, downstream), False)
        return downstream.call(q, k, v, heads, *args, **kwargs)


__all__ = ["Call", "Controller", "Downstream", "Runtime", "RuntimeAttention", "TokenState"]
