"""Attention-map probes for joint attention: probabilities from chosen queries to chosen keys.

The softmax runs over the FULL key set each query may see (all keys, or the keys the regional rules allow),
so the returned columns are true attention probabilities and each row of the full distribution sums to 1.
Queries are processed in chunks, so memory stays at ``B·H·chunk·L`` floats whatever the sequence length.
Everything is differentiable (CLoRA and LoRA-Composer's refinement take gradients through these maps).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .joint_attention import AttentionRulesError, resolve_allowed

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 256


@dataclass(frozen=True)
class ProbeResult:
    """probabilities ``[B, H, Lq, Lk]`` (float32) for the requested keys; row_sums ``[B, H, Lq]``: the sum over
    *all* allowed keys of each query's distribution (1 up to rounding; kept for tests and sanity checks)."""

    probabilities: torch.Tensor
    row_sums: torch.Tensor


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor,
                            scale: float | None = None, chunk: int = DEFAULT_CHUNK,
                            labels: torch.Tensor | None = None,
                            allowed: torch.Tensor | None = None) -> ProbeResult:
    """``softmax(q·kᵀ·scale)`` rows for ``query_index [Lq]``, columns ``key_index [Lk]`` only.

    q, k: ``[B, H, L, D]`` (after RoPE, as the attention override receives them). scale defaults to
    ``1/sqrt(D)`` like SDPA. With ``labels [L]`` and ``allowed [G, G]`` the softmax covers only the keys the
    rules allow (resolved exactly as :mod:`lora_loom.kernels.joint_attention` does); forbidden columns are 0.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise AttentionRulesError(f"q, k: expected [B, H, L, D] with matching B, H, D, got "
                                  f"{tuple(q.shape)}, {tuple(k.shape)}")
    if chunk <= 0:
        raise AttentionRulesError(f"chunk: must be positive, got {chunk}")
    if (labels is None) != (allowed is None):
        raise AttentionRulesError("labels/allowed: give both or neither")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    query_index = query_index.to(q.device).long()
    key_index = key_index.to(q.device).long()
    key_rules = None
    if labels is not None:
        if labels.shape[0] != k.shape[2]:
            raise AttentionRulesError(f"labels: length {labels.shape[0]} != key length {k.shape[2]}")
        effective = resolve_allowed(labels, allowed).to(q.device)
        lab = labels.to(q.device).long()
        key_rules = effective[:, lab]  # [G, L]: which keys each query group may see
    kf = k.float()
    probabilities, row_sums = [], []
    for start in range(0, query_index.shape[0], chunk):
        rows = query_index[start:start + chunk]
        logits = torch.matmul(q.index_select(2, rows).float(), kf.transpose(-1, -2)) * scale  # [B, H, c, L]
        if key_rules is not None:
            visible = key_rules.index_select(0, lab.index_select(0, rows))  # [c, L]
            logits = logits.masked_fill(~visible, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        row_sums.append(p.sum(dim=-1))
        probabilities.append(p.index_select(-1, key_index))
    b, h = q.shape[:2]
    if not probabilities:
        return ProbeResult(q.new_zeros(b, h, 0, key_index.shape[0], dtype=torch.float32),
                           q.new_zeros(b, h, 0, dtype=torch.float32))
    return ProbeResult(torch.cat(probabilities, dim=2), torch.cat(row_sums, dim=2))


def text_to_image_maps(q: torch.Tensor, k: torch.Tensor, text_index: torch.Tensor, image_index: torch.Tensor,
                       grid_h: int, grid_w: int, scale: float | None = None, chunk: int = DEFAULT_CHUNK,
                       labels: torch.Tensor | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Per text token, how much each image token attends to it, averaged over heads.

    image_index: ``[grid_h·grid_w]`` positions of the image tokens in raster order; text_index: ``[T]``.
    Returns ``[B, T, grid_h, grid_w]`` float32 (the "cross-attention map" of each token on Flux).
    """
    if image_index.shape[0] != grid_h * grid_w:
        raise AttentionRulesError(f"image_index: {image_index.shape[0]} tokens do not fill a "
                                  f"{grid_h}x{grid_w} grid")
    probe = attention_probabilities(q, k, image_index, text_index, scale=scale, chunk=chunk,
                                    labels=labels, allowed=allowed)
    maps = probe.probabilities.mean(dim=1)  # [B, L_img, T]
    return maps.transpose(1, 2).reshape(maps.shape[0], text_index.shape[0], grid_h, grid_w)
