"""diffusers / PEFT / SimpleTrainer / ai-toolkit: ``transformer.<diffusers module>.lora_A.weight``.

``to_q/k/v`` are thirds of ``img_attn.qkv``, ``add_q/k/v_proj`` of ``txt_attn.qkv``; single-block ``to_q/k/v`` and
``proj_mlp`` are slices of ``linear1``; ``norm_out.linear`` has diffusers' (shift, scale) order and is swapped to
Flux's (scale, shift). ai-toolkit writes no ``.alpha`` (scale 1); SimpleTuner may write one per module.
Prefixes ``transformer.``, ``base_model.model.`` or none; ``text_encoder.`` = CLIP-L, ``text_encoder_2.`` = T5.
``lora_B.bias`` keys become bias deltas.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from .names import Placement, diffusers_placement, flux_placement, text_encoder_placement
from .parts import Converted, convert_with

logger = logging.getLogger(__name__)

NAME = "diffusers"
UNET_PREFIXES = ("transformer.", "base_model.model.", "")
TE_PREFIXES = {"text_encoder.": "clip_l", "text_encoder_2.": "t5xxl"}
_BARE_STARTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                "time_text_embed.", "norm_out.")


def detect(keys: Iterable[str]) -> bool:
    """Any key with a diffusers prefix or a bare diffusers Flux module name."""
    return any(k.startswith(("transformer.", "base_model.model.", *TE_PREFIXES, *_BARE_STARTS)) for k in keys)


def _place(prefix: str) -> list[Placement] | None:
    for te_prefix, encoder in TE_PREFIXES.items():
        if prefix.startswith(te_prefix):
            placement = text_encoder_placement(prefix[len(te_prefix):])
            return [placement] if placement and placement.name.startswith(encoder + ":") else None
    for unet_prefix in UNET_PREFIXES:
        if prefix.startswith(unet_prefix):
            name = prefix[len(unet_prefix):]
            placement = diffusers_placement(name) or (flux_placement(name) if unet_prefix else None)
            if placement is not None:
                return [placement]
    return None


def convert(state_dict: dict[str, torch.Tensor], file_name: str) -> tuple[Converted, list[str]]:
    """Pop the diffusers/PEFT keys of ``state_dict``; return placed parts and leftover keys."""
    return convert_with(state_dict, _place)
