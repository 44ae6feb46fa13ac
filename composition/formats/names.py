"""Canonical module names (ComfyUI Flux paths, text-encoder paths) and resolvers from other spellings.

A template is a dotted module path with ``{i}`` for a block index. Each template gives two regexes: the
dotted form and kohya's underscored form (``double_blocks_0_img_attn_qkv``), so underscore names are
resolved against known modules instead of guessed. Verified against comfy/ldm/flux/model.py and layers.py
(0.3.75): SelfAttention.qkv/proj + QKNorm(query_norm/key_norm with ``.scale``), Modulation.lin,
MLPEmbedder.in_layer/out_layer, LastLayer.linear/adaLN_modulation.1, SingleStreamBlock.linear1/linear2.
Parameter names are the checkpoint's (``.scale``); ComfyUI 0.33 loads the QK-norm gain as ``.weight``, and the
bridge asks the loaded model's config for its name (``comfy_bridge/flux_model.model_key``).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from ..adapters.common import SCALE, WEIGHT

logger = logging.getLogger(__name__)

FLUX_TEMPLATES: tuple[str, ...] = tuple(
    [f"double_blocks.{{i}}.{s}_{m}" for s in ("img", "txt") for m in (
        "attn.qkv", "attn.proj", "mlp.0", "mlp.2", "mod.lin", "attn.norm.query_norm", "attn.norm.key_norm")]
    + [f"single_blocks.{{i}}.{m}" for m in ("linear1", "linear2", "modulation.lin", "norm.query_norm",
                                            "norm.key_norm")]
    + ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
       "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"])

# Every weight of ComfyUI's CLIP-L and T5-XXL (comfy/clip_model.py, comfy/text_encoders/t5.py): ComfyUI core maps
# each ``text_encoders.<encoder>.transformer.<path>`` to its weight, so ComfyUI's LoraSave writes LoRAs on the
# embeddings / text projection and ``.diff`` on the 1-D norm gains (``layer_norm1.diff``) too.
CLIP_L_TEMPLATES: tuple[str, ...] = tuple(
    [f"text_model.encoder.layers.{{i}}.{m}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2",
        "layer_norm1", "layer_norm2")]
    + ["text_model.final_layer_norm", "text_model.embeddings.token_embedding",
       "text_model.embeddings.position_embedding", "text_projection"])

T5_TEMPLATES: tuple[str, ...] = tuple(
    [f"encoder.block.{{i}}.layer.0.SelfAttention.{m}" for m in ("q", "k", "v", "o", "relative_attention_bias")]
    + [f"encoder.block.{{i}}.layer.1.DenseReluDense.{m}" for m in ("wi_0", "wi_1", "wo", "wi")]
    + [f"encoder.block.{{i}}.layer.{n}.layer_norm" for n in (0, 1)] + ["encoder.final_layer_norm", "shared"])

NORM_SUFFIXES = ("query_norm", "key_norm")


@dataclass(frozen=True)
class Placement:
    """Where one source module lands: canonical ``name`` and, for fused targets, the ``slot`` it fills.

    Slots: ``q``/``k``/``v`` thirds of a fused qkv ``[3H, H]``; ``lq``/``lk``/``lv``/``lmlp``/``lqkv`` parts of a
    single block's ``linear1 [3H + M, H]``. ``swap_halves``: diffusers' ``norm_out`` (shift, scale) order.
    """

    name: str
    slot: str | None = None
    swap_halves: bool = False
    parameter: str = WEIGHT


class TemplateResolver:
    """Resolve dotted or underscored spellings of a set of templates to their dotted canonical form."""

    def __init__(self, templates: tuple[str, ...]) -> None:
        self._dotted: list[tuple[re.Pattern[str], str]] = []
        self._underscored: list[tuple[re.Pattern[str], str]] = []
        for t in templates:
            dotted = re.escape(t).replace(r"\{i\}", r"(\d+)")
            under = re.escape(t.replace(".", "_")).replace(r"\{i\}", r"(\d+)")
            self._dotted.append((re.compile(f"^{dotted}$"), t))
            self._underscored.append((re.compile(f"^{under}$"), t))

    @staticmethod
    def _match(table: list[tuple[re.Pattern[str], str]], name: str) -> tuple[str, str | None] | None:
        for pattern, template in table:
            m = pattern.match(name)
            if m:
                return template, (m.group(1) if m.groups() else None)
        return None

    def template(self, name: str, underscored: bool = False) -> tuple[str, str | None] | None:
        """``(template, block index or None)`` matched by ``name``, else None."""
        return self._match(self._underscored if underscored else self._dotted, name)

    def resolve(self, name: str, underscored: bool = False) -> str | None:
        """Canonical dotted name for ``name`` (dotted or underscored spelling), else None."""
        hit = self.template(name, underscored)
        if hit is None:
            return None
        template, index = hit
        return template if index is None else template.replace("{i}", index)

    def dotted(self, name: str) -> str | None:
        """Canonical name when ``name`` is a dotted template instance, else None."""
        return self.resolve(name)

    def underscored(self, name: str) -> str | None:
        """Canonical dotted name for an underscored spelling, else None."""
        return self.resolve(name, underscored=True)


FLUX = TemplateResolver(FLUX_TEMPLATES)
CLIP_L = TemplateResolver(CLIP_L_TEMPLATES)
T5 = TemplateResolver(T5_TEMPLATES)


def flux_placement(name: str, underscored: bool = False) -> Placement | None:
    """Placement for a ComfyUI-named Flux module (dotted or underscored); norms target their ``scale``."""
    canonical = FLUX.underscored(name) if underscored else FLUX.dotted(name)
    if canonical is None:
        return None
    parameter = SCALE if canonical.endswith(NORM_SUFFIXES) else WEIGHT
    return Placement(canonical, parameter=parameter)


def text_encoder_placement(name: str, underscored: bool = False) -> Placement | None:
    """``clip_l:<path>`` / ``t5xxl:<path>`` when ``name`` is a CLIP-L or T5 module path, else None."""
    for resolver, encoder in ((CLIP_L, "clip_l"), (T5, "t5xxl")):
        canonical = resolver.underscored(name) if underscored else resolver.dotted(name)
        if canonical is not None:
            return Placement(f"{encoder}:{canonical}")
    return None


# diffusers FluxTransformer2DModel -> ComfyUI Flux (comfy/utils.py flux_to_diffusers has the same table).
_DIFFUSERS_DOUBLE: dict[str, tuple[str, str | None]] = {
    "attn.to_q": ("img_attn.qkv", "q"), "attn.to_k": ("img_attn.qkv", "k"), "attn.to_v": ("img_attn.qkv", "v"),
    "attn.to_qkv": ("img_attn.qkv", None),
    "attn.add_q_proj": ("txt_attn.qkv", "q"), "attn.add_k_proj": ("txt_attn.qkv", "k"),
    "attn.add_v_proj": ("txt_attn.qkv", "v"), "attn.to_added_qkv": ("txt_attn.qkv", None),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
    "attn.norm_q": ("img_attn.norm.query_norm", None), "attn.norm_k": ("img_attn.norm.key_norm", None),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", None), "attn.norm_added_k": ("txt_attn.norm.key_norm", None),
}
_DIFFUSERS_SINGLE: dict[str, tuple[str, str | None]] = {
    "attn.to_q": ("linear1", "lq"), "attn.to_k": ("linear1", "lk"), "attn.to_v": ("linear1", "lv"),
    "proj_mlp": ("linear1", "lmlp"), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
    "attn.to_qkv": ("linear1", "lqkv"),
    "attn.norm_q": ("norm.query_norm", None), "attn.norm_k": ("norm.key_norm", None),
}
_DIFFUSERS_TOP: dict[str, tuple[str, str | None]] = {
    "x_embedder": ("img_in", None), "context_embedder": ("txt_in", None), "proj_out": ("final_layer.linear", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", "swap"),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", None),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
}
_DIFFUSERS_TABLE: dict[str, tuple[str, str | None]] = {
    **{f"transformer_blocks.{{i}}.{k}": (f"double_blocks.{{i}}.{v}", s) for k, (v, s) in _DIFFUSERS_DOUBLE.items()},
    **{f"single_transformer_blocks.{{i}}.{k}": (f"single_blocks.{{i}}.{v}", s)
       for k, (v, s) in _DIFFUSERS_SINGLE.items()},
    **_DIFFUSERS_TOP,
}
DIFFUSERS = TemplateResolver(tuple(_DIFFUSERS_TABLE))


def diffusers_placement(name: str, underscored: bool = False) -> Placement | None:
    """Placement for a diffusers Flux module path (``transformer_blocks.3.attn.to_q``), else None."""
    hit = DIFFUSERS.template(name, underscored)
    if hit is None:
        return None
    template, index = hit
    target, slot = _DIFFUSERS_TABLE[template]
    if index is not None:
        target = target.replace("{i}", index)
    parameter = SCALE if target.endswith(NORM_SUFFIXES) else WEIGHT
    if slot == "swap":
        return Placement(target, swap_halves=True, parameter=parameter)
    return Placement(target, slot=slot, parameter=parameter)
