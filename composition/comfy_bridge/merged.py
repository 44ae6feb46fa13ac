"""Merged ("classic") LoRA application through ComfyUI's own weight-patch machinery.

Each (file, parameter) becomes one :class:`LoomWeightPatch` registered with ``ModelPatcher.add_patches`` on a
clone, so ComfyUI's memory management, low-VRAM loading and other packs' patches keep working. The patch computes
the delta lazily with *our* adapter math (every format and kind, slices of fused qkv/linear1, DoRA, set_weight,
widened BFL ``img_in``) when ComfyUI patches the weight. A LoRA adds ``strength · scale · up @ down`` into the rows it
writes with one in-place ``addmm_`` on ComfyUI's working copy, its factors cast once as core's LoRA patch casts
them: no dense zero ΔW, no per-part dtype round trips.

The patch keeps ComfyUI's weight-adapter contract (``comfy.weight_adapter.base.WeightAdapterBase``), which
dynamic VRAM (ComfyUI 0.33's ``ModelPatcherDynamic``, the default on NVIDIA) relies on: patches are applied per
forward as ``LowVramPatch``; ``calculate_shape(key)`` says when a patch resizes the weight (the widened
``img_in``: ComfyUI then loads that weight patched once instead of per forward); and ``weights`` lists every
tensor the patch holds, which ComfyUI copies into a device buffer beside the weight and hands back through the
constructor ``type(patch)(loaded_keys, weights)`` (``comfy.lora.prefetch_prepared_value``), so ΔW is computed
on the device from factors that travelled with the weight. Parameter names come from the checkpoint (BFL
control LoRAs replace ``*_norm.scale``); the model's own name is what ComfyUI's ``process_unet_state_dict``
makes of it (``*_norm.weight`` from 0.33 on).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import comfy.model_management
import torch
from comfy.weight_adapter.base import WeightAdapterBase

from ..adapters import (
    NEEDS_BASE,
    WEIGHT,
    Adapter,
    AdapterSet,
    LoRA,
    adapter_tensors,
    bypass_output,
    merged_delta,
    with_tensors,
)
from ..block_weights import BlockWeights, BlockWeightsError, block_of_module, parse_block_weights
from ..stack import StackEntry, StackError
from .flux_model import model_key

logger = logging.getLogger(__name__)

TE_PREFIX = {"clip_l": "clip_l.transformer.", "t5xxl": "t5xxl.transformer."}


@dataclass(frozen=True)
class PatchLayout:
    """A :class:`LoomWeightPatch` apart from its tensors: its adapters (whose tensors the patch's ``weights``
    replace), the file they came from and, for a widened BFL ``img_in``, the weight's new shape."""

    adapters: tuple[Adapter, ...]
    source: str
    widened: tuple[int, ...] | None = None


class LoomWeightPatch(WeightAdapterBase):
    """A ComfyUI weight patch whose delta is our adapters' sum (several slices may share one parameter)."""

    name = "loom"

    def __init__(self, loaded_keys: set[str], weights: list[Any]):
        """ComfyUI's adapter constructor: ``weights`` is ``[*tensors, layout]``, the tensors of
        ``layout.adapters`` in :func:`adapter_tensors` order (possibly moved: see the module docstring)."""
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def of(cls, adapters: tuple[Adapter, ...], source: str,
           widened: tuple[int, ...] | None = None) -> LoomWeightPatch:
        layout = PatchLayout(tuple(adapters), source, widened)
        return cls(set(), [t for a in layout.adapters for t in adapter_tensors(a)] + [layout])

    @property
    def layout(self) -> PatchLayout:
        return self.weights[-1]

    @property
    def source(self) -> str:
        return self.layout.source

    @cached_property
    def adapters(self) -> tuple[Adapter, ...]:
        """The adapters holding this patch's tensors (built on first use: ComfyUI makes throw-away copies)."""
        tensors = iter(self.weights[:-1])
        return tuple(with_tensors(a, tensors) for a in self.layout.adapters)

    def calculate_shape(self, key: str) -> tuple[int, ...] | None:
        """The shape the patched weight has: the widened ``img_in``'s, else None (unchanged)."""
        return self.layout.widened

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Bypass mode (0.33's ``WeightAdapterBase``; the base weight is not read): ``multiplier · Σ Δ_i(x)``
        ``[..., out]`` for ``x [..., in]``. Adapters that need the base weight (DoRA, set_weight), a widened
        ``img_in`` and non-matrix parameters cannot run this way and say so."""
        kinds = {type(a).__name__ for a in self.adapters if isinstance(a, NEEDS_BASE) or a.parameter != WEIGHT}
        if kinds or self.layout.widened is not None:
            raise NotImplementedError(f"{self.source}: {sorted(kinds) or ['widened img_in']} need the base weight "
                                      f"or are not a matrix; load this LoRA with Loom LoRA Stack (merged mode)")
        return self.multiplier * bypass_output(self.adapters, x, base_out.shape[-1]).to(base_out.dtype)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """Return ``weight + strength · Σ Δ`` (``weight``: ComfyUI's working copy of the parameter, float32 and
        updated in place when ComfyUI patches it, the compute dtype per forward under dynamic VRAM). Kinds other
        than LoRA (and every kind when the copy is not in ``intermediate_dtype`` or under a non-identity
        ``function``) add their summed delta, computed first from the weight as it came in (DoRA and set_weight
        read it) on ``weight``'s device; LoRAs then add their product in place."""
        widened = self.layout.widened
        if widened is not None and tuple(weight.shape) != tuple(widened):
            padded = weight.new_zeros(widened)
            padded[tuple(slice(0, s) for s in weight.shape)] = weight
            weight = padded
        if strength == 0.0:
            return weight
        in_place = weight.dtype == intermediate_dtype and _is_identity(function, weight)
        low_rank = [a for a in self.adapters if in_place and isinstance(a, LoRA)]
        rest = [a for a in self.adapters if not (in_place and isinstance(a, LoRA))]
        if rest:
            delta = merged_delta(rest, tuple(weight.shape), base_weight=weight, dtype=intermediate_dtype,
                                 device=weight.device)
            weight += function(strength * delta.to(device=weight.device, dtype=weight.dtype))
        for a in low_rank:
            rows = weight if a.offset is None else weight[a.offset.start:a.offset.stop]
            down = comfy.model_management.cast_to_device(a.down, weight.device, weight.dtype)
            if a.mid is not None:
                down = comfy.model_management.cast_to_device(a.mid, weight.device, weight.dtype) @ down
            up = comfy.model_management.cast_to_device(a.up, weight.device, weight.dtype)
            rows.addmm_(up, down, alpha=strength * a.scale)
        return weight


def _is_identity(function, weight: torch.Tensor) -> bool:
    """Whether ComfyUI's patch ``function`` is the identity it substitutes for None (it returns its argument)."""
    probe = weight[:0]
    return function is None or function(probe) is probe


@dataclass(frozen=True)
class MergedResult:
    model: object
    clip: object | None
    skipped_text_encoder_keys: tuple[str, ...]


def _depths(model_keys: set[str]) -> tuple[int, int]:
    def count(prefix: str) -> int:
        return len({k.split(".")[2] for k in model_keys if k.startswith(prefix)})
    return count("diffusion_model.double_blocks."), count("diffusion_model.single_blocks.")


def model_patches(adapter_set: AdapterSet, model_shapes: dict[str, tuple[int, ...]], strength: float,
                  blocks: BlockWeights, model_config: Any = None) -> dict[float, dict[str, LoomWeightPatch]]:
    """Group one file's diffusion-model patches by effective strength (strength × block weight), keyed by the
    model's parameter names (``model_config``'s renaming of checkpoint names; none without a config).

    Raises ValueError naming the file, the key and both shapes when the LoRA does not fit this model.
    """
    grouped: dict[float, dict[str, LoomWeightPatch]] = defaultdict(dict)
    for module, adapters in adapter_set.adapters.items():
        by_parameter: dict[str, list[Adapter]] = defaultdict(list)
        for a in adapters:
            by_parameter[a.parameter].append(a)
        ref = block_of_module(module)
        s = strength * blocks.weight_for(ref.block_type, ref.index)
        for parameter, group in by_parameter.items():
            name = f"{module}.{parameter}"
            key = "diffusion_model." + (model_key(model_config, name) if model_config is not None else name)
            if key not in model_shapes:
                raise ValueError(f"{adapter_set.source}: {module}.{parameter} does not exist in this model "
                                 f"(a LoRA for a larger or different Flux?)")
            widened = adapter_set.widened_inputs.get(module) if parameter == "weight" else None
            want = tuple(widened or model_shapes[key])
            for a in group:
                if tuple(a.target_shape) != want:
                    raise ValueError(f"{adapter_set.source}: shape mismatch at {key}: the LoRA targets "
                                     f"{tuple(a.target_shape)}, the model has {model_shapes[key]}")
            if s != 0.0:
                grouped[s][key] = LoomWeightPatch.of(tuple(group), adapter_set.source,
                                                     tuple(widened) if widened else None)
    return grouped


def text_encoder_patches(adapter_set: AdapterSet, clip_keys: set[str]) -> tuple[dict[str, LoomWeightPatch], list[str]]:
    """CLIP-side patches keyed by the CLIP model's state-dict keys, and the keys this CLIP does not have
    (e.g. T5 parts when the workflow's text encoder is CLIP-L only)."""
    patches: dict[str, LoomWeightPatch] = {}
    skipped: list[str] = []
    for name, adapters in adapter_set.te_adapters.items():
        encoder, _, path = name.partition(":")
        by_parameter: dict[str, list[Adapter]] = defaultdict(list)
        for a in adapters:
            by_parameter[a.parameter].append(a)
        for parameter, group in by_parameter.items():
            key = f"{TE_PREFIX.get(encoder, encoder + '.transformer.')}{path}.{parameter}"
            if key in clip_keys:
                patches[key] = LoomWeightPatch.of(tuple(group), adapter_set.source)
            else:
                skipped.append(f"{name}.{parameter}")
    return patches, skipped


def apply_merged(model, clip, entries: list[StackEntry]) -> MergedResult:
    """Clone ``model`` (and ``clip``) and add every enabled entry's patches; the inputs are left untouched."""
    model = model.clone()
    model_shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()
                    if k.startswith("diffusion_model.")}
    depth, depth_single = _depths(set(model_shapes))
    clip = clip.clone() if clip is not None else None
    clip_keys = set(clip.patcher.model.state_dict()) if clip is not None else set()
    skipped_all: list[str] = []
    for entry in entries:
        row = entry.row
        try:
            blocks = parse_block_weights(row.blocks, depth, depth_single)
        except BlockWeightsError as err:
            raise StackError(f"stack row {row.lora!r}: field 'blocks': {err}") from None
        for strength, patches in model_patches(entry.adapter_set, model_shapes, row.strength, blocks,
                                               model.model.model_config).items():
            added = model.add_patches(patches, strength)
            missing = set(patches) - set(added)
            if missing:
                raise ValueError(f"{entry.path}: ComfyUI refused patches for {sorted(missing)[:5]}")
        if clip is not None and entry.adapter_set.te_adapters and row.effective_clip_strength != 0.0:
            patches, skipped = text_encoder_patches(entry.adapter_set, clip_keys)
            if patches:
                clip.add_patches(patches, row.effective_clip_strength)
            if skipped:
                logger.warning("%s: %d text-encoder keys have no match in this CLIP (e.g. %s); they are not applied",
                               entry.path, len(skipped), skipped[0])
            skipped_all += skipped
    return MergedResult(model=model, clip=clip, skipped_text_encoder_keys=tuple(skipped_all))
