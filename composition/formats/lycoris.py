"""SimpleTuner LyCORIS: ``lycoris_<underscored diffusers module>.lokr_w1`` / ``.hada_w1_a`` / ``.lora_down.weight``.

Same module spelling as OneTrainer with the ``lycoris_`` prefix (ComfyUI maps it the same way); the adapter
kind comes from the key spelling (LoKr, LoHa, LoCon, DoRA scale, alpha).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from .names import Placement, diffusers_placement, flux_placement
from .parts import Converted, convert_with

logger = logging.getLogger(__name__)

NAME = "lycoris"
PREFIX = "lycoris_"


def detect(keys: Iterable[str]) -> bool:
    """Any ``lycoris_`` key."""
    return any(k.startswith(PREFIX) for k in keys)


def _place(prefix: str) -> list[Placement] | None:
    if not prefix.startswith(PREFIX):
        return None
    name = prefix[len(PREFIX):]
    placement = diffusers_placement(name, underscored=True) or flux_placement(name, underscored=True)
    return [placement] if placement else None


def convert(state_dict: dict[str, torch.Tensor], file_name: str) -> tuple[Converted, list[str]]:
    """Pop the ``lycoris_`` keys of ``state_dict``; return placed parts and leftover keys."""
    return convert_with(state_dict, _place)
