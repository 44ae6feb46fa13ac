"""Ordered registry of converters (first match wins per key) and the state-dict -> AdapterSet entry point.

Order matters where spellings overlap: XLabs and DiffSynth (``single_blocks.N.`` with their own module names)
before the bare ComfyUI names of BFL control LoRAs; OneTrainer before kohya (both use ``lora_teN_``). Every
converter that detects its keys among those still unconsumed runs, so a file mixing, say, kohya UNet keys and
ComfyUI text-encoder keys is read whole; its ``format`` is then ``"kohya+comfyui"``.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from types import ModuleType

import torch

from ..adapters import TEXT_ENCODERS, AdapterSet
from ..adapters.adapter_set import Adapter
from . import bfl, comfy, diffsynth, diffusers, kohya, lycoris, onetrainer, xlabs
from .foreign import foreign_model_error, no_flux_keys_error
from .parts import Converted, build_adapters, infer_geometry, merge_converted
from .peft_metadata import LORA_ADAPTER_METADATA, component_of, read_component_configs

logger = logging.getLogger(__name__)

FORMATS: tuple[ModuleType, ...] = (xlabs, diffsynth, bfl, comfy, onetrainer, kohya, lycoris, diffusers)


def convert_state_dict(state_dict: dict[str, torch.Tensor], file_name: str) -> tuple[Converted, list[str], list[str]]:
    """Run the registry over a copy of ``state_dict``: ``(placed parts, format names, leftover keys)``."""
    remaining = dict(state_dict)
    converted: Converted = {}
    names: list[str] = []
    for fmt in FORMATS:
        if not remaining or not fmt.detect(remaining.keys()):
            continue
        found, _ = fmt.convert(remaining, file_name)
        if found:
            merge_converted(converted, found)
            names.append(fmt.NAME)
    return converted, names, sorted(remaining)


def _format_label(names: list[str], metadata: Mapping[str, str]) -> str:
    """``"kohya"``, ``"diffusers"``, ``"ai-toolkit"`` (diffusers keys + ai-toolkit metadata), ``"a+b"``."""
    label = "+".join(names)
    if names == ["diffusers"] and "ai-toolkit" in json.dumps(dict(metadata)).lower():
        return "ai-toolkit"
    return label


def apply_metadata_alpha(converted: Converted, metadata: Mapping[str, str], file_name: str
                         ) -> tuple[Converted, tuple[str, ...]]:
    """Give LoRA parts without an ``.alpha`` tensor the scale ``lora_adapter_metadata`` states for their module
    (as an alpha for their own rank); returns the parts and one note per (field, alpha, r) used."""
    configs = read_component_configs(metadata, file_name)
    if not configs:
        return converted, ()
    used: Counter[tuple[str, float, int, float]] = Counter()
    ignored = 0
    out: Converted = {}
    for name, parts_list in converted.items():
        for parts in parts_list:
            found = component_of(parts.source, configs)
            if found is not None and "up" in parts.tensors and "down" in parts.tensors:
                if "alpha" in parts.tensors:
                    ignored += 1
                else:
                    config, module = found
                    scale, alpha, r, where = config.scale(module)
                    rank = int(parts.tensors["down"].shape[0])
                    if rank != r:
                        logger.warning("%s: %s has rank %d but %s says r %d; using alpha / r as PEFT does",
                                       file_name, parts.source, rank, LORA_ADAPTER_METADATA, r)
                    tensors = {**parts.tensors, "alpha": torch.tensor(scale * rank)}
                    parts = replace(parts, tensors=tensors)
                    used[(where, alpha, r, scale)] += 1
            out.setdefault(name, []).append(parts)
    notes = tuple(f"alpha {alpha:g} from {LORA_ADAPTER_METADATA} ({where}, r {r}: scale {scale:g}) on {count} "
                  f"module{'s' if count != 1 else ''}" for (where, alpha, r, scale), count in sorted(used.items()))
    if ignored:
        notes += (f"{LORA_ADAPTER_METADATA} not used for {ignored} modules that store their own .alpha",)
    return out, notes


def read_adapter_set(state_dict: dict[str, torch.Tensor], file_name: str,
                     metadata: Mapping[str, str] | None = None, sha256: str | None = None) -> AdapterSet:
    """Build the AdapterSet of one file's tensors; raises for foreign models, no Flux keys, malformed parts.

    ``state_dict`` is not modified. Unconsumed keys are kept in ``leftovers`` (and logged), never dropped.
    """
    metadata = dict(metadata or {})
    error = foreign_model_error(file_name, state_dict.keys())
    if error is not None:
        raise error
    converted, names, leftovers = convert_state_dict(state_dict, file_name)
    if not converted:
        raise no_flux_keys_error(file_name, state_dict.keys())
    converted, notes = apply_metadata_alpha(converted, metadata, file_name)
    geometry = infer_geometry(converted)
    flux: dict[str, list[Adapter]] = {}
    text: dict[str, list[Adapter]] = {}
    source_keys: dict[str, tuple[str, ...]] = {}
    for name, parts_list in converted.items():
        is_text = name.split(":", 1)[0] in TEXT_ENCODERS and ":" in name
        bucket = text if is_text else flux
        for parts in parts_list:
            bucket.setdefault(name, []).extend(build_adapters(parts, geometry, file_name))
            source_keys[name] = source_keys.get(name, ()) + parts.keys
    if not flux and not text:
        raise no_flux_keys_error(file_name, state_dict.keys())
    widened: dict[str, tuple[int, ...]] = {}
    if "bfl" in names and bfl.is_control_lora(converted) and "img_in" in flux:
        widened["img_in"] = tuple(flux["img_in"][0].target_shape)
    if leftovers:
        logger.warning("%s: %d keys not used by any converter, e.g. %s", file_name, len(leftovers), leftovers[:3])
    return AdapterSet(source=file_name, format=_format_label(names, metadata),
                      adapters={k: tuple(v) for k, v in flux.items()},
                      te_adapters={k: tuple(v) for k, v in text.items()}, leftovers=tuple(leftovers),
                      metadata=metadata, widened_inputs=widened, sha256=sha256, source_keys=source_keys,
                      notes=notes)
