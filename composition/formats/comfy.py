"""ComfyUI generic (LoraSave, core extract): ``diffusion_model.<ComfyUI module>.<spelling>``.

A prefix may also be a parameter path (``diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale`` with
``.set_weight``, ``...qkv.bias`` with ``.diff``); the trailing ``.weight``/``.bias``/``.scale`` names the parameter.
Text encoders: ``text_encoders.clip_l.transformer.<HF CLIP path>`` and ``text_encoders.t5xxl.transformer.<T5 path>``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

import torch

from ..adapters import BIAS, SCALE, WEIGHT
from .names import Placement, diffusers_placement, flux_placement, text_encoder_placement
from .parts import Converted, convert_with

logger = logging.getLogger(__name__)

NAME = "comfyui"
UNET_PREFIX = "diffusion_model."
TE_PREFIXES = {"text_encoders.clip_l.transformer.": "clip_l", "text_encoders.t5xxl.transformer.": "t5xxl"}
_PARAMETER_SUFFIXES = {".weight": WEIGHT, ".bias": BIAS, ".scale": SCALE}


def detect(keys: Iterable[str]) -> bool:
    """Any ``diffusion_model.`` or ``text_encoders.`` key (XLabs processors are detected earlier)."""
    return any(k.startswith((UNET_PREFIX, "text_encoders.")) for k in keys)


def place_flux_module(name: str) -> list[Placement] | None:
    """A dotted ComfyUI Flux module or parameter path (``...key_norm.scale``, ``...qkv.bias``)."""
    placement = flux_placement(name)
    if placement is not None:
        return [placement]
    for suffix, parameter in _PARAMETER_SUFFIXES.items():
        if name.endswith(suffix):
            placement = flux_placement(name[: -len(suffix)])
            if placement is not None:
                return [replace(placement, parameter=parameter)]
    return None


def _place(prefix: str) -> list[Placement] | None:
    if prefix.startswith(UNET_PREFIX):
        name = prefix[len(UNET_PREFIX):]
        found = place_flux_module(name)
        if found:
            return found
        placement = diffusers_placement(name)
        return [placement] if placement else None
    for te_prefix, encoder in TE_PREFIXES.items():
        if prefix.startswith(te_prefix):
            placement = text_encoder_placement(prefix[len(te_prefix):])
            return [placement] if placement and placement.name.startswith(encoder + ":") else None
    return None


def convert(state_dict: dict[str, torch.Tensor], file_name: str) -> tuple[Converted, list[str]]:
    """Pop the ComfyUI-generic keys of ``state_dict``; return placed parts and leftover keys."""
    return convert_with(state_dict, _place)
