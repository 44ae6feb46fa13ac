"""DiffSynth-Studio bare names (``blocks.N.attn.a_to_qkv.lora_A.default.weight``), as in its FluxLoRALoader.

DiffSynth's Flux DiT: ``a`` = image stream, ``b`` = text stream. Double block ``blocks.N``: ``norm1_a.linear`` =
``img_mod.lin``, ``norm1_b.linear`` = ``txt_mod.lin``, ``attn.a_to_qkv`` / ``attn.b_to_qkv`` = fused qkv (or
``a_to_q/k/v`` slices), ``attn.a_to_out`` / ``attn.b_to_out`` = ``img/txt_attn.proj``, ``ff_a.0/2`` / ``ff_b.0/2``
= ``img/txt_mlp.0/2``. Single block ``single_blocks.N``: ``to_qkv_mlp`` = ``linear1`` (or ``a_to_q/k/v`` +
``proj_in_besides_attn`` slices), ``proj_out`` = ``linear2``, ``norm.linear`` = ``modulation.lin``.
Top level (taken from DiffSynth's naming, not verified against a real file): ``x_embedder`` = ``img_in``,
``context_embedder`` = ``txt_in``, ``final_proj_out`` = ``final_layer.linear``; anything else stays a leftover.
DiffSynth folds alpha into the weights (no ``.alpha``): scale 1.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch

from .names import Placement
from .parts import Converted, convert_with

logger = logging.getLogger(__name__)

NAME = "diffsynth"
_DOUBLE = {
    "norm1_a.linear": ("img_mod.lin", None), "norm1_b.linear": ("txt_mod.lin", None),
    "attn.a_to_qkv": ("img_attn.qkv", None), "attn.b_to_qkv": ("txt_attn.qkv", None),
    **{f"attn.a_to_{s}": ("img_attn.qkv", s) for s in "qkv"}, **{f"attn.b_to_{s}": ("txt_attn.qkv", s) for s in "qkv"},
    "attn.a_to_out": ("img_attn.proj", None), "attn.b_to_out": ("txt_attn.proj", None),
    "ff_a.0": ("img_mlp.0", None), "ff_a.2": ("img_mlp.2", None), "ff_b.0": ("txt_mlp.0", None),
    "ff_b.2": ("txt_mlp.2", None),
}
_SINGLE = {
    "to_qkv_mlp": ("linear1", None), **{f"a_to_{s}": ("linear1", f"l{s}") for s in "qkv"},
    "proj_in_besides_attn": ("linear1", "lmlp"), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
}
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "final_proj_out": "final_layer.linear"}
_BLOCK = re.compile(r"^(blocks|single_blocks)\.(\d+)\.(.+)$")
_SIGNATURE = re.compile(r"^(blocks\.\d+\.|single_blocks\.\d+\.(to_qkv_mlp|proj_out|a_to_[qkv]|"
                        r"proj_in_besides_attn|norm\.linear)\.)")


def detect(keys: Iterable[str]) -> bool:
    """Any ``blocks.N.`` key or a single block with a DiffSynth-only module name."""
    return any(_SIGNATURE.match(k) for k in keys)


def _place(prefix: str) -> list[Placement] | None:
    m = _BLOCK.match(prefix)
    if m:
        group, index, module = m.groups()
        table, target = (_DOUBLE, "double_blocks") if group == "blocks" else (_SINGLE, "single_blocks")
        if module not in table:
            return None
        name, slot = table[module]
        return [Placement(f"{target}.{index}.{name}", slot=slot)]
    return [Placement(_TOP[prefix])] if prefix in _TOP else None


def convert(state_dict: dict[str, torch.Tensor], file_name: str) -> tuple[Converted, list[str]]:
    """Pop the DiffSynth keys of ``state_dict``; return placed parts and leftover keys."""
    return convert_with(state_dict, _place)
