"""Merged ("classic") LoRA application through ComfyUI's own weight-patch machinery.

Each (file, parameter) becomes one :class:`LoomWeightPatch` registered with ``ModelPatcher.add_patches`` on a
clone, so ComfyUI's memory management, low-VRAM loading and other packs' patches keep working. The patch computes
the delta lazily with *our* adapter math (every format and kind, slices of fused qkv/linear1, DoRA, set_weight,
widened BFL ``img_in``) when ComfyUI patches the weight. A LoRA adds ``strength · scale · up @ down`` into the rows it
writes with one in-place ``addmm_`` on ComfyUI's working copy, its factors cast once as core's LoRA patch casts
them: no dense zero ΔW, no per-part dtype round trips.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import comfy.model_management
import torch
from comfy.weight_adapter.base import WeightAdapterBase

from ..adapters import Adapter, AdapterSet, LoRA, merged_delta
from ..block_weights import BlockWeights, BlockWeightsError, block_of_module, parse_block_weights
from ..stack import StackEntry, StackError

logger = logging.getLogger(__name__)

TE_PREFIX = {"clip_l": "clip_l.transformer.", "t5xxl": "t5xxl.transformer."}


class LoomWeightPatch(WeightAdapterBase):
    """A ComfyUI weight patch whose delta is our adapters' sum (several slices may share one parameter)."""

    name = "loom"

    def __init__(self, adapters: tuple[Adapter, ...], source: str, widened: tuple[int, ...] | None = None):
        self.adapters = adapters
        self.source = source
        self.widened = widened
        self.loaded_keys: set[str] = set()
        self.weights: list[torch.Tensor] = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """Return ``weight + strength · Σ Δ`` (``weight`` is ComfyUI's working copy of the parameter, updated in
        place). Kinds other than LoRA (and every kind under a non-identity ``function``) add their summed delta,
        computed first from the weight as it came in (DoRA and set_weight read it); LoRAs then add their product."""
        if self.widened is not None and tuple(weight.shape) != tuple(self.widened):
            padded = weight.new_zeros(self.widened)
            padded[tuple(slice(0, s) for s in weight.shape)] = weight
            weight = padded
        if strength == 0.0:
            return weight
        in_place = weight.dtype == intermediate_dtype and _is_identity(function, weight)
        low_rank = [a for a in self.adapters if in_place and isinstance(a, LoRA)]
        rest = [a for a in self.adapters if not any(a is b for b in low_rank)]
        if rest:
            delta = merged_delta(rest, tuple(weight.shape), base_weight=weight, dtype=intermediate_dtype)
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
                  blocks: BlockWeights) -> dict[float, dict[str, LoomWeightPatch]]:
    """Group one file's diffusion-model patches by effective strength (strength × block weight).

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
            key = f"diffusion_model.{module}.{parameter}"
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
                grouped[s][key] = LoomWeightPatch(tuple(group), adapter_set.source,
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
                patches[key] = LoomWeightPatch(tuple(group), adapter_set.source)
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
        for strength, patches in model_patches(entry.adapter_set, model_shapes, row.strength, blocks).items():
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
