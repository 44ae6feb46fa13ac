"""Ordered registry of converters (first match wins per key) and the state-dict -> AdapterSet entry point.

Order matters where spellings overlap: XLabs and DiffSynth (``single_blocks.N.`` with their own module names)
before the bare ComfyUI names of BFL control LoRAs; OneTrainer before kohya (both use ``lora_teN_``). Every converter that detects
its keys among those still unconsumed runs, so a file mixing, say, kohya UNet keys and ComfyUI text-encoder
keys is read whole; its ``format`` is then ``"kohya+comfyui"``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from types import ModuleType

import torch

from ..adapters import TEXT_ENCODERS, AdapterSet
from ..adapters.adapter_set import Adapter
from . import bfl, comfy, diffsynth, diffusers, kohya, lycoris, onetrainer, xlabs
from .foreign import foreign_model_error, no_flux_keys_error
from .parts import Converted, build_adapters, infer_geometry, merge_converted

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
                      metadata=metadata, widened_inputs=widened, sha256=sha256, source_keys=source_keys)
