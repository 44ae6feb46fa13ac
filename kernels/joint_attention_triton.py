"""Region-grouped joint attention as one Triton flash-attention kernel: rules read from labels, no L×L tensor.

Same contract as :func:`.joint_attention.attention_grouped` (q, k, v ``[B, H, L, D]``, ``labels [L]``,
``allowed [G, G]`` -> ``[B, L, H·D]``, rules resolved the same way by :func:`.joint_attention.resolve_allowed`).

Tokens are first sorted by group (a stable permutation of the sequence), so every region is contiguous. The kernel
is a standard online-softmax flash attention over the sorted sequence: each program owns ``BLOCK_M`` queries, walks
the keys ``BLOCK_N`` at a time, reads ``allowed[label_q, label_k]`` from the tiny ``[G, G]`` table to mask a tile,
and **skips a key tile outright** when no query of its tile may see any of its keys (the block-sparse saving:
isolated regions never touch each other's keys). The output is un-permuted. Memory is O(L·D) beyond q, k, v.

:func:`attention_grouped_fast` picks this kernel when :func:`.multi_lora_triton.triton_usable` says so and the head
size fits (``D ≤ 256``), else the torch grouped path (which keeps SDPA's own flash kernels).
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch

from .joint_attention import AttentionRulesError, attention_grouped, resolve_allowed
from .multi_lora_triton import triton_usable

logger = logging.getLogger(__name__)

MAX_HEAD_DIM = 256


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
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < L
        d_ok = offs_d < D
        q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        label_q = tl.load(label_ptr + offs_m, mask=row_ok, other=0)
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
                kt = tl.load(k_ptr + b * skb + h * skh + cols[None, :] * skl + offs_d[:, None] * skd,
                             mask=col_ok[None, :] & d_ok[:, None], other=0.0)
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
                vt = tl.load(v_ptr + b * svb + h * svh + cols[:, None] * svl + offs_d[None, :] * svd,
                             mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                if IEEE:
                    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
                m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :] * sod,
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    class Kernel:
        run = grouped_flash
        cdiv = staticmethod(triton.cdiv)

    return Kernel


def attention_grouped_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, labels: torch.Tensor,
                             allowed: torch.Tensor, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """Rules-respecting attention in one kernel: q, k, v ``[B, H, L, D]`` -> ``[B, L, H·D]``; equals
    :func:`.joint_attention.attention_dense` with :func:`.joint_attention.dense_mask`."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise AttentionRulesError(f"q, k, v: expected [B, H, L, D] of one shape, got {tuple(q.shape)}, "
                                  f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, length, d = q.shape
    if labels.shape != (length,):
        raise AttentionRulesError(f"labels: length {tuple(labels.shape)} does not match the sequence length {length}")
    if d > MAX_HEAD_DIM:
        raise AttentionRulesError(f"q: head size {d} exceeds the kernel's {MAX_HEAD_DIM}")
    effective = resolve_allowed(labels, allowed)  # [G, G] bool on the CPU, tiny
    groups = int(effective.shape[0])
    order = torch.argsort(labels.cpu().long(), stable=True)
    sorted_labels = labels.cpu().long()[order].to(device=q.device, dtype=torch.int32)
    order = order.to(q.device)
    table = effective.to(device=q.device, dtype=torch.int8).contiguous()
    qs, ks, vs = (t.index_select(2, order) for t in (q, k, v))
    out = torch.empty_like(qs)
    kernel = _kernel()
    block_d = max(16, 1 << (d - 1).bit_length())
    kernel.run[(kernel.cdiv(length, block_m), b * h)](
        qs, ks, vs, out, sorted_labels, table, length, groups, h, d, 1.0 / math.sqrt(d),
        *qs.stride(), *ks.stride(), *vs.stride(), *out.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=q.dtype == torch.float32)
    unsorted = torch.empty_like(out)
    unsorted.index_copy_(2, order, out)
    return unsorted.transpose(1, 2).reshape(b, length, h * d)


def attention_grouped_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, labels: torch.Tensor,
                           allowed: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D] -> [B, L, H·D]``: the Triton kernel where usable, else :func:`.joint_attention.attention_grouped`."""
    if triton_usable(q.device) and q.shape[-1] <= MAX_HEAD_DIM:
        return attention_grouped_triton(q, k, v, labels, allowed)
    return attention_grouped(q, k, v, labels, allowed)


__all__ = ["MAX_HEAD_DIM", "attention_grouped_fast", "attention_grouped_triton"]
