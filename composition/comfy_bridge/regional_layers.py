"""Per-token adapters on Flux Linear layers: ``out = base(x) + Σ_i strength_i · mask_i[token] · Δ_i(x)``.

A :class:`RegionalLinear` is installed with ``ModelPatcher.add_object_patch`` on a clone. It is an instance of a
subclass of the wrapped module's own class (``comfy.ops`` Linear), built from a shallow copy of that module: it
owns the *same* Parameter objects under the same names, so ComfyUI's weight patches (a merged LoRA upstream),
casting and low-VRAM loading keep working, and the original module is never modified.

Low-rank adapters (LoRA/LoCon, Tucker cores folded) go through :func:`kernels.multi_lora.masked_multi_lora`: all
adapters of a layer stacked, two matmuls whatever their number. Other kinds (LoHa, LoKr, DoRA, WeightDiff,
SetWeight) use their exact ``bypass_delta``. Modulation layers (``img_mod.lin``, ``modulation.lin``,
``final_layer.adaLN_modulation.1``) see one vector per sample ``[B, 1, C]``; they return ``[B, L, O]`` — the
base output broadcast plus each token's own adapter mix — which Flux's ``apply_mod`` broadcasts per token.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ...kernels.multi_lora import AdapterFactors, StackedLoRA, masked_multi_lora, select_active, stack_lora
from ..adapters import LoRA
from ..adapters.common import BIAS, WEIGHT

logger = logging.getLogger(__name__)

STREAMS = ("img", "txt", "joint")
_IMAGE_PARTS = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin")
_TEXT_PARTS = ("txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin")
_SINGLE_PARTS = ("linear1", "linear2", "modulation.lin")


class RegionalLayerError(ValueError):
    """A wrapped layer met input it cannot map to tokens; the message names the module."""


def stream_of_module(module: str) -> str | None:
    """Token stream a Flux module runs on: ``img`` ``[B, L_img, C]``, ``txt`` ``[B, T, C]``, ``joint``
    ``[B, T + L_img, C]`` (single blocks); None for per-sample layers that cannot be regional (``time_in``...)."""
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


class TokenWeights(Protocol):
    """What a wrapped layer reads each call: per-token region weights of its stream, ``[B, L, N_regions]``."""

    def stream_weights(self, stream: str) -> torch.Tensor | None: ...

    def active_regions(self) -> frozenset[int]: ...


@dataclass(frozen=True)
class AdapterSlot:
    """One adapter of one layer: the region it paints, its static strength (row strength × block weight) and
    the adapter itself (a slice of a fused layer carries its ``offset``)."""

    region: int
    strength: float
    adapter: object


@dataclass(frozen=True)
class _Fast:
    stacked: StackedLoRA
    regions: torch.Tensor     # [n] int64: region of each stacked factor
    strengths: torch.Tensor   # [n] float32


def _factors(slot: AdapterSlot) -> AdapterFactors:
    a: LoRA = slot.adapter  # type: ignore[assignment]
    down = a.down if a.mid is None else (a.mid.float() @ a.down.float()).to(a.down.dtype)
    return AdapterFactors(down=down, up=a.up, scale=a.scale, out_offset=a.offset.start if a.offset else 0)


def _is_fast(slot: AdapterSlot) -> bool:
    return isinstance(slot.adapter, LoRA) and slot.adapter.parameter == WEIGHT


class RegionalLinearMixin:
    """Forward of a regionally adapted Linear; mixed into a subclass of the wrapped module's class."""

    loom_module: str
    loom_stream: str
    loom_source: TokenWeights
    loom_fast: _Fast | None
    loom_exact: tuple[AdapterSlot, ...]
    loom_cache: dict

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: D401 - nn.Module API
        """``x [B, L, C_in]`` (or ``[B, 1, C_in]`` / ``[B, C_in]`` for modulation) -> ``[B, L, C_out]``."""
        base = super().forward(x, *args, **kwargs)  # type: ignore[misc]
        weights = self.loom_source.stream_weights(self.loom_stream)
        if weights is None:
            return base
        per_sample = x.ndim == 2 or (x.shape[1] == 1 and weights.shape[1] != 1)
        if not per_sample and (x.shape[0] != weights.shape[0] or x.shape[1] != weights.shape[1]):
            raise RegionalLayerError(f"{self.loom_module}: input {tuple(x.shape)} does not match the "
                                     f"{self.loom_stream} tokens {tuple(weights.shape[:2])} of this step")
        active = self.loom_source.active_regions()
        if per_sample:
            return self._per_sample(x if x.ndim == 3 else x[:, None], base, weights, active)
        return base + self._per_token(x, weights, active).to(base.dtype)

    def _fast_on(self, device: torch.device, dtype: torch.dtype) -> _Fast:
        key = ("fast", str(device), dtype)
        cached = self.loom_cache.get(key)
        if cached is None:
            fast = self.loom_fast
            cached = _Fast(fast.stacked.to(device, dtype), fast.regions.to(device), fast.strengths.to(device))
            self.loom_cache[key] = cached
        return cached

    def _active_factors(self, fast: _Fast, active: frozenset[int], device: torch.device) -> object:
        """Stacked factors of active regions with non-zero strength (from CPU copies: no device sync)."""
        key = ("active", active, str(device))
        cached = self.loom_cache.get(key)
        if cached is None:
            cpu = self.loom_fast
            chosen = [i for i, (r, s) in enumerate(zip(cpu.regions.tolist(), cpu.strengths.tolist()))
                      if r in active and s != 0.0]
            cached = select_active(fast.stacked, adapter_index=chosen)
            self.loom_cache[key] = cached
        return cached

    def _token_scale(self, weights: torch.Tensor, regions: torch.Tensor, strengths: torch.Tensor) -> torch.Tensor:
        """``[B, L, N_regions]`` -> ``[B, L, n_factors]``: each factor's region weight times its strength."""
        return weights.index_select(-1, regions.to(weights.device)) * strengths.to(weights.device)

    def _per_token(self, x: torch.Tensor, weights: torch.Tensor, active: frozenset[int]) -> torch.Tensor:
        out = None
        if self.loom_fast is not None:
            fast = self._fast_on(x.device, x.dtype)
            scale = self._token_scale(weights, fast.regions, fast.strengths)
            out = masked_multi_lora(x, fast.stacked, scale, self._active_factors(fast, active, x.device))
        for slot in self.loom_exact:
            if slot.region not in active or slot.strength == 0.0:
                continue
            y = self._exact_delta(slot, x)
            scale = (weights[..., slot.region:slot.region + 1] * slot.strength).to(y.dtype)
            out = self._place(out, x, y * scale, slot)
        return out if out is not None else x.new_zeros(())

    def _per_sample(self, v: torch.Tensor, base: torch.Tensor, weights: torch.Tensor,
                    active: frozenset[int]) -> torch.Tensor:
        """Modulation: ``v [B, 1, C_in]``, ``base [B, 1, O]`` -> ``[B, L, O]`` with a per-token adapter mix."""
        slots = [s for s in self._all_slots() if s.region in active and s.strength != 0.0]
        if not slots:
            return base
        out = base.expand(base.shape[0], weights.shape[1], base.shape[-1])
        for s in slots:  # slot by slot, not one einsum: a zero weight adds an exact zero (bit-exact isolation)
            delta = self._place(None, v, self._exact_delta(s, v), s, base.shape[-1])  # [B, 1, O]
            scale = (weights[..., s.region:s.region + 1] * s.strength).to(delta.dtype)  # [B, L, 1]
            out = out + (scale * delta).to(base.dtype)
        return out

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


def _regional_class(base_cls: type) -> type:
    cls = _CLASSES.get(base_cls)
    if cls is None:
        cls = type(f"Regional{base_cls.__name__}", (RegionalLinearMixin, base_cls), {})
        _CLASSES[base_cls] = cls
    return cls


def wrap_linear(original: torch.nn.Module, module: str, slots: tuple[AdapterSlot, ...],
                source: TokenWeights) -> torch.nn.Module:
    """A regional copy of ``original`` (sharing its Parameters) that adds the slots' adapters per token."""
    if not hasattr(original, "weight") or getattr(original, "weight") is None or original.weight.ndim != 2:
        raise RegionalLayerError(f"{module}: only Linear layers can carry regional adapters, got "
                                 f"{type(original).__name__}")
    stream = stream_of_module(module)
    if stream is None:
        raise RegionalLayerError(f"{module}: this layer runs once per sample, not per token; it cannot be regional")
    wrapper = object.__new__(_regional_class(type(original)))
    state = dict(original.__dict__)
    for name in ("_parameters", "_buffers", "_modules"):
        state[name] = type(state[name])(state[name])
    wrapper.__dict__.update(state)
    fast = tuple(s for s in slots if _is_fast(s))
    exact = tuple(s for s in slots if not _is_fast(s))
    loom_fast = None
    if fast:
        stacked = stack_lora([_factors(s) for s in fast], int(original.weight.shape[0]))
        loom_fast = _Fast(stacked, torch.tensor([s.region for s in fast], dtype=torch.long),
                          torch.tensor([s.strength for s in fast], dtype=torch.float32))
    object.__setattr__(wrapper, "loom_module", module)
    object.__setattr__(wrapper, "loom_stream", stream)
    object.__setattr__(wrapper, "loom_source", source)
    object.__setattr__(wrapper, "loom_fast", loom_fast)
    object.__setattr__(wrapper, "loom_exact", exact)
    object.__setattr__(wrapper, "loom_cache", {"slots": tuple(slots)})
    return wrapper


def layer_slots(entries_by_region: list[list[tuple[float, Callable[[str], float], object]]]) -> dict[str, list[AdapterSlot]]:
    """Group adapters by module: ``entries_by_region[k]`` lists ``(strength, block_weight(module), adapter_set)``
    for region k. Returns module -> slots; adapters on non-weight/bias parameters (RMSNorm scales) are left out
    (see :func:`unsupported_modules`)."""
    by_module: dict[str, list[AdapterSlot]] = {}
    for region, entries in enumerate(entries_by_region):
        for strength, block_weight, adapter_set in entries:
            for module, adapters in adapter_set.adapters.items():
                for a in adapters:
                    if a.parameter not in (WEIGHT, BIAS) or stream_of_module(module) is None:
                        continue
                    by_module.setdefault(module, []).append(
                        AdapterSlot(region=region, strength=float(strength * block_weight(module)), adapter=a))
    return by_module


def unsupported_modules(adapter_sets: list[object]) -> list[str]:
    """``module.parameter`` names that cannot be applied per token (per-sample embedders, norm scales)."""
    names = set()
    for adapter_set in adapter_sets:
        for module, adapters in adapter_set.adapters.items():
            for a in adapters:
                if a.parameter not in (WEIGHT, BIAS) or stream_of_module(module) is None:
                    names.add(f"{module}.{a.parameter}")
    return sorted(names)
