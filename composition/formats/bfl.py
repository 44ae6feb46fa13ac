"""BFL control LoRAs (FLUX.1 Canny/Depth-dev-lora) and other bare ComfyUI-named files.

Keys are ComfyUI module names without prefix: ``double_blocks.0.img_attn.qkv.lora_A.weight``,
``...qkv.lora_B.bias`` (a bias delta), and plain ``*.norm.key_norm.scale`` tensors that REPLACE the norm
gains (``set_weight`` on the ``scale`` parameter). ``img_in`` is WIDENED: its ``lora_A`` takes the control
channels too (``in`` = 128 instead of 64), so the model weight must be zero-padded before the adapter applies
(reported in ``AdapterSet.widened_inputs`` by the registry).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch

from ..adapters import SCALE
from .comfy import place_flux_module
from .names import Placement, flux_placement
from .parts import Converted, RawAdapterParts, convert_with, merge_converted

logger = logging.getLogger(__name__)

NAME = "bfl"
_FLUX_START = re.compile(r"^(double_blocks\.\d+\.|single_blocks\.\d+\.|img_in\.|txt_in\.|time_in\.|vector_in\.|"
                         r"guidance_in\.|final_layer\.)")
_NORM_SCALE = re.compile(r"^(.+_norm)\.scale$")


def detect(keys: Iterable[str]) -> bool:
    """Any key starting with a bare Flux module name (XLabs and DiffSynth are detected earlier)."""
    return any(_FLUX_START.match(k) for k in keys)


def is_control_lora(converted: Converted) -> bool:
    """True when norm gains are replaced (the BFL control-LoRA signature)."""
    return any(p.placement.parameter == SCALE and "set_weight" in p.tensors
               for parts in converted.values() for p in parts)


def _place(prefix: str) -> list[Placement] | None:
    return place_flux_module(prefix)


def convert(state_dict: dict[str, torch.Tensor], file_name: str) -> tuple[Converted, list[str]]:
    """Pop bare norm gains as ``set_weight`` and the adapter keys; return placed parts and leftovers."""
    norms: Converted = {}
    for key in list(state_dict):
        m = _NORM_SCALE.match(key)
        placement = flux_placement(m.group(1)) if m else None
        if placement is None or placement.parameter != SCALE:
            continue
        parts = RawAdapterParts(placement=placement, tensors={"set_weight": state_dict.pop(key)}, keys=(key,))
        norms.setdefault(placement.name, []).append(parts)
    converted, leftovers = convert_with(state_dict, _place)
    return merge_converted(converted, norms), leftovers
