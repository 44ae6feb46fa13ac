"""Per-token adapters on Flux Linear layers: ``out = base(x) + Σ_i strength_i · gate_i · w_i[token] · Δ_i(x)``.

A wrapped layer is installed with ``ModelPatcher.add_object_patch`` on a clone (``comfy_bridge/runtime.py``). It is
an instance of a subclass of the wrapped module's own class (``comfy.ops`` Linear) whose instance ``__dict__`` *is*
the wrapped module's: a second view of the live module with another ``forward``, not a copy taken when the node ran.
Whatever ComfyUI puts in place at sampling time — the base weights restored after another workflow's merged LoRA,
this clone's own weight patches, low-VRAM weight functions, cast flags — is what the wrapper computes with, and
what ComfyUI restores on unpatch is restored for both. Loom's own state lives in slots on the wrapper, so the
wrapped module never gains an attribute. Wrapping a wrapper views the same live module (a downstream Loom node
re-wraps every layer for its runtime).

Each adapter belongs to a *group* (a region, a CLoRA pass, a gated stack's canvas); the layer reads from its
:class:`TokenSource` (the runtime) the per-token weight of every group in this call, the groups that act, and the
gate of every gated adapter at this layer's block. Low-rank adapters (LoRA/LoCon, Tucker cores folded) go through
:func:`kernels.multi_lora.masked_multi_lora`: all adapters of a layer stacked, two matmuls whatever their number
(via ``masked_multi_lora_fast``: the Triton kernels where they may run, else torch). Other kinds (LoHa, LoKr,
DoRA, WeightDiff, SetWeight) use their exact ``bypass_delta``. Modulation layers (``img_mod.lin``,
``modulation.lin``, ``final_layer.adaLN_modulation.1``) see one vector per sample ``[B, 1, C]``; they return
``[B, L, O]`` — the base output broadcast plus each token's own adapter mix — which Flux's ``apply_mod`` broadcasts
per token.

Gates: a slot with ``gate >= 0`` is scaled by ``source.adapter_gates(block_type, block_index)[gate]``; a slot whose
gate is exactly 0 is dropped before any matmul. No weight is written: strength changes over sampling happen in the
forward. A slot with a ``learned`` gate (AutoLoRA) is not stacked: its ``Δ_i`` is computed alone, full width, and
mixed by the gate's formula ``o + Σ_i w_out ⊙ g_i ⊙ Δ_i`` (cost: one extra ``[B, L, C_out]`` tensor per such
adapter, plus two LayerNorms).

Token weights may broadcast: ``[1 | B, 1 | L, N]`` (a full-canvas group gives ``[1, 1, 1]``; modulation layers then
keep their ``[B, 1, O]`` shape).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ...bounded_cache import BoundedCache
from ...kernels.multi_lora import AdapterFactors, StackedLoRA, select_active, stack_lora
from ...kernels.multi_lora_triton import masked_multi_lora_fast
from ..adapters import LoRA
from ..adapters.common import BIAS, WEIGHT
from ..block_weights import BlockRef, BlockWeights, block_of_module

logger = logging.getLogger(__name__)

STREAMS = ("img", "txt", "joint")
_IMAGE_PARTS = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin")
_TEXT_PARTS = ("txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin")
_SINGLE_PARTS = ("linear1", "linear2", "modulation.lin")


class LayerError(ValueError):
    """A wrapped layer met input it cannot map to tokens; the message names the module."""


def stream_of_module(module: str) -> str | None:
    """Token stream a Flux module runs on: ``img`` ``[B, L_img, C]``, ``txt`` ``[B, T, C]``, ``joint``
    ``[B, T + L_img, C]`` (single blocks); None for per-sample layers that cannot act per token (``time_in``...)."""
    parts = module.split(".")
    if parts[0] == "double_blocks" and len(parts) > 2:
        rest = ".".join(parts[2:])
        return "img" if rest in _IMAGE_PARTS else "txt" if rest in _TEXT_PARTS else None
    if parts[0] == "single_blocks" and len(parts) > 2:
        return "joint" if ".".join(parts[2:]) in _SINGLE_PARTS else None
    if module in ("img_in", "final_layer.linear", "final_layer.adaLN_modulation.1"):
        return "img"
    if module == "txt_in":
        return "txt"
    return None


class TokenSource(Protocol):
    """What a wrapped layer reads each call (the runtime): per-token group weights of its stream
    ``[B | 1, L | 1, N_groups]`` (None outside a Loom call), the groups that act, and the gate of every gated slot
    for one block, indexed by ``AdapterSlot.gate`` (exactly 0.0 = off; None = no gates in this call)."""

    def stream_weights(self, stream: str) -> torch.Tensor | None: ...

    def active_groups(self) -> frozenset[int]: ...

    def adapter_gates(self, block_type: str, block_index: int) -> Sequence[float] | None: ...


@dataclass(frozen=True)
class AdapterEntry:
    """One LoRA file as a controller applies it: its group, strength, block weights and adapters; ``gate`` indexes
    the runtime's gate values (-1 = ungated), ``learned`` are its AutoLoRA gates (``LearnedGates``) if any."""

    group: int
    strength: float
    blocks: BlockWeights
    adapter_set: object
    gate: int = -1
    learned: object | None = None


@dataclass(frozen=True)
class AdapterSlot:
    """One adapter of one layer: the group it belongs to, its static strength (row strength × block weight) and
    the adapter itself (a slice of a fused layer carries its ``offset``). ``gate``: index into the source's
    ``adapter_gates`` (-1 = ungated); ``learned``: the AutoLoRA gate module of this layer, if any."""

    group: int
    strength: float
    adapter: object
    gate: int = -1
    learned: object | None = None


@dataclass(frozen=True)
class _Fast:
    stacked: StackedLoRA
    groups: torch.Tensor      # [n] int64: group of each stacked factor
    strengths: torch.Tensor   # [n] float32


def _factors(slot: AdapterSlot) -> AdapterFactors:
    a: LoRA = slot.adapter  # type: ignore[assignment]
    down = a.down if a.mid is None else (a.mid.float() @ a.down.float()).to(a.down.dtype)
    return AdapterFactors(down=down, up=a.up, scale=a.scale, out_offset=a.offset.start if a.offset else 0)


def _is_fast(slot: AdapterSlot) -> bool:
    return isinstance(slot.adapter, LoRA) and slot.adapter.parameter == WEIGHT and slot.learned is None


def _derived() -> BoundedCache:
    """A layer's tensors made at sampling time: its stack per device and dtype, the active selections, the gated
    strengths per distinct gate values (a schedule gives new ones every step), learned gates per device."""
    return BoundedCache("per-token layer tensors", max_entries=512)


_LOOM_SLOTS = ("loom_module", "loom_stream", "loom_block", "loom_source", "loom_fast", "loom_exact", "loom_learned",
               "loom_gated", "loom_cache", "loom_derived")


class LoomLinear:
    """Forward of a per-token adapted Linear; mixed into a subclass of the wrapped module's class. The module
    state (``__dict__``) is shared with the wrapped module; Loom's own attributes are slots."""

    __slots__ = _LOOM_SLOTS

    loom_module: str
    loom_stream: str
    loom_block: BlockRef
    loom_source: TokenSource
    loom_fast: _Fast | None
    loom_exact: tuple[AdapterSlot, ...]
    loom_learned: tuple[AdapterSlot, ...]
    loom_gated: bool
    loom_cache: dict
    loom_derived: BoundedCache

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: D401 - nn.Module API
        """``x [B, L, C_in]`` (or ``[B, 1, C_in]`` / ``[B, C_in]`` for modulation) -> ``[B, L, C_out]``."""
        base = super().forward(x, *args, **kwargs)  # type: ignore[misc]
        weights = self.loom_source.stream_weights(self.loom_stream)
        if weights is None:
            return base
        per_sample = x.ndim == 2 or (x.shape[1] == 1 and weights.shape[1] != 1)
        if not per_sample and (weights.shape[0] not in (1, x.shape[0]) or weights.shape[1] not in (1, x.shape[1])):
            raise LayerError(f"{self.loom_module}: input {tuple(x.shape)} does not match the "
                                     f"{self.loom_stream} tokens {tuple(weights.shape[:2])} of this step")
        active = self.loom_source.active_groups()
        gates = self._gates()
        if per_sample:
            return self._per_sample(x if x.ndim == 3 else x[:, None], base, weights, active, gates)
        delta = self._per_token(x, weights, active, gates)
        out = base if delta is None else base + delta.to(base.dtype)
        if self.loom_learned:
            mix = self._learned_mix(x, base, weights, active, gates)
            if mix is not None:
                out = out + mix.to(base.dtype)
        return out

    def __copy__(self) -> LoomLinear:
        return _view(type(self), self.__dict__, {name: getattr(self, name) for name in _LOOM_SLOTS})

    def __deepcopy__(self, memo: dict) -> LoomLinear:
        """An independent wrapper over an independent copy of the module (what ``copy.deepcopy`` of a model
        holding a wrapper expects); nn.Module's own pickling protocol would drop the slots."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        object.__setattr__(new, "__dict__", copy.deepcopy(self.__dict__, memo))
        for name in _LOOM_SLOTS:
            value = _derived() if name == "loom_derived" else copy.deepcopy(getattr(self, name), memo)
            object.__setattr__(new, name, value)
        return new

    def _gates(self) -> Sequence[float] | None:
        """This call's gate per gate index, or None (an ungated layer, or no gates in this call)."""
        if not self.loom_gated:
            return None
        return self.loom_source.adapter_gates(self.loom_block.block_type, self.loom_block.index)

    @staticmethod
    def _strength(slot: AdapterSlot, gates: Sequence[float] | None) -> float:
        """Static strength times the slot's gate (exactly 0.0 when the gate is off)."""
        if gates is None or slot.gate < 0:
            return slot.strength
        gate = gates[slot.gate]
        return 0.0 if gate == 0.0 else slot.strength * gate

    def _gated_fast(self, fast: _Fast, active: frozenset[int], gates: Sequence[float],
                    device: torch.device) -> tuple[torch.Tensor, object]:
        """Gated strengths ``[n]`` on ``device`` and the active selection, cached per distinct gate values."""
        slots = self.loom_cache["fast_slots"]
        strengths = tuple(self._strength(s, gates) for s in slots)
        key = ("gated", active, strengths, str(device))
        cached = self.loom_derived.get(key)
        if cached is None:
            chosen = [i for i, (s, value) in enumerate(zip(slots, strengths)) if s.group in active and value != 0.0]
            cached = self.loom_derived.put(key, (torch.tensor(strengths, dtype=torch.float32).to(device),
                                                 select_active(fast.stacked, adapter_index=chosen)))
        return cached

    def _fast_on(self, device: torch.device, dtype: torch.dtype) -> _Fast:
        key = ("fast", str(device), dtype)
        cached = self.loom_derived.get(key)
        if cached is None:
            fast = self.loom_fast
            cached = self.loom_derived.put(key, _Fast(fast.stacked.to(device, dtype), fast.groups.to(device),
                                                      fast.strengths.to(device)))
        return cached

    def _active_factors(self, fast: _Fast, active: frozenset[int], device: torch.device) -> object:
        """Stacked factors of active groups with non-zero strength (from CPU copies: no device sync)."""
        key = ("active", active, str(device))
        cached = self.loom_derived.get(key)
        if cached is None:
            cpu = self.loom_fast
            chosen = [i for i, (g, s) in enumerate(zip(cpu.groups.tolist(), cpu.strengths.tolist()))
                      if g in active and s != 0.0]
            cached = self.loom_derived.put(key, select_active(fast.stacked, adapter_index=chosen))
        return cached

    def _token_scale(self, weights: torch.Tensor, groups: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
        """``[B, L, N_groups]`` -> ``[B, L, n_factors]``: each factor's group weight times its strength."""
        return weights.index_select(-1, groups.to(weights.device)) * strengths.to(weights.device)

    def _per_token(self, x: torch.Tensor, weights: torch.Tensor, active: frozenset[int],
                   gates: Sequence[float] | None = None) -> torch.Tensor | None:
        """Sum of the stacked and exact slots' deltas ``[B, L, C_out]``, or None when none acts."""
        out = None
        if self.loom_fast is not None:
            fast = self._fast_on(x.device, x.dtype)
            if gates is None:
                strengths, chosen = fast.strengths, self._active_factors(fast, active, x.device)
            else:
                strengths, chosen = self._gated_fast(fast, active, gates, x.device)
            if chosen.adapter_index:
                scale = self._token_scale(weights, fast.groups, strengths)
                out = masked_multi_lora_fast(x, fast.stacked, scale, chosen)
        for slot in self.loom_exact:
            strength = self._strength(slot, gates)
            if slot.group not in active or strength == 0.0:
                continue
            y = self._exact_delta(slot, x)
            scale = (weights[..., slot.group:slot.group + 1] * strength).to(y.dtype)
            out = self._place(out, x, y * scale, slot)
        return out

    def _per_sample(self, v: torch.Tensor, base: torch.Tensor, weights: torch.Tensor,
                    active: frozenset[int], gates: Sequence[float] | None = None) -> torch.Tensor:
        """Modulation: ``v [B, 1, C_in]``, ``base [B, 1, O]`` -> ``[B, L, O]`` with a per-token adapter mix."""
        slots = [s for s in self._all_slots() if s.learned is None and s.group in active
                 and self._strength(s, gates) != 0.0]
        mix = self._learned_mix(v, base, weights, active, gates) if self.loom_learned else None
        if not slots and mix is None:
            return base
        out = base.expand(base.shape[0], weights.shape[1], base.shape[-1])
        for s in slots:  # slot by slot, not one einsum: a zero weight adds an exact zero (bit-exact isolation)
            delta = self._place(None, v, self._exact_delta(s, v), s, base.shape[-1])  # [B, 1, O]
            scale = (weights[..., s.group:s.group + 1] * self._strength(s, gates)).to(delta.dtype)  # [B, L, 1]
            out = out + (scale * delta).to(base.dtype)
        return out if mix is None else out + mix.to(base.dtype)

    def _learned_on(self, gate: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The learned gate with parameters on ``device`` (the module itself when already there)."""
        first = next(gate.parameters())
        if first.device == device:
            return gate
        key = ("learned", id(gate), str(device))
        moved = self.loom_derived.get(key)
        if moved is None:
            moved = self.loom_derived.put(key, copy.deepcopy(gate).to(device))
        return moved

    def _learned_mix(self, x: torch.Tensor, base: torch.Tensor, weights: torch.Tensor, active: frozenset[int],
                     gates: Sequence[float] | None) -> torch.Tensor | None:
        """AutoLoRA: ``Σ_i w_out ⊙ g_i ⊙ Δ_i`` over the learned slots that act (float32), where
        ``Δ_i = token weight · strength · gate · bypass_i(x)`` is full width ``[B, L, C_out]`` and
        ``g_i = σ(w_b⊙LN(o) + w_l⊙LN(Δ_i) + w_c⊙LN(o)⊙LN(Δ_i) + b)``; one gate module per layer and checkpoint."""
        groups: dict[int, tuple[torch.nn.Module, list[torch.Tensor]]] = {}
        width = int(base.shape[-1])
        for slot in self.loom_learned:
            strength = self._strength(slot, gates)
            if slot.group not in active or strength == 0.0:
                continue
            a = slot.adapter
            y = a.bypass_delta(x) if isinstance(a, LoRA) else self._exact_delta(slot, x)
            y = self._place(None, x, y.to(x.dtype), slot, width)
            scale = weights[..., slot.group:slot.group + 1].float() * strength
            groups.setdefault(id(slot.learned), (slot.learned, []))[1].append(y.float() * scale)
        if not groups:
            return None
        mix = None
        for gate, deltas in groups.values():
            shape = torch.broadcast_shapes(base.shape, *(d.shape for d in deltas))
            stacked = torch.stack([d.expand(shape) for d in deltas])  # [N, B, L, C_out]
            module = self._learned_on(gate, x.device)
            o = base.expand(shape)
            part = (module.weight_out * module.gates(o, stacked) * stacked).sum(dim=0)
            mix = part if mix is None else mix + part
        return mix

    def _all_slots(self) -> tuple[AdapterSlot, ...]:
        return self.loom_cache["slots"]

    def _exact_delta(self, slot: AdapterSlot, x: torch.Tensor) -> torch.Tensor:
        a = slot.adapter
        if a.parameter == BIAS:
            delta = a.delta_weight(None).to(device=x.device, dtype=x.dtype)
            return delta.expand(*x.shape[:-1], delta.shape[0])
        base_weight = self.weight.to(device=x.device, dtype=torch.float32)  # type: ignore[attr-defined]
        return a.bypass_delta(x, base_weight).to(x.dtype)

    def _place(self, out: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor, slot: AdapterSlot,
               width: int | None = None) -> torch.Tensor:
        width = width or int(self.weight.shape[0])  # type: ignore[attr-defined]
        if out is None:
            out = x.new_zeros(*y.shape[:-1], width)
        offset = slot.adapter.offset
        if offset is None:
            return out + y
        out[..., offset.start:offset.stop] += y
        return out


_CLASSES: dict[type, type] = {}


def _loom_class(base_cls: type) -> type:
    cls = _CLASSES.get(base_cls)
    if cls is None:
        cls = type(f"Loom{base_cls.__name__}", (LoomLinear, base_cls), {"loom_wrapped_class": base_cls})
        _CLASSES[base_cls] = cls
    return cls


def wrap_linear(original: torch.nn.Module, module: str, slots: tuple[AdapterSlot, ...],
                source: TokenSource) -> torch.nn.Module:
    """A per-token view of ``original`` (its live module state, shared) that adds the slots' adapters per token.

    ``original`` may itself be a Loom wrapper (an upstream Loom node's): the new view shares the same live module."""
    if not hasattr(original, "weight") or getattr(original, "weight") is None or original.weight.ndim != 2:
        raise LayerError(f"{module}: only Linear layers can carry per-token adapters, got {type(original).__name__}")
    stream = stream_of_module(module)
    if stream is None:
        raise LayerError(f"{module}: this layer runs once per sample, not per token; it cannot carry per-token "
                         "adapters")
    fast = tuple(s for s in slots if _is_fast(s))
    exact = tuple(s for s in slots if not _is_fast(s) and s.learned is None)
    learned = tuple(s for s in slots if s.learned is not None)
    for s in learned:
        channels = getattr(s.learned, "channels", None)
        if channels != int(original.weight.shape[0]):
            raise LayerError(f"{module}: the learned gate has {channels} channels, the layer has "
                             f"{int(original.weight.shape[0])} outputs (a gate checkpoint for another model?)")
    loom_fast = None
    if fast:
        stacked = stack_lora([_factors(s) for s in fast], int(original.weight.shape[0]))
        loom_fast = _Fast(stacked, torch.tensor([s.group for s in fast], dtype=torch.long),
                          torch.tensor([s.strength for s in fast], dtype=torch.float32))
    base_cls = getattr(type(original), "loom_wrapped_class", type(original))
    return _view(_loom_class(base_cls), original.__dict__, dict(
        loom_module=module, loom_stream=stream, loom_block=block_of_module(module), loom_source=source,
        loom_fast=loom_fast, loom_exact=exact, loom_learned=learned, loom_gated=any(s.gate >= 0 for s in slots),
        loom_cache={"slots": tuple(slots), "fast_slots": fast}, loom_derived=_derived()))


def _view(cls: type, state: dict, loom: dict) -> torch.nn.Module:
    """An instance of ``cls`` whose module state *is* ``state`` (shared, not copied) with Loom's slots set."""
    wrapper = object.__new__(cls)
    object.__setattr__(wrapper, "__dict__", state)
    for name, value in loom.items():
        object.__setattr__(wrapper, name, value)
    return wrapper


def _applies_per_token(module: str, parameter: str) -> bool:
    return parameter in (WEIGHT, BIAS) and stream_of_module(module) is not None


def layer_slots(entries: Sequence[AdapterEntry]) -> dict[str, list[AdapterSlot]]:
    """Group the entries' adapters by module (strength = entry strength × block weight of the module). Adapters on
    other parameters (RMSNorm scales) or per-sample layers are left out (see :func:`unsupported_modules`). A learned
    gate applies where its checkpoint has a gate for the module; elsewhere the slot is plain."""
    by_module: dict[str, list[AdapterSlot]] = {}
    for entry in entries:
        for module, adapters in entry.adapter_set.adapters.items():
            block = block_of_module(module)
            strength = float(entry.strength * entry.blocks.weight_for(block.block_type, block.index))
            learned = entry.learned.gate_for(module) if entry.learned is not None else None
            for a in adapters:
                if _applies_per_token(module, a.parameter):
                    by_module.setdefault(module, []).append(
                        AdapterSlot(group=entry.group, strength=strength, adapter=a, gate=entry.gate, learned=learned))
    return by_module


def unsupported_modules(adapter_sets: Sequence[object]) -> list[str]:
    """``module.parameter`` names that cannot be applied per token (per-sample embedders, norm scales)."""
    return sorted({f"{module}.{a.parameter}" for adapter_set in adapter_sets
                   for module, adapters in adapter_set.adapters.items() for a in adapters
                   if not _applies_per_token(module, a.parameter)})
