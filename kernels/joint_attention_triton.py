"""Region-grouped joint attention as one Triton flash-attention kernel: rules read from labels, no L×L tensor.

Same contract as :func:`.joint_attention.attention_grouped` (q, k, v ``[B, H, L, D]``, ``labels [L]``,
``allowed [G, G]`` -> ``[B, L, H·D]``, rules resolved the same way by :func:`.joint_attention.resolve_allowed`).

Tokens are first sorted by group (a stable permutation of the sequence), so every region is contiguous. The kernel
is a standard online-softmax flash attention over the sorted sequence: each program owns ``BLOCK_M`` queries, walks
the keys ``BLOCK_N`` at a time, reads ``allowed[label_q, label_k]`` from the tiny ``[G, G]`` table to mask a tile,
and **skips a key tile outright** when no query of its tile may see any of its keys (the block-sparse saving:
isolated regions never touch each other's keys). The output is un-permuted. Memory is O(L·D) beyond q, k, v;
offsets are int64 (``B·H·L·D`` may pass 2**31). The permutation, sorted labels and rule table are built once per
(rules fingerprint, L, device) and cached (:func:`triton_layout`), so a sampling step does not go back to the host.

:func:`attention_grouped_fast` runs this kernel where :func:`attention_triton_eligible` says so, else the torch
grouped path (which keeps SDPA's own flash kernels); a kernel that fails to compile or launch falls back to torch
for the rest of the process (:func:`.triton_runtime.run_guarded`).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..bounded_cache import BoundedCache, tensor_bytes
from .joint_attention import (
    CACHE_BYTES,
    CACHE_ENTRIES,
    LAYOUT_CACHES,
    AttentionRulesError,
    GroupedLayout,
    attention_grouped,
    resolve_allowed,
    rules_fingerprint,
)
from .triton_runtime import (
    kernel_failed,
    launch_device,
    needs_grad,
    run_guarded,
    triton_usable,
)

logger = logging.getLogger(__name__)

KERNEL = "attention_grouped"  # the name run_guarded disables it under
MAX_HEAD_DIM = 256
WIDE_HEAD_DIM = 128  # from this head size on, 8 warps (fewer registers per thread for the [BLOCK_M, D] tiles)


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    """Compile-on-first-use: the ``@triton.jit`` flash kernel with label rules and tile skipping."""
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_flash(q_ptr, k_ptr, v_ptr, o_ptr, label_ptr, allowed_ptr, L, G, H, D, sm_scale,
                      sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # int64 offsets: B·H·L·D may pass 2**31
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m64, n64, d64 = offs_m.to(tl.int64), offs_n.to(tl.int64), offs_d.to(tl.int64)
        row_ok = offs_m < L
        d_ok = offs_d < D
        q = tl.load(q_ptr + b * sqb + h * sqh + m64[:, None] * sql + d64[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        label_q = tl.load(label_ptr + m64, mask=row_ok, other=0)
        k_tile = k_ptr + b * skb + h * skh + n64[None, :] * skl + d64[:, None] * skd
        v_tile = v_ptr + b * svb + h * svh + n64[:, None] * svl + d64[None, :] * svd
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start_n in range(0, L, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < L
            label_k = tl.load(label_ptr + cols, mask=col_ok, other=0)
            rule = tl.load(allowed_ptr + label_q[:, None] * G + label_k[None, :],
                           mask=row_ok[:, None] & col_ok[None, :], other=0)
            ok = (rule != 0) & row_ok[:, None] & col_ok[None, :]
            if tl.max(ok.to(tl.int32)) > 0:  # skip key tiles no query of this tile may see
                kt = tl.load(k_tile, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                if IEEE:
                    s = tl.dot(q, kt, input_precision="ieee") * sm_scale
                else:
                    s = tl.dot(q, kt) * sm_scale
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                vt = tl.load(v_tile, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
                m_i = m_new
            k_tile += BLOCK_N * skl
            v_tile += BLOCK_N * svl
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(o_ptr + b * sob + h * soh + m64[:, None] * sol + d64[None, :] * sod,
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    class Kernel:
        run = grouped_flash
        cdiv = staticmethod(triton.cdiv)

    return Kernel


@dataclass(frozen=True)
class TritonLayout:
    """The kernel's view of one rule set on one device: ``order [L]`` (int64, the stable sort of the tokens by
    group), ``sorted_labels [L]`` (int32, labels in that order), ``table [G, G]`` (int8, resolved rules)."""

    order: torch.Tensor
    sorted_labels: torch.Tensor
    table: torch.Tensor
    fingerprint: str

    @property
    def length(self) -> int:
        return int(self.order.shape[0])


_TRITON_LAYOUTS: BoundedCache[tuple[str, int, str], TritonLayout] = BoundedCache(
    "triton joint-attention layouts", max_entries=CACHE_ENTRIES, max_bytes=CACHE_BYTES, weigh=tensor_bytes)
LAYOUT_CACHES.append(_TRITON_LAYOUTS)


def triton_layout(labels: torch.Tensor, allowed: torch.Tensor, device: torch.device | str | None = None,
                  fingerprint: str | None = None) -> TritonLayout:
    """The sorted layout of ``(labels, allowed)`` on ``device``, cached per (rules fingerprint, L, device) like
    :func:`.joint_attention.grouped_layout`; pass the ``fingerprint`` when already known (no hash, no host copy)."""
    device = torch.device(device) if device is not None else labels.device
    fingerprint = fingerprint if fingerprint is not None else rules_fingerprint(labels, allowed)
    key = (fingerprint, int(labels.shape[0]), str(device))
    cached = _TRITON_LAYOUTS.get(key)
    if cached is not None:
        return cached  # type: ignore[return-value]
    effective = resolve_allowed(labels, allowed)  # [G, G] bool on the CPU, tiny
    lab = labels.cpu().long()
    order = torch.argsort(lab, stable=True)
    layout = TritonLayout(order=order.to(device), sorted_labels=lab[order].to(device=device, dtype=torch.int32),
                          table=effective.to(device=device, dtype=torch.int8).contiguous(), fingerprint=fingerprint)
    _TRITON_LAYOUTS.put(key, layout)
    return layout


def attention_grouped_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, labels: torch.Tensor,
                             allowed: torch.Tensor, block_m: int = 64, block_n: int = 64,
                             layout: TritonLayout | None = None) -> torch.Tensor:
    """Rules-respecting attention in one kernel: q, k, v ``[B, H, L, D]`` -> ``[B, L, H·D]``; equals
    :func:`.joint_attention.attention_dense` with :func:`.joint_attention.dense_mask`. Pass ``layout`` (from
    :func:`triton_layout`) to skip the cache lookup."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise AttentionRulesError(f"q, k, v: expected [B, H, L, D] of one shape, got {tuple(q.shape)}, "
                                  f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, length, d = q.shape
    if labels.shape != (length,):
        raise AttentionRulesError(f"labels: length {tuple(labels.shape)} does not match the sequence length {length}")
    if d > MAX_HEAD_DIM:
        raise AttentionRulesError(f"q: head size {d} exceeds the kernel's {MAX_HEAD_DIM}")
    layout = layout if layout is not None else triton_layout(labels, allowed, q.device)
    if layout.length != length:
        raise AttentionRulesError(f"layout: length {layout.length} does not match the sequence length {length}")
    qs, ks, vs = (t.index_select(2, layout.order) for t in (q, k, v))
    out = torch.empty_like(qs)
    kernel = _kernel()
    block_d = max(16, 1 << (d - 1).bit_length())
    with launch_device(q.device):  # triton launches on the current CUDA device, not the tensors'
        kernel.run[(kernel.cdiv(length, block_m), b * h)](
            qs, ks, vs, out, layout.sorted_labels, layout.table, length, int(layout.table.shape[0]), h, d,
            1.0 / math.sqrt(d), *qs.stride(), *ks.stride(), *vs.stride(), *out.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=q.dtype == torch.float32,
            **({"num_warps": 8} if d >= WIDE_HEAD_DIM else {}))
    unsorted = torch.empty_like(out)
    unsorted.index_copy_(2, layout.order, out)
    return unsorted.transpose(1, 2).reshape(b, length, h * d)


def attention_triton_eligible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attention_grouped_fast` runs the kernel for these inputs: q, k, v ``[B, H, L, D]`` of one
    shape and dtype with ``D ≤ MAX_HEAD_DIM``, :func:`.triton_runtime.triton_usable` for their device and dtype,
    none needing gradients (the kernel is forward-only), and the kernel not disabled by an earlier failure."""
    return (q.ndim == 4 and k.shape == q.shape and v.shape == q.shape and q.shape[-1] <= MAX_HEAD_DIM
            and k.dtype == q.dtype and v.dtype == q.dtype and triton_usable(q.device, q.dtype)
            and kernel_failed(KERNEL) is None and not needs_grad(q, k, v))


def attention_grouped_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, labels: torch.Tensor,
                           allowed: torch.Tensor, layout: GroupedLayout | None = None) -> torch.Tensor:
    """``[B, H, L, D] -> [B, L, H·D]``: the Triton kernel where :func:`attention_triton_eligible`, else
    :func:`.joint_attention.attention_grouped`. ``layout`` (from :func:`.joint_attention.grouped_layout`, optional)
    is the torch path's and lends its fingerprint to the kernel's cached layout (no second hash of the rules)."""
    if not attention_triton_eligible(q, k, v):
        return attention_grouped(q, k, v, labels, allowed, layout)

    def fast() -> torch.Tensor:
        fingerprint = layout.fingerprint if layout is not None else None
        return attention_grouped_triton(q, k, v, labels, allowed,
                                        layout=triton_layout(labels, allowed, q.device, fingerprint))

    return run_guarded(KERNEL, fast, lambda: attention_grouped(q, k, v, labels, allowed, layout),
                       passthrough=(AttentionRulesError,))


__all__ = ["KERNEL", "MAX_HEAD_DIM", "TritonLayout", "attention_grouped_fast", "attention_grouped_triton",
           "attention_triton_eligible", "triton_layout"]
