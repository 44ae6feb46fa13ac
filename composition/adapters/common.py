"""Shared pieces of every adapter kind: slice offsets, the parameter a delta lands on, dense fallbacks.

Protocol shared by all kinds (LoRA, LoHa, LoKr, DoRA, WeightDiff, SetWeight):

* ``target_shape``: shape of the whole target parameter (e.g. ``[3H, H]`` for a fused qkv weight).
* ``delta_shape``: shape of the rows the adapter writes (``target_shape`` with dim 0 = ``offset.length``).
* ``delta_weight(base_weight=None) -> Tensor[delta_shape]``: the merged delta, alpha/rank scale folded in,
  strength NOT applied (the caller multiplies); float32 for 16-bit (and widened 8-bit) factors, like
  ComfyUI's intermediate dtype, so no rounding to the factors' dtype happens before it is added.
  ``base_weight`` is always the WHOLE target parameter ``[*target_shape]``; an adapter with an ``offset``
  slices it itself.
* ``bypass_delta(x, base_weight=None) -> [..., delta_rows]``: per-token output of the delta,
  equal to ``x @ delta_weight().T`` for weight targets (``x`` is ``[..., in]``).
* ``offset``: ``None`` or an :class:`Offset` saying which output rows of the target it writes.
* ``parameter``: ``"weight"`` (a Linear matrix, or the 1-D gain of a LayerNorm / T5 norm), ``"bias"`` or
  ``"scale"`` (an RMSNorm gain).

8-bit float factors (``float8_e4m3fn`` / ``float8_e5m2`` files) are a storage format only: every adapter holds
them as bfloat16 (:func:`stored`), which represents every fp8 value exactly, so products and scales always run
in a real float dtype on the merged and the per-token path alike.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

WEIGHT = "weight"
BIAS = "bias"
SCALE = "scale"
PARAMETERS = (WEIGHT, BIAS, SCALE)


@dataclass(frozen=True)
class Offset:
    """The adapter writes ``target[start:start + length]`` along ``dim`` (always 0: output rows)."""

    dim: int
    start: int
    length: int

    def __post_init__(self) -> None:
        if self.dim != 0:
            raise ValueError(f"only output-row offsets (dim 0) are supported, got dim {self.dim}")
        if self.start < 0 or self.length <= 0:
            raise ValueError(f"offset start {self.start} / length {self.length} must be >= 0 / > 0")

    @property
    def stop(self) -> int:
        """One past the last row written."""
        return self.start + self.length

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``full`` (``[rows, ...]`` -> ``[length, ...]``)."""
        if full.shape[0] < self.stop:
            raise ValueError(f"offset {self.start}+{self.length} exceeds {full.shape[0]} rows")
        return full[self.start:self.stop]


EIGHT_BIT_FLOATS: tuple[torch.dtype, ...] = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                      "float8_e8m0fnu") if hasattr(torch, name))


def stored(t: torch.Tensor | None) -> torch.Tensor | None:
    """A factor as adapters hold it: an 8-bit float widened to bfloat16 (exact for every fp8 code), else as is."""
    if t is not None and t.dtype in EIGHT_BIT_FLOATS:
        return t.to(torch.bfloat16)
    return t


def store_tensors(adapter: object, *names: str) -> None:
    """Replace the named tensor fields of a frozen adapter by their :func:`stored` form (in ``__post_init__``)."""
    for name in names:
        object.__setattr__(adapter, name, stored(getattr(adapter, name)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Intermediate dtype for factor products: float32 for half types, else unchanged."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def upcast(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` in the intermediate dtype (and on ``like``'s device when given)."""
    device = like.device if like is not None else t.device
    return t.to(device=device, dtype=compute_dtype(t.dtype))


def delta_shape_of(target_shape: tuple[int, ...], offset: Offset | None) -> tuple[int, ...]:
    """Shape of the rows written: ``target_shape`` with dim 0 replaced by the offset's length."""
    if offset is None:
        return tuple(target_shape)
    return (offset.length, *tuple(target_shape)[1:])


def base_rows(base_weight: torch.Tensor | None, offset: Offset | None, who: str) -> torch.Tensor:
    """The part of the whole base parameter an adapter writes; raises when it is missing."""
    if base_weight is None:
        raise ValueError(f"{who} depends on the base weight: pass base_weight (the whole target parameter)")
    return base_weight if offset is None else offset.take(base_weight)


def apply_parameter_delta(x: torch.Tensor, delta: torch.Tensor, parameter: str) -> torch.Tensor:
    """Per-token effect of a parameter delta.

    weight: ``x [..., in] @ delta[out, in].T -> [..., out]``; bias: ``delta [out]`` broadcast to
    ``[..., out]``; scale (RMSNorm gain), or a 1-D weight (a LayerNorm's gain): ``x [..., C] * delta [C]`` where
    ``x`` is the normalised input.
    """
    if parameter == WEIGHT and delta.dim() == 2:
        return x @ delta.to(x.dtype).T
    if parameter == BIAS:
        return delta.to(x.dtype).expand(*x.shape[:-1], delta.shape[0])
    if parameter in (SCALE, WEIGHT):
        return x * delta.to(x.dtype)
    raise ValueError(f"unknown parameter kind {parameter!r}")


@dataclass(frozen=True)
class LowRankFit:
    """Result of :func:`fit_low_rank`: ``up [out, r] @ down [r, in]`` and its relative Frobenius error."""

    up: torch.Tensor
    down: torch.Tensor
    relative_error: float


def fit_low_rank(delta: torch.Tensor, rank: int) -> LowRankFit:
    """Best rank-``rank`` approximation of a 2-D ``delta [out, in]`` by truncated SVD (Eckart-Young)."""
    if delta.dim() != 2:
        raise ValueError(f"low-rank fit needs a 2-D delta, got shape {tuple(delta.shape)}")
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    d = delta.to(torch.float32)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = min(rank, s.shape[0])
    up = u[:, :r] * s[:r]
    down = vh[:r]
    total = float(torch.linalg.vector_norm(s))
    rest = float(torch.linalg.vector_norm(s[r:])) if r < s.shape[0] else 0.0
    error = rest / total if total > 0 else 0.0
    logger.debug("low-rank fit %s -> rank %d, relative error %.3g", tuple(delta.shape), r, error)
    return LowRankFit(up=up.to(delta.dtype), down=down.to(delta.dtype), relative_error=error)


def swap_row_halves(t: torch.Tensor) -> torch.Tensor:
    """``[a; b] -> [b; a]`` along dim 0 (diffusers' norm_out shift/scale order vs Flux's scale/shift)."""
    if t.shape[0] % 2:
        raise ValueError(f"cannot swap halves of {t.shape[0]} rows (odd)")
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
