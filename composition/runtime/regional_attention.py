"""The joint-attention rules of regional composition: the regional controller's ``attend``.

ComfyUI's ``wrap_attn`` calls ``override(func, q, k, v, heads, skip_reshape=True, mask=..., transformer_options=...,
_inside_attn_wrapper=True)`` for every attention of the Flux blocks; q, k, v are ``[B, H, L, D]`` with RoPE
applied and the answer is ``[B, L, H·D]``. ``transformer_options`` carries ``block_type``/``block_index``.

Every plain attention call goes *downstream* (the runtime's chain: another controller's attention, the override
installed before the runtime, else ``func``). The grouped fast path calls downstream once per block of query tokens
that share one allowed key set (no mask, so flash/memory-efficient kernels stay usable; no L×L tensor) — or, when
downstream is ComfyUI's own function and the kernel takes the inputs (``attention_triton_eligible``), once into the
Triton kernel ``attention_grouped_fast`` (rules read from labels, no L×L tensor either). The dense path (option
``attention_path="dense"``, or when ComfyUI itself passes a mask) calls downstream once with one broadcast
``[1, 1, L, L]`` mask (cached per rules and length; passed additive, 0 / -inf, as every backend adds float masks).
Base-ratio blending runs a second, base-rule attention and mixes ``(1-β)·regional + β·base``. Batch entries that
are not the composed prompt run plain attention. A probe (latent re-initialisation, refinement) set on the
controller sees q and k of every block first.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from ...bounded_cache import BoundedCache
from ...kernels.joint_attention import dense_mask, grouped_layout
from ...kernels.joint_attention_triton import attention_grouped_fast, attention_triton_eligible
from ..regional import ActiveRules, active_rules, allowed_groups, base_allowed, blend_base
from .core import Downstream

logger = logging.getLogger(__name__)


class RegionalAttention:
    """Mixed into the regional controller (which has ``plan``, ``options`` and ``probe``): its attention for one
    pass, from the pass's :class:`~.regional.RegionalState` (layout and percent)."""

    _allowed: BoundedCache[ActiveRules, tuple[torch.Tensor, torch.Tensor]]
    _masks: BoundedCache[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]]

    def _additive(self, rules: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The cached bool ``[1, 1, L, L]`` rules as an additive mask (0 / -inf) in ``dtype``: every ComfyUI
        attention backend (pytorch, split, sub-quadratic) adds float masks, while some misread bool ones."""
        key = (id(rules), dtype)
        cached = self._masks.get(key)
        if cached is None or cached[0] is not rules:
            additive = torch.zeros(rules.shape, dtype=dtype, device=rules.device).masked_fill_(~rules, float("-inf"))
            cached = self._masks.put(key, (rules, additive))
        return cached[1]

    def _rules(self, rules: ActiveRules) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._allowed.get(rules)
        if cached is None:
            plan = self.plan
            regional = allowed_groups(plan, rules)
            cached = self._allowed.put(rules, (regional, base_allowed(plan, regional)))
        return cached

    def attend(self, state: Any, downstream: Downstream, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               heads: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        options = kwargs.get("transformer_options") or {}
        block_type = options.get("block_type")
        if args or not kwargs.get("skip_reshape") or q.ndim != 4 or block_type not in ("double", "single"):
            return downstream.call(q, k, v, heads, *args, **kwargs)
        layout = state.layout
        if q.shape[2] != layout.text_length + layout.image_tokens:
            return downstream.call(q, k, v, heads, **kwargs)
        block_index = int(options.get("block_index", 0))
        if self.probe is not None:
            self.probe.observe(q, k, layout, block_type, block_index)
        rules = active_rules(self.plan, block_type, block_index, state.percent)
        if not rules.any:
            return downstream.call(q, k, v, heads, **kwargs)
        regional, base = self._rules(rules)
        beta = self.options.base_ratio if rules.base_blend else 0.0
        if len(layout.chunks) == 1:
            return self._chunk(downstream, q, k, v, heads, kwargs, layout.chunks[0][1], regional, base, beta)
        out = None
        for index, labels in layout.chunks:
            sub = {**kwargs, "mask": _batch_rows(kwargs.get("mask"), index, q.shape[0])}
            part = self._chunk(downstream, q.index_select(0, index), k.index_select(0, index),
                               v.index_select(0, index), heads, sub, labels, regional, base, beta)
            if out is None:
                out = part.new_empty(q.shape[0], *part.shape[1:])
            out.index_copy_(0, index, part)
        return out

    def _chunk(self, downstream: Downstream, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
               kwargs: dict, labels: torch.Tensor | None, regional: torch.Tensor, base: torch.Tensor,
               beta: float) -> torch.Tensor:
        """Attention of batch entries sharing ``labels`` (None = plain) -> ``[b, L, H·D]``."""
        if labels is None:
            return downstream.call(q, k, v, heads, **kwargs)
        out = self._with_rules(downstream, q, k, v, heads, kwargs, labels, regional)
        if beta > 0.0:
            out = blend_base(out, self._with_rules(downstream, q, k, v, heads, kwargs, labels, base), beta)
        return out

    @staticmethod
    def _triton(downstream: Downstream, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict) -> bool:
        """The grouped path may run the Triton kernel: nothing to chain to (a previous override keeps its path),
        ``[B, L, H·D]`` wanted back, and the kernel takes these inputs
        (:func:`lora_loom.kernels.joint_attention_triton.attention_triton_eligible`)."""
        return downstream.direct and not kwargs.get("skip_output_reshape") and attention_triton_eligible(q, k, v)

    def _with_rules(self, downstream: Downstream, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    kwargs: dict, labels: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        mask = kwargs.get("mask")
        if mask is not None or self.options.attention_path == "dense":
            rules = self._additive(dense_mask(labels, allowed, q.device), q.dtype)
            return downstream.call(q, k, v, heads, **{**kwargs, "mask": _combine(mask, rules)})
        layout = grouped_layout(labels, allowed, q.device)
        if len(layout.blocks) == 1 and layout.blocks[0].key_index is None:
            return downstream.call(q, k, v, heads, **kwargs)
        if self._triton(downstream, q, k, v, kwargs):
            return attention_grouped_fast(q, k, v, labels, allowed, layout)
        out = None
        for block in layout.blocks:
            qb = q.index_select(2, block.query_index)
            kb = k if block.key_index is None else k.index_select(2, block.key_index)
            vb = v if block.key_index is None else v.index_select(2, block.key_index)
            ob = downstream.call(qb, kb, vb, heads, **kwargs)  # [b, Lq, H·D]
            if out is None:
                out = ob.new_empty(q.shape[0], q.shape[2], ob.shape[-1])
            out.index_copy_(1, block.query_index, ob)
        return out


def _batch_rows(mask: torch.Tensor | None, index: torch.Tensor, batch: int) -> torch.Tensor | None:
    """The rows of a ComfyUI attention mask for the batch entries ``index`` (masks of batch 1 broadcast)."""
    if mask is None or mask.ndim < 3 or mask.shape[0] != batch or batch == 1:
        return mask
    return mask.index_select(0, index.to(mask.device))


def _combine(mask: torch.Tensor | None, rules: torch.Tensor) -> torch.Tensor:
    """ComfyUI's mask (bool, or additive float; ``[L, L]``, ``[B, L, L]`` or ``[B, 1, L, L]``) combined with the
    additive rules ``[1, 1, L, L]`` (0 / -inf) into one additive mask."""
    if mask is None:
        return rules
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=rules.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(rules.dtype) + rules
