"""OneTrainer (and ai-toolkit LoKr): ``lora_transformer_<underscored diffusers module>`` keys.

``lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight`` -> slice of ``linear1``.
Text encoders: ``lora_te1_`` = CLIP-L, ``lora_te2_`` = T5-XXL (resolved by module path, see kohya).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from .kohya import place_text_encoder
from .names import Placement, diffusers_placement, flux_placement
from .parts import Converted, convert_with

logger = logging.getLogger(__name__)

NAME = "onetrainer"
PREFIX = "lora_transformer_"


def detect(keys: Iterable[str]) -> bool:
    """Any ``lora_transformer_`` key."""
    return any(k.startswith(PREFIX) for k in keys)


def _place(prefix: str) -> list[Placement] | None:
    if prefix.startswith(PREFIX):
        name = prefix[len(PREFIX):]
        placement = diffusers_placement(name, underscored=True) or flux_placement(name, underscored=True)
        return [placement] if placement else None
    return place_text_encoder(prefix, clip_numbers=("", "1"))


def convert(state_dict: dict[str, torch.Tensor], file_name: str) -> tuple[Converted, list[str]]:
    """Pop the OneTrainer keys of ``state_dict``; return placed parts and leftover keys."""
    return convert_with(state_dict, _place)
