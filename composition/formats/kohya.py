"""kohya / sd-scripts: ``lora_unet_<underscored module>.lora_down.weight`` (+ ``.lora_up``, ``.alpha``).

The module is a ComfyUI Flux name with ``.`` -> ``_`` (``lora_unet_double_blocks_0_img_attn_qkv``,
``lora_unet_single_blocks_7_linear1``), or, from some trainers, an underscored diffusers name
(``lora_unet_transformer_blocks_0_attn_to_q`` -> a slice of ``img_attn.qkv``). sd-scripts' ``--split_qkv``
files are saved re-fused (block-diagonal up), so they read as plain qkv LoRAs. A trailing underscore on the
module (``lora_unet_single_transformer_blocks_0_attn_to_k_``, ``lora_unet_proj_out_``: diffusers names flattened
by kohya's library with the trailing dot of the module prefix kept, sd-scripts #1463, ComfyUI #4347) is dropped.
Text encoders:
``lora_te1_`` / ``lora_te_`` = CLIP-L, ``lora_te3_`` = T5-XXL (any ``lora_teN_`` with a T5 module path is T5);
a CLIP path under ``lora_te2_`` is SDXL's CLIP-G and stays a leftover.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch

from .names import Placement, diffusers_placement, flux_placement, text_encoder_placement
from .parts import Converted, convert_with

logger = logging.getLogger(__name__)

NAME = "kohya"
_TE = re.compile(r"^lora_te(\d*)_(.+)$")


def detect(keys: Iterable[str]) -> bool:
    """Any ``lora_unet_`` or ``lora_te*_`` key."""
    return any(k.startswith(("lora_unet_", "lora_te")) for k in keys)


def place_text_encoder(prefix: str, clip_numbers: tuple[str, ...]) -> list[Placement] | None:
    """``lora_teN_<path>``: a T5 path under any N, a CLIP path only under the numbers given."""
    m = _TE.match(prefix)
    if m is None:
        return None
    placement = text_encoder_placement(m.group(2).removesuffix("_"), underscored=True)
    if placement is None or (placement.name.startswith("clip_l:") and m.group(1) not in clip_numbers):
        return None
    return [placement]


def _place(prefix: str) -> list[Placement] | None:
    if prefix.startswith("lora_unet_"):
        name = prefix[len("lora_unet_"):].removesuffix("_")
        placement = flux_placement(name, underscored=True) or diffusers_placement(name, underscored=True)
        return [placement] if placement else None
    return place_text_encoder(prefix, clip_numbers=("", "1"))


def convert(state_dict: dict[str, torch.Tensor], file_name: str) -> tuple[Converted, list[str]]:
    """Pop the kohya keys of ``state_dict``; return placed parts and leftover keys."""
    return convert_with(state_dict, _place)
