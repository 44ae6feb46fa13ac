"""Recognise LoRAs made for other models by characteristic key patterns, and the errors we raise.

Each rule is a marker that no Flux format uses (checked against every converter's spellings), so a Flux
file never matches. ``identify_foreign_model`` names the model; ``foreign_model_evidence`` adds the key.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

logger = logging.getLogger(__name__)

FOREIGN_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("Flux.2", re.compile(r"double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj")),
    ("Chroma", re.compile(r"distilled_guidance_layer")),
    ("SD3", re.compile(r"joint_blocks")),
    ("SDXL", re.compile(r"^lora_unet_(input_blocks|output_blocks|middle_block)_|^lora_te2_text_model_|"
                        r"^text_encoder_2\.text_model\.|(^|[._])add_embedding[._]|(^|[._])label_emb[._]")),
    ("SD1.5/SD2", re.compile(r"^lora_unet_(down_blocks|up_blocks|mid_block)_|"
                             r"^(unet\.)?(down_blocks|up_blocks|mid_block)\.")),
    ("HiDream", re.compile(r"double_stream_blocks|single_stream_blocks")),
    ("Wan", re.compile(r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn|ffn)[._]")),
    ("HunyuanVideo", re.compile(r"\.(img|txt)_attn_qkv\.|individual_token_refiner|\.(img|txt)_mod\.linear\.|"
                                r"\.(img|txt)_mlp\.fc[12]\.")),
    ("Qwen-Image", re.compile(r"transformer_blocks\.\d+\.(img_mod\.1|txt_mod\.1|img_mlp\.net|txt_mlp\.net)\.")),
    ("Lumina 2 / Z-Image", re.compile(r"(^|\.)(noise_refiner|context_refiner)\.|layers\.\d+\.attention\.(qkv|to_q)")),
    ("a DiT with attn1/attn2 (PixArt, LTX-Video, CogVideoX)", re.compile(r"transformer_blocks[._]\d+[._]attn[12][._]")),
)


class NotFluxLoRAError(ValueError):
    """The file is a LoRA for another model (or has no Flux keys at all)."""


def foreign_model_evidence(keys: Iterable[str]) -> tuple[str, str] | None:
    """``(model name, first key showing it)`` for the first rule any key matches, else None."""
    keys = list(keys)
    for model, pattern in FOREIGN_RULES:
        for key in keys:
            if pattern.search(key):
                return model, key
    return None


def identify_foreign_model(keys: Iterable[str]) -> str | None:
    """Name of the non-Flux model a LoRA's keys belong to (``"SDXL"``, ``"Wan"``...), or None."""
    hit = foreign_model_evidence(keys)
    return None if hit is None else hit[0]


def foreign_model_error(file_name: str, keys: Iterable[str]) -> NotFluxLoRAError | None:
    """The error to raise for a foreign LoRA (``X.safetensors is a LoRA for SDXL, not Flux (key ...)``)."""
    hit = foreign_model_evidence(keys)
    if hit is None:
        return None
    model, key = hit
    return NotFluxLoRAError(f"{file_name} is a LoRA for {model}, not Flux (key {key})")


def no_flux_keys_error(file_name: str, keys: Iterable[str]) -> NotFluxLoRAError:
    """The error for a file in which no converter found a Flux module."""
    sample = sorted(keys)[:3]
    return NotFluxLoRAError(f"{file_name} has no Flux keys at all (first keys: {', '.join(sample) or 'none'})")
