"""Region-blocked joint attention for Flux, in the layout ComfyUI's attention override receives.

ComfyUI calls ``transformer_options["optimized_attention_override"](func, q, k, v, heads, mask=..., skip_reshape=True,
transformer_options=..., ...)`` from Flux with q, k, v ``[B, H, L, D]`` (RoPE already applied) and expects
``[B, L, H·D]`` back (what ``optimized_attention`` returns with ``skip_reshape=True``).

Rules come as ``labels [L]`` (int64 group per token) and ``allowed [G, G]`` (bool, query group x key group),
built by :mod:`lora_loom.composition.regional`. Both paths first *resolve* the rules: keys of groups with no
token are dropped, and a query group left with no allowed key attends to its own tokens (so no row is empty).

* :func:`attention_dense` — reference: SDPA with one broadcast bool mask ``[1, 1, L, L]`` from :func:`dense_mask`
  (built once per (rules fingerprint, L, device) and cached).
* :func:`attention_grouped` — fast path: query tokens with the same allowed key set form a block; each block
  gathers only its keys and calls SDPA *without* a mask (flash/memory-efficient kernels stay usable); outputs are
  scattered back. No L x L tensor is ever built.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..bounded_cache import BoundedCache, tensor_bytes

logger = logging.getLogger(__name__)

CACHE_ENTRIES = 8
CACHE_BYTES = 512 << 20


class AttentionRulesError(ValueError):
    """labels / allowed / q, k, v do not fit together; the message names the argument."""


def _check_rules(labels: torch.Tensor, allowed: torch.Tensor) -> None:
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise AttentionRulesError(f"labels: expected int64 [L], got {labels.dtype} {tuple(labels.shape)}")
    if allowed.ndim != 2 or allowed.shape[0] != allowed.shape[1] or allowed.dtype != torch.bool:
        raise AttentionRulesError(f"allowed: expected bool [G, G], got {allowed.dtype} {tuple(allowed.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= allowed.shape[0]):
        raise AttentionRulesError(f"labels: values must lie in [0, {allowed.shape[0]}), got "
                                  f"[{int(labels.min())}, {int(labels.max())}]")


def resolve_allowed(labels: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Effective ``[G, G]`` rules: only present key groups; a row with no key left gets its own group."""
    _check_rules(labels, allowed)
    present = torch.bincount(labels.cpu().long(), minlength=allowed.shape[0]) > 0
    effective = allowed.cpu() & present[None, :]
    empty = ~effective.any(dim=1)
    effective[empty, empty.nonzero().flatten()] = True
    return effective


def rules_fingerprint(labels: torch.Tensor, allowed: torch.Tensor) -> str:
    """A stable hash of ``(labels, allowed)``; equal rules at equal length share cached masks/layouts."""
    digest = hashlib.sha1()
    digest.update(labels.detach().cpu().long().numpy().tobytes())
    digest.update(allowed.detach().cpu().numpy().tobytes())
    digest.update(str(tuple(allowed.shape)).encode())
    return digest.hexdigest()


_DENSE_MASKS: BoundedCache[tuple[str, int, str], torch.Tensor] = BoundedCache(
    "dense joint-attention masks", max_entries=CACHE_ENTRIES, max_bytes=CACHE_BYTES, weigh=tensor_bytes)
_LAYOUTS: BoundedCache[tuple[str, int, str], GroupedLayout] = BoundedCache(
    "grouped joint-attention layouts", max_entries=CACHE_ENTRIES, max_bytes=CACHE_BYTES, weigh=tensor_bytes)
LAYOUT_CACHES: list[BoundedCache] = [_DENSE_MASKS, _LAYOUTS]  # the Triton path appends its layouts


def clear_caches() -> None:
    """Drop every cached dense mask and grouped layout, the Triton kernel's included (e.g. when a model patcher
    is discarded)."""
    for cache in LAYOUT_CACHES:
        cache.clear()


def dense_mask(labels: torch.Tensor, allowed: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool mask ``[1, 1, L, L]`` (True = may attend), broadcast over batch and heads; cached per rules and L."""
    device = torch.device(device) if device is not None else labels.device
    key = (rules_fingerprint(labels, allowed), int(labels.shape[0]), str(device))
    cached = _DENSE_MASKS.get(key)
    if cached is not None:
        return cached  # type: ignore[return-value]
    effective = resolve_allowed(labels, allowed)
    lab = labels.cpu().long()
    mask = effective[lab[:, None], lab[None, :]][None, None].to(device)
    logger.debug("built dense joint-attention mask L=%d (%.1f MB)", lab.shape[0], mask.numel() / 2**20)
    _DENSE_MASKS.put(key, mask)
    return mask


@dataclass(frozen=True)
class QueryBlock:
    """Query tokens sharing one allowed key set: ``query_index [Lq]``, ``key_index [Lk]`` (None = all keys)."""

    query_index: torch.Tensor
    key_index: torch.Tensor | None


@dataclass(frozen=True)
class GroupedLayout:
    """The blocks of :func:`attention_grouped` for one rules fingerprint and length, on one device."""

    length: int
    blocks: tuple[QueryBlock, ...]
    fingerprint: str


def grouped_layout(labels: torch.Tensor, allowed: torch.Tensor,
                   device: torch.device | str | None = None) -> GroupedLayout:
    """Blocks of query tokens with identical effective key sets (cached per rules, L and device)."""
    device = torch.device(device) if device is not None else labels.device
    fingerprint = rules_fingerprint(labels, allowed)
    key = (fingerprint, int(labels.shape[0]), str(device))
    cached = _LAYOUTS.get(key)
    if cached is not None:
        return cached  # type: ignore[return-value]
    effective = resolve_allowed(labels, allowed)
    lab = labels.cpu().long()
    present = torch.unique(lab).tolist()
    rows: dict[tuple[bool, ...], list[int]] = {}
    for group in present:
        rows.setdefault(tuple(effective[group].tolist()), []).append(group)
    blocks = []
    for row, groups in rows.items():
        query_index = torch.isin(lab, torch.tensor(groups)).nonzero().flatten()
        key_mask = torch.tensor(row)[lab]
        key_index = None if bool(key_mask.all()) else key_mask.nonzero().flatten().to(device)
        blocks.append(QueryBlock(query_index=query_index.to(device), key_index=key_index))
    layout = GroupedLayout(length=int(lab.shape[0]), blocks=tuple(blocks), fingerprint=fingerprint)
    _LAYOUTS.put(key, layout)
    return layout


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int | None) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise AttentionRulesError(f"q, k, v: expected [B, H, L, D] of one shape, got {tuple(q.shape)}, "
                                  f"{tuple(k.shape)}, {tuple(v.shape)}")
    if length is not None and q.shape[2] != length:
        raise AttentionRulesError(f"labels: length {length} does not match the sequence length {q.shape[2]}")


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B, L, H·D]``."""
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d)


def attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Reference: SDPA over ``[B, H, L, D]`` with a bool or additive mask broadcastable to ``[B, H, L, L]``.

    Returns ``[B, L, H·D]``.
    """
    _check_qkv(q, k, v, None)
    return _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def attention_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, labels: torch.Tensor,
                      allowed: torch.Tensor, layout: GroupedLayout | None = None) -> torch.Tensor:
    """Rules-respecting attention without any mask: q, k, v ``[B, H, L, D]`` -> ``[B, L, H·D]``.

    Equals ``attention_dense(q, k, v, dense_mask(labels, allowed))``. Pass a precomputed ``layout``
    (from :func:`grouped_layout`) to skip the fingerprint hash on the hot path.
    """
    _check_qkv(q, k, v, labels.shape[0])
    layout = layout if layout is not None else grouped_layout(labels, allowed, q.device)
    if len(layout.blocks) == 1 and layout.blocks[0].key_index is None:
        return _merge_heads(F.scaled_dot_product_attention(q, k, v))
    b, h, length, _ = q.shape
    out = q.new_empty(b, length, h, v.shape[-1])
    for block in layout.blocks:
        qb = q.index_select(2, block.query_index)
        kb = k if block.key_index is None else k.index_select(2, block.key_index)
        vb = v if block.key_index is None else v.index_select(2, block.key_index)
        ob = F.scaled_dot_product_attention(qb, kb, vb)
        out.index_copy_(1, block.query_index, ob.transpose(1, 2))
    return out.reshape(b, length, h * v.shape[-1])


def attention_with_rules(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, labels: torch.Tensor,
                         allowed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """What an override calls: grouped path when ComfyUI passes no mask, else the dense path with the rules
    combined with ``mask`` (bool: AND; additive float: -inf where the rules forbid). ``[B, H, L, D] -> [B, L, H·D]``.
    """
    if mask is None:
        return attention_grouped(q, k, v, labels, allowed)
    rules = dense_mask(labels, allowed, q.device)
    if mask.ndim == 2:
        mask = mask[None, None]  # [L, L] -> [1, 1, L, L]
    elif mask.ndim == 3:
        mask = mask[:, None]  # [B, L, L] -> [B, 1, L, L], as ComfyUI does
    if mask.dtype == torch.bool:
        combined = mask & rules
    else:
        combined = mask.to(q.dtype).masked_fill(~rules, float("-inf"))
    return attention_dense(q, k, v, combined)
