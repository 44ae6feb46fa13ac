"""Masked multi-LoRA linear: many adapters on one layer, each scaled per token, in two matmuls.

For adapters i with factors ``down_i [r_i, C_in]``, ``up_i [C_out_i, r_i]``, static scale ``s_i`` (alpha/rank x
strength) and output row offset ``o_i`` (a slice of a fused layer such as ``img_attn.qkv`` or ``linear1``)::

    delta[b, l, o_i : o_i + C_out_i] += s_i · token_scale[b, l, i] · up_i @ down_i @ x[b, l]

:func:`stack_lora` concatenates the factors once (``down [R, C_in]``, ``up [C_out, R]`` with zero rows outside
each adapter's slice). :func:`masked_multi_lora` computes ``((x @ downᵀ) · scale_per_rank) @ upᵀ`` over the
ranks of *active* adapters only: an adapter whose ``token_scale`` is zero everywhere costs nothing.
:func:`masked_multi_lora_reference` is the plain per-adapter loop the tests compare against.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

import torch

logger = logging.getLogger(__name__)


class MultiLoRAError(ValueError):
    """Adapter factors or inputs have shapes that do not fit; the message names the adapter index and field."""


@dataclass(frozen=True)
class AdapterFactors:
    """One adapter on one layer: ``down [r, C_in]``, ``up [C_out_i, r]``, ``scale`` and ``out_offset``."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    out_offset: int = 0


@dataclass(frozen=True)
class AdapterSlice:
    """Where adapter i sits in a :class:`StackedLoRA`: ranks ``[rank_start, rank_end)``,
    rows ``[out_start, out_end)``."""

    rank_start: int
    rank_end: int
    out_start: int
    out_end: int
    scale: float


@dataclass(frozen=True)
class StackedLoRA:
    """All adapters of one layer stacked along the rank axis.

    down ``[R, C_in]``; up ``[C_out, R]``; rank_scale ``[R]`` (each rank's adapter scale); rank_owner ``[R]``
    (adapter index of each rank, int64); slices: one :class:`AdapterSlice` per adapter.
    """

    down: torch.Tensor
    up: torch.Tensor
    rank_scale: torch.Tensor
    rank_owner: torch.Tensor
    slices: tuple[AdapterSlice, ...]

    @property
    def n_adapters(self) -> int:
        return len(self.slices)

    @property
    def c_in(self) -> int:
        return int(self.down.shape[1])

    @property
    def c_out(self) -> int:
        return int(self.up.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "StackedLoRA":
        """A copy on ``device`` with factors in ``dtype`` (rank_scale stays float32). Call once, not per step."""
        return replace(self, down=self.down.to(device=device, dtype=dtype), up=self.up.to(device=device, dtype=dtype),
                       rank_scale=self.rank_scale.to(device=device), rank_owner=self.rank_owner.to(device=device))


def stack_lora(factors: Sequence[AdapterFactors], c_out: int) -> StackedLoRA:
    """Stack adapters of one layer with output width ``c_out``; factors keep their dtype (the first one's)."""
    if not factors:
        raise MultiLoRAError("stack_lora: no adapters given")
    c_in = int(factors[0].down.shape[1])
    dtype = factors[0].down.dtype
    slices, rank = [], 0
    for i, f in enumerate(factors):
        if f.down.ndim != 2 or f.up.ndim != 2:
            raise MultiLoRAError(f"adapters[{i}].down/up: expected 2-D, got {tuple(f.down.shape)}, {tuple(f.up.shape)}")
        r = int(f.down.shape[0])
        if int(f.down.shape[1]) != c_in:
            raise MultiLoRAError(f"adapters[{i}].down: C_in {f.down.shape[1]} differs from adapters[0] ({c_in})")
        if int(f.up.shape[1]) != r:
            raise MultiLoRAError(f"adapters[{i}].up: rank {f.up.shape[1]} differs from down's rank {r}")
        end = f.out_offset + int(f.up.shape[0])
        if f.out_offset < 0 or end > c_out:
            raise MultiLoRAError(f"adapters[{i}].out_offset: rows [{f.out_offset}, {end}) exceed C_out {c_out}")
        slices.append(AdapterSlice(rank, rank + r, f.out_offset, end, float(f.scale)))
        rank += r
    down = torch.cat([f.down.to(dtype) for f in factors], dim=0)
    up = torch.zeros(c_out, rank, dtype=dtype, device=down.device)
    for f, s in zip(factors, slices):
        up[s.out_start:s.out_end, s.rank_start:s.rank_end] = f.up.to(dtype)
    rank_scale = torch.cat([torch.full((s.rank_end - s.rank_start,), s.scale) for s in slices])
    rank_owner = torch.cat([torch.full((s.rank_end - s.rank_start,), i, dtype=torch.long)
                            for i, s in enumerate(slices)])
    return StackedLoRA(down=down, up=up, rank_scale=rank_scale.to(down.device),
                       rank_owner=rank_owner.to(down.device), slices=tuple(slices))


@dataclass(frozen=True)
class ActiveAdapters:
    """The adapters that contribute: ``adapter_index`` (sorted) and the ranks they own, ``rank_index [R_active]``."""

    adapter_index: tuple[int, ...]
    rank_index: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.rank_index.shape[0])


def select_active(stacked: StackedLoRA, token_scale: torch.Tensor | None = None,
                  adapter_index: Sequence[int] | None = None) -> ActiveAdapters:
    """Active adapters: those given in ``adapter_index``, else those with a non-zero ``token_scale [..., N]``
    anywhere (one device sync; pass ``adapter_index`` from the plan's gates to avoid it)."""
    if adapter_index is None:
        if token_scale is None:
            raise MultiLoRAError("select_active: give token_scale or adapter_index")
        nonzero = (token_scale != 0).reshape(-1, token_scale.shape[-1]).any(dim=0)
        adapter_index = nonzero.nonzero().flatten().tolist()
    chosen = tuple(sorted(int(i) for i in adapter_index))
    if any(i < 0 or i >= stacked.n_adapters for i in chosen):
        raise MultiLoRAError(f"select_active: adapter_index {chosen} outside [0, {stacked.n_adapters})")
    ranks = [torch.arange(stacked.slices[i].rank_start, stacked.slices[i].rank_end) for i in chosen]
    rank_index = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    return ActiveAdapters(adapter_index=chosen, rank_index=rank_index.to(stacked.down.device))


def masked_multi_lora(x: torch.Tensor, stacked: StackedLoRA, token_scale: torch.Tensor,
                      active: ActiveAdapters | None = None) -> torch.Tensor:
    """Sum of all adapters' deltas, each scaled per token: x ``[B, L, C_in]``, token_scale ``[B, L, N]``
    (or broadcastable, e.g. ``[1, L, N]``) -> ``[B, L, C_out]`` in ``x.dtype``.

    Two matmuls over the active ranks; zero-scale adapters are neither gathered nor multiplied. The per-rank
    scale is applied in float32 before casting back, so low-precision inputs lose as little as possible.
    """
    if x.shape[-1] != stacked.c_in:
        raise MultiLoRAError(f"x: last dim {x.shape[-1]} does not match the adapters' C_in {stacked.c_in}")
    if token_scale.shape[-1] != stacked.n_adapters:
        raise MultiLoRAError(f"token_scale: last dim {token_scale.shape[-1]} != number of adapters "
                             f"{stacked.n_adapters}")
    active = active if active is not None else select_active(stacked, token_scale)
    if active.rank == 0:
        return x.new_zeros(*x.shape[:-1], stacked.c_out)
    if active.rank == int(stacked.down.shape[0]):
        down, up, owner, rank_scale = stacked.down, stacked.up, stacked.rank_owner, stacked.rank_scale
    else:
        down = stacked.down.index_select(0, active.rank_index)
        up = stacked.up.index_select(1, active.rank_index)
        owner = stacked.rank_owner.index_select(0, active.rank_index)
        rank_scale = stacked.rank_scale.index_select(0, active.rank_index)
    down = down.to(device=x.device, dtype=x.dtype)
    up = up.to(device=x.device, dtype=x.dtype)
    hidden = torch.matmul(x, down.t())  # [B, L, R_active]
    per_rank = token_scale.to(device=x.device, dtype=torch.float32).index_select(-1, owner.to(x.device))
    hidden = (hidden.float() * (per_rank * rank_scale.to(x.device))).to(x.dtype)
    return torch.matmul(hidden, up.t())  # [B, L, C_out]


def masked_multi_lora_reference(x: torch.Tensor, factors: Sequence[AdapterFactors], c_out: int,
                                token_scale: torch.Tensor) -> torch.Tensor:
    """Plain loop over adapters (the definition): x ``[B, L, C_in]``, token_scale ``[B, L, N]`` -> ``[B, L, C_out]``."""
    out = x.new_zeros(*x.shape[:-1], c_out)
    for i, f in enumerate(factors):
        delta = (x @ f.down.to(x.dtype).t()) @ f.up.to(x.dtype).t()  # [B, L, C_out_i]
        weight = (token_scale[..., i:i + 1] * f.scale).to(x.dtype)
        out[..., f.out_offset:f.out_offset + f.up.shape[0]] += delta * weight
    return out
