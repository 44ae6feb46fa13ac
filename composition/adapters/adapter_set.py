"""AdapterSet: every adapter read from one file, keyed by canonical module name, plus helpers to combine
the adapters (several slices may target one fused module) into one delta or one per-token output.

Canonical names are ComfyUI Flux module paths without prefix (``double_blocks.0.img_attn.qkv``,
``single_blocks.7.linear1``, ``final_layer.adaLN_modulation.1``, ``double_blocks.0.img_attn.norm.key_norm``).
Text-encoder parts live in ``te_adapters`` under ``clip_l:<HF CLIPTextModel path>`` / ``t5xxl:<T5 path>``.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch

from .common import WEIGHT, apply_parameter_delta
from .decomposed import DoRA
from .full import SetWeight, WeightDiff
from .hadamard import LoHa
from .kronecker import LoKr
from .lowrank import LoRA

logger = logging.getLogger(__name__)

Adapter = LoRA | LoHa | LoKr | DoRA | WeightDiff | SetWeight
TEXT_ENCODERS = ("clip_l", "t5xxl")
NEEDS_BASE = (DoRA, SetWeight)


@dataclass(frozen=True)
class AdapterSet:
    """One file's adapters. Mappings are read-only by convention (the dataclass is frozen).

    ``adapters``: canonical Flux module -> adapters on it (a slice adapter carries its ``offset``).
    ``te_adapters``: ``clip_l:...`` / ``t5xxl:...`` -> adapters. ``leftovers``: file keys no converter consumed.
    ``widened_inputs``: module -> ``(out, in)`` for BFL control LoRAs whose ``img_in`` input is wider than the
    model's (the model weight must be zero-padded to that shape before the adapter applies).
    ``source_keys``: canonical name -> the file keys it was read from (for error messages).
    ``notes``: how the file was read where it is not plain from the keys (``"alpha 16 from
    lora_adapter_metadata (transformer.lora_alpha, r 4: scale 4) on 38 modules"``), for ``loom inspect``.
    """

    source: str
    format: str
    adapters: Mapping[str, tuple[Adapter, ...]]
    te_adapters: Mapping[str, tuple[Adapter, ...]] = field(default_factory=dict)
    leftovers: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    widened_inputs: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    sha256: str | None = None
    source_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def modules(self) -> tuple[str, ...]:
        """Canonical Flux module names touched, sorted."""
        return tuple(sorted(self.adapters))

    def kinds(self) -> dict[str, int]:
        """Adapter kind name -> count (``{"LoRA": 494}``), for summaries."""
        counts: dict[str, int] = {}
        for group in (*self.adapters.values(), *self.te_adapters.values()):
            for a in group:
                counts[type(a).__name__] = counts.get(type(a).__name__, 0) + 1
        return counts

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "AdapterSet":
        """Copy with every adapter moved/cast."""
        def move(groups: Mapping[str, tuple[Adapter, ...]]) -> dict[str, tuple[Adapter, ...]]:
            return {k: tuple(a.to(device=device, dtype=dtype) for a in v) for k, v in groups.items()}
        return replace(self, adapters=move(self.adapters), te_adapters=move(self.te_adapters))


def adapter_tensors(adapter: Adapter) -> list[torch.Tensor]:
    """Every tensor ``adapter`` holds (a DoRA's inner adapter's too), in field order."""
    out = []
    for f in dataclasses.fields(adapter):
        value = getattr(adapter, f.name)
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.extend(adapter_tensors(value))
    return out


def with_tensors(adapter: Adapter, tensors: Iterator[torch.Tensor]) -> Adapter:
    """``adapter`` holding the next tensors of ``tensors`` (in :func:`adapter_tensors` order) instead of its own:
    the same adapter with its factors moved, e.g. into a device buffer."""
    changes = {}
    for f in dataclasses.fields(adapter):
        value = getattr(adapter, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = next(tensors)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type) and adapter_tensors(value):
            changes[f.name] = with_tensors(value, tensors)
    return dataclasses.replace(adapter, **changes)


def merged_delta(adapters: Iterable[Adapter], target_shape: tuple[int, ...],
                 base_weight: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Sum of the adapters' deltas placed at their offsets: ``[*target_shape]`` in ``dtype`` on ``device``
    (default: where the adapters' tensors are; each delta is computed there).

    All adapters must write the same parameter. ``base_weight`` (whole parameter) is needed by DoRA/SetWeight.
    """
    total = None if device is None else torch.zeros(target_shape, dtype=dtype, device=device)
    for a in adapters:
        d = a.delta_weight(base_weight)
        if total is None:
            total = torch.zeros(target_shape, dtype=dtype, device=d.device)
        d = d.to(device=total.device, dtype=dtype)
        if a.offset is None:
            total += d
        else:
            total[a.offset.start:a.offset.stop] += d
    return torch.zeros(target_shape, dtype=dtype) if total is None else total


def bypass_output(adapters: Iterable[Adapter], x: torch.Tensor, out_features: int,
                  base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token sum of the adapters' outputs placed at their offsets: ``x [..., in] -> [..., out_features]``."""
    out = x.new_zeros(*x.shape[:-1], out_features)
    for a in adapters:
        y = a.bypass_delta(x, base_weight)
        if a.offset is None:
            out = out + y
        else:
            out[..., a.offset.start:a.offset.stop] += y
    return out


def strength_applied(x: torch.Tensor, base: torch.Tensor, adapters: Iterable[Adapter], strength: float,
                     parameter: str = WEIGHT, base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``base + strength · Σ bypass`` for one module: the reference per-token forward used by tests/bridges."""
    adapters = tuple(adapters)
    if any(a.parameter != parameter for a in adapters):
        raise ValueError(f"adapters write different parameters than {parameter!r}")
    return base + strength * bypass_output(adapters, x, base.shape[-1], base_weight)


__all__ = ["Adapter", "AdapterSet", "NEEDS_BASE", "TEXT_ENCODERS", "adapter_tensors", "apply_parameter_delta",
           "bypass_output", "merged_delta", "strength_applied", "with_tensors"]
