"""LoHa (LyCORIS Hadamard product): ``ΔW = (alpha / rank) · (W1) ⊙ (W2)``.

Without Tucker: ``W1 = w1_a [out, r] @ w1_b [r, in]`` (same for ``W2``).
With Tucker (``t1``/``t2`` ``[r, r]``, conv-style ``[r, r, 1, 1]`` accepted): ``w1_a`` is ``[r, out]`` and
``W1 = w1_aᵀ @ t1 @ w1_b``. ``rank`` is ``w1_b.shape[0]``. There is no cheap per-token form: the
bypass path materialises ``ΔW`` once and multiplies; :meth:`LoHa.low_rank_approximation` gives a LoRA.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from .common import WEIGHT, Offset, compute_dtype, delta_shape_of, fit_low_rank, store_tensors, swap_row_halves
from .lowrank import LoRA

logger = logging.getLogger(__name__)


def _core(t: torch.Tensor | None) -> torch.Tensor | None:
    """A Tucker core as ``[r, r]`` (squeezing a 1x1 conv core)."""
    if t is None or t.dim() == 2:
        return t
    if t.dim() == 4 and tuple(t.shape[2:]) == (1, 1):
        return t[:, :, 0, 0]
    raise ValueError(f"Tucker core {tuple(t.shape)}: only [r, r] or [r, r, 1, 1] fit a Linear")


def _hada_factor(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, ct: torch.dtype) -> torch.Tensor:
    """One Hadamard factor ``[out, in]``: ``a @ b`` or, with a Tucker core, ``aᵀ @ t @ b``."""
    a, b = a.to(ct), b.to(device=a.device, dtype=ct)
    if t is None:
        return a @ b
    return a.T @ t.to(device=a.device, dtype=ct) @ b


@dataclass(frozen=True)
class LoHa:
    """Hadamard-product adapter on a Linear weight."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    target_shape: tuple[int, ...]
    alpha: float | None = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    offset: Offset | None = None
    parameter: str = WEIGHT

    def __post_init__(self) -> None:
        store_tensors(self, "w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")
        object.__setattr__(self, "t1", _core(self.t1))
        object.__setattr__(self, "t2", _core(self.t2))
        if (self.t1 is None) != (self.t2 is None):
            raise ValueError("LoHa needs both hada_t1 and hada_t2 or neither")
        rows = self.w1_a.shape[1] if self.t1 is not None else self.w1_a.shape[0]
        expected = delta_shape_of(self.target_shape, self.offset)
        if (rows, self.w1_b.shape[1]) != tuple(expected):
            raise ValueError(f"LoHa factors give {(rows, self.w1_b.shape[1])}, target rows {expected}")

    @property
    def rank(self) -> int:
        """Rank of each Hadamard factor (rows of ``w1_b``)."""
        return int(self.w1_b.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank``, or 1 without alpha."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the rows written ``[out_rows, in]``."""
        return delta_shape_of(self.target_shape, self.offset)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``[out_rows, in]`` merged delta (float32 for 16-bit factors, else the factors' dtype)."""
        ct = compute_dtype(self.w1_a.dtype)
        m1 = _hada_factor(self.w1_a, self.w1_b, self.t1, ct)
        m2 = _hada_factor(self.w2_a.to(m1.device), self.w2_b, self.t2, ct)
        return m1 * m2 * self.scale

    def bypass_delta(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., in] -> [..., out_rows]`` (exact dense path: materialises ``ΔW`` once)."""
        return x @ self.delta_weight().to(device=x.device, dtype=x.dtype).T

    def low_rank_approximation(self, rank: int, base_weight: torch.Tensor | None = None) -> tuple[LoRA, float]:
        """Truncated-SVD LoRA of ``ΔW`` and its relative Frobenius error."""
        fit = fit_low_rank(self.delta_weight(), rank)
        return LoRA(up=fit.up, down=fit.down, target_shape=self.target_shape, offset=self.offset), fit.relative_error

    def swap_output_halves(self) -> "LoHa":
        """The same adapter with output rows ``[a; b]`` reordered to ``[b; a]``."""
        if self.t1 is None:
            return replace(self, w1_a=swap_row_halves(self.w1_a), w2_a=swap_row_halves(self.w2_a))
        return replace(self, w1_a=swap_row_halves(self.w1_a.T).T, w2_a=swap_row_halves(self.w2_a.T).T)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LoHa":
        """Copy with every factor moved/cast."""
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)
        return replace(self, w1_a=mv(self.w1_a), w1_b=mv(self.w1_b), w2_a=mv(self.w2_a), w2_b=mv(self.w2_b),
                       t1=mv(self.t1), t2=mv(self.t2))
