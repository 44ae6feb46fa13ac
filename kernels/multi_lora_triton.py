"""Triton kernels for the masked multi-adapter linear of :mod:`.multi_lora`, and the dispatch that picks them.

Same contract as :func:`.multi_lora.masked_multi_lora` (x ``[B, L, C_in]``, token_scale ``[B, L, N]`` or broadcastable,
active ranks only) in two launches over ``M = B·L`` tokens:

1. ``hidden [M, R] = (x @ downᵀ) · token_scale[m, owner[r]] · rank_scale[r]`` — the stacked down-projection with the
   per-token, per-rank scale applied in float32 in the epilogue (the ``[M, N]`` token scale is gathered by rank
   owner inside the kernel, never expanded to ``[M, R]`` in memory);
2. ``out [M, C_out] = base + hidden @ upᵀ`` — the stacked up-projection with the base layer's output added in the
   epilogue (pass ``base`` to fuse the residual add; without it the delta alone is returned).

Every offset is computed in int64 (``M·C_out`` passes 2**31 on Flux ``linear1``, 21504 outputs, above ~100k
tokens). ``triton`` is imported only when a kernel is first compiled, so this module imports anywhere.
:func:`masked_multi_lora_fast` is what a caller uses: Triton where :func:`.triton_runtime.triton_usable` allows
(device, capability, dtype; ``LOOM_KERNELS=torch`` forces torch) and no input needs gradients, else torch; a kernel
that fails to compile or launch falls back to torch for the rest of the process (:func:`.triton_runtime.run_guarded`).
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from .multi_lora import (
    ActiveAdapters,
    MultiLoRAError,
    StackedLoRA,
    masked_multi_lora,
    select_active,
)
from .triton_runtime import launch_device, needs_grad, run_guarded, triton_usable

logger = logging.getLogger(__name__)

KERNEL = "masked_multi_lora"  # the name run_guarded disables it under


def _next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


@functools.lru_cache(maxsize=1)
def _kernels() -> Any:
    """Compile-on-first-use: the two ``@triton.jit`` kernels (a namespace with ``down`` and ``up``)."""
    import triton
    import triton.language as tl

    @triton.jit
    def down_kernel(x_ptr, down_ptr, scale_ptr, owner_ptr, rank_scale_ptr, hidden_ptr, M, K, R,
                    sxm, sxk, sdr, sdk, ssm, ssn, shm, shr,
                    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rk = tl.arange(0, BLOCK_K)
        rm64, rr64, rk64 = rm.to(tl.int64), rr.to(tl.int64), rk.to(tl.int64)  # int64 offsets: M·C > 2**31
        x_tile = x_ptr + rm64[:, None] * sxm + rk64[None, :] * sxk
        down_tile = down_ptr + rr64[None, :] * sdr + rk64[:, None] * sdk
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            xt = tl.load(x_tile, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            dt = tl.load(down_tile, mask=(rr[None, :] < R) & (kk[:, None] < K), other=0.0)
            if IEEE:
                acc += tl.dot(xt, dt, input_precision="ieee")
            else:
                acc += tl.dot(xt, dt)
            x_tile += BLOCK_K * sxk
            down_tile += BLOCK_K * sdk
        acc = acc.to(hidden_ptr.dtype.element_ty).to(tl.float32)  # the torch path rounds x @ downᵀ to x's dtype
        owner = tl.load(owner_ptr + rr64, mask=rr < R, other=0).to(tl.int64)
        rank_scale = tl.load(rank_scale_ptr + rr64, mask=rr < R, other=0.0)
        keep = (rm[:, None] < M) & (rr[None, :] < R)
        token = tl.load(scale_ptr + rm64[:, None] * ssm + owner[None, :] * ssn, mask=keep, other=0.0)
        acc = acc * token * rank_scale[None, :]
        tl.store(hidden_ptr + rm64[:, None] * shm + rr64[None, :] * shr, acc.to(hidden_ptr.dtype.element_ty),
                 mask=keep)

    @triton.jit
    def up_kernel(hidden_ptr, up_ptr, base_ptr, out_ptr, M, N, R,
                  shm, shr, sun, sur, sbm, sbn, som, son,
                  HAS_BASE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                  IEEE: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        rm64, rn64, rr64 = rm.to(tl.int64), rn.to(tl.int64), rr.to(tl.int64)  # int64 offsets: M·C_out > 2**31
        hidden_tile = hidden_ptr + rm64[:, None] * shm + rr64[None, :] * shr
        up_tile = up_ptr + rn64[None, :] * sun + rr64[:, None] * sur
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            kk = r0 + rr
            ht = tl.load(hidden_tile, mask=(rm[:, None] < M) & (kk[None, :] < R), other=0.0)
            ut = tl.load(up_tile, mask=(rn[None, :] < N) & (kk[:, None] < R), other=0.0)
            if IEEE:
                acc += tl.dot(ht, ut, input_precision="ieee")
            else:
                acc += tl.dot(ht, ut)
            hidden_tile += BLOCK_R * shr
            up_tile += BLOCK_R * sur
        keep = (rm[:, None] < M) & (rn[None, :] < N)
        if HAS_BASE:
            acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
            acc += tl.load(base_ptr + rm64[:, None] * sbm + rn64[None, :] * sbn, mask=keep, other=0.0).to(tl.float32)
        tl.store(out_ptr + rm64[:, None] * som + rn64[None, :] * son, acc.to(out_ptr.dtype.element_ty), mask=keep)

    class Kernels:
        down = down_kernel
        up = up_kernel
        cdiv = staticmethod(triton.cdiv)

    return Kernels


def masked_multi_lora_triton(x: torch.Tensor, stacked: StackedLoRA, token_scale: torch.Tensor,
                             active: ActiveAdapters | None = None, base: torch.Tensor | None = None,
                             block_m: int = 64) -> torch.Tensor:
    """Triton version of :func:`.multi_lora.masked_multi_lora`: x ``[B, L, C_in]``, token_scale ``[B, L, N]``
    (broadcastable) -> ``[B, L, C_out]`` in ``x.dtype``; with ``base [B, L, C_out]`` returns ``base + delta``."""
    if x.shape[-1] != stacked.c_in:
        raise MultiLoRAError(f"x: last dim {x.shape[-1]} does not match the adapters' C_in {stacked.c_in}")
    if token_scale.shape[-1] != stacked.n_adapters:
        raise MultiLoRAError(f"token_scale: last dim {token_scale.shape[-1]} != number of adapters "
                             f"{stacked.n_adapters}")
    active = active if active is not None else select_active(stacked, token_scale)
    lead = tuple(x.shape[:-1])
    if base is not None and tuple(base.shape) != lead + (stacked.c_out,):
        raise MultiLoRAError(f"base: expected {lead + (stacked.c_out,)}, got {tuple(base.shape)}")
    if active.rank == 0:
        return base.clone() if base is not None else x.new_zeros(*lead, stacked.c_out)
    if active.rank == int(stacked.down.shape[0]):
        down, up, owner, rank_scale = stacked.down, stacked.up, stacked.rank_owner, stacked.rank_scale
    else:
        down = stacked.down.index_select(0, active.rank_index)
        up = stacked.up.index_select(1, active.rank_index)
        owner = stacked.rank_owner.index_select(0, active.rank_index)
        rank_scale = stacked.rank_scale.index_select(0, active.rank_index)
    k = _kernels()
    x2 = x.reshape(-1, stacked.c_in)
    m, rank, n = int(x2.shape[0]), int(down.shape[0]), stacked.c_out
    down = down.to(device=x.device, dtype=x.dtype)
    up = up.to(device=x.device, dtype=x.dtype)
    owner = owner.to(device=x.device, dtype=torch.int32)
    rank_scale = rank_scale.to(device=x.device, dtype=torch.float32)
    scale = token_scale.to(device=x.device, dtype=torch.float32).expand(*lead, stacked.n_adapters)
    scale = scale.reshape(m, stacked.n_adapters)
    hidden = torch.empty(m, rank, device=x.device, dtype=x.dtype)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype if base is None else base.dtype)
    base2 = base.reshape(m, n) if base is not None else out
    ieee = x.dtype == torch.float32
    block_r, block_n = _next_pow2(min(rank, 64)), 64
    with launch_device(x.device):  # triton launches on the current CUDA device, not the tensors'
        k.down[(k.cdiv(m, block_m), k.cdiv(rank, block_r))](
            x2, down, scale, owner, rank_scale, hidden, m, stacked.c_in, rank,
            x2.stride(0), x2.stride(1), down.stride(0), down.stride(1), scale.stride(0), scale.stride(1),
            hidden.stride(0), hidden.stride(1), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=32, IEEE=ieee)
        k.up[(k.cdiv(m, block_m), k.cdiv(n, block_n))](
            hidden, up, base2, out, m, n, rank, hidden.stride(0), hidden.stride(1), up.stride(0), up.stride(1),
            base2.stride(0), base2.stride(1), out.stride(0), out.stride(1), HAS_BASE=base is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=ieee)
    return out.reshape(*lead, n)


def masked_multi_lora_fast(x: torch.Tensor, stacked: StackedLoRA, token_scale: torch.Tensor,
                           active: ActiveAdapters | None = None) -> torch.Tensor:
    """The delta ``[B, L, C_out]`` of :func:`.multi_lora.masked_multi_lora`, by the Triton kernels where they
    may run — :func:`.triton_runtime.triton_usable` for ``x``'s device and dtype, no input needing gradients (the
    kernels are forward-only), the kernel not disabled by an earlier failure — else by the torch path."""
    if triton_usable(x.device, x.dtype) and not needs_grad(x, token_scale, stacked.down, stacked.up,
                                                           stacked.rank_scale):
        return run_guarded(KERNEL, lambda: masked_multi_lora_triton(x, stacked, token_scale, active),
                           lambda: masked_multi_lora(x, stacked, token_scale, active), passthrough=(MultiLoRAError,))
    return masked_multi_lora(x, stacked, token_scale, active)


__all__ = ["KERNEL", "masked_multi_lora_fast", "masked_multi_lora_triton"]
