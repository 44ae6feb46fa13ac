"""XLabs (x-flux): ``double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`` (1 = image, 2 = text),
``single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight``; optional ``diffusion_model.`` prefix.

x-flux's LoRALinearLayer scales by ``network_alpha / rank`` only when an alpha is given, and files carry none,
so the scale is 1 (diffusers' ``_convert_xlabs_flux_lora_to_diffusers`` also applies no alpha). ``qkv_lora1``
covers the whole fused ``img_attn.qkv``; a single block's ``qkv_lora`` covers the first ``3H`` rows of
``linear1`` (the attention part) and ``proj_lora`` targets ``linear2``.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch

from .names import Placement
from .parts import Converted, convert_with

logger = logging.getLogger(__name__)

NAME = "xlabs"
_DOUBLE = re.compile(r"^(?:diffusion_model\.)?double_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12])$")
# "qkv_lora.down.weight" splits as prefix "...processor.qkv" + spelling "_lora.down.weight".
_SINGLE = re.compile(r"^(?:diffusion_model\.)?single_blocks\.(\d+)\.processor\.(qkv|proj)(?:_lora)?$")


def detect(keys: Iterable[str]) -> bool:
    """Any ``.processor.qkv_lora`` / ``.processor.proj_lora`` key."""
    return any(".processor.qkv_lora" in k or ".processor.proj_lora" in k for k in keys)


def _place(prefix: str) -> list[Placement] | None:
    m = _DOUBLE.match(prefix)
    if m:
        block, kind, stream = m.groups()
        part = "img" if stream == "1" else "txt"
        return [Placement(f"double_blocks.{block}.{part}_attn.{kind}")]
    m = _SINGLE.match(prefix)
    if m:
        block, kind = m.groups()
        if kind == "qkv":
            return [Placement(f"single_blocks.{block}.linear1", slot="lqkv")]
        return [Placement(f"single_blocks.{block}.linear2")]
    return None


def convert(state_dict: dict[str, torch.Tensor], file_name: str) -> tuple[Converted, list[str]]:
    """Pop the XLabs keys of ``state_dict``; return placed parts and leftover keys."""
    return convert_with(state_dict, _place)
