"""LoKr (LyCORIS Kronecker product): ``ΔW = scale · kron(W1 [a1, a2], W2 [b1, b2])`` -> ``[a1·b1, a2·b2]``.

``W1`` is ``lokr_w1`` or ``w1_a [a1, r] @ w1_b [r, a2]``; ``W2`` is ``lokr_w2``, ``w2_a [b1, r] @ w2_b [r, b2]``
or, with Tucker core ``t2 [r, r]``, ``w2_aᵀ @ t2 @ w2_b`` (``w2_a [r, b1]``). ``scale = alpha / r`` where ``r``
is the rank of the factorised ``W2`` (else of ``W1``); with both factors full, scale is 1 (as in LyCORIS and
ComfyUI). The per-token path is exact and cheap without materialising ``ΔW``:
``x [..., a2·b2] -> X [..., a2, b2] -> W1 @ X @ W2ᵀ [..., a1, b1] -> [..., a1·b1]``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from .common import WEIGHT, Offset, compute_dtype, delta_shape_of, fit_low_rank, store_tensors, swap_row_halves
from .full import WeightDiff
from .hadamard import _core
from .lowrank import LoRA

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoKr:
    """Kronecker-product adapter on a Linear weight; give each factor either full or as ``_a``/``_b``."""

    target_shape: tuple[int, ...]
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    offset: Offset | None = None
    parameter: str = WEIGHT

    def __post_init__(self) -> None:
        store_tensors(self, "w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
        object.__setattr__(self, "t2", _core(self.t2))
        if (self.w1 is None) == (self.w1_a is None or self.w1_b is None):
            raise ValueError("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b (exactly one form)")
        if (self.w2 is None) == (self.w2_a is None or self.w2_b is None):
            raise ValueError("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b (exactly one form)")
        (a1, a2), (b1, b2) = self.factor_shapes
        expected = delta_shape_of(self.target_shape, self.offset)
        if (a1 * b1, a2 * b2) != tuple(expected):
            raise ValueError(f"LoKr factors give {(a1 * b1, a2 * b2)}, target rows {expected}")

    @property
    def factor_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((a1, a2), (b1, b2))`` of ``W1`` and ``W2``."""
        if self.w1 is not None:
            s1 = (int(self.w1.shape[0]), int(self.w1.shape[1]))
        else:
            s1 = (int(self.w1_a.shape[0]), int(self.w1_b.shape[1]))
        if self.w2 is not None:
            s2 = (int(self.w2.shape[0]), int(self.w2.shape[1]))
        elif self.t2 is not None:
            s2 = (int(self.w2_a.shape[1]), int(self.w2_b.shape[1]))
        else:
            s2 = (int(self.w2_a.shape[0]), int(self.w2_b.shape[1]))
        return s1, s2

    @property
    def rank(self) -> int:
        """Rank of the factorised factor (``W2`` first, then ``W1``); full-factor LoKr reports ``min(a·b)``."""
        if self.w2_b is not None:
            return int(self.w2_b.shape[0])
        if self.w1_b is not None:
            return int(self.w1_b.shape[0])
        (a1, a2), (b1, b2) = self.factor_shapes
        return min(a1 * b1, a2 * b2)

    @property
    def scale(self) -> float:
        """``alpha / rank`` when a factor is factorised and alpha is given, else 1."""
        if self.alpha is None or (self.w1_b is None and self.w2_b is None):
            return 1.0
        return float(self.alpha) / self.rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the rows written ``[out_rows, in]``."""
        return delta_shape_of(self.target_shape, self.offset)

    def _factors(self, ct: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``W1 [a1, a2]`` and ``W2 [b1, b2]`` in dtype ``ct``."""
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=ct)
        w1 = mv(self.w1) if self.w1 is not None else mv(self.w1_a) @ mv(self.w1_b)
        if self.w2 is not None:
            w2 = mv(self.w2)
        elif self.t2 is not None:
            w2 = mv(self.w2_a).T @ mv(self.t2) @ mv(self.w2_b)
        else:
            w2 = mv(self.w2_a) @ mv(self.w2_b)
        return w1, w2

    def _dtype(self) -> torch.dtype:
        return (self.w1 if self.w1 is not None else self.w1_a).dtype

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``[out_rows, in]`` merged delta (float32 for 16-bit factors, else the factors' dtype)."""
        device = (self.w1 if self.w1 is not None else self.w1_a).device
        w1, w2 = self._factors(compute_dtype(self._dtype()), device)
        return torch.kron(w1, w2) * self.scale

    def bypass_delta(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., a2·b2] -> [..., a1·b1]`` via ``W1 @ X @ W2ᵀ`` (no ``ΔW`` materialised)."""
        (a1, a2), (b1, b2) = self.factor_shapes
        w1, w2 = self._factors(x.dtype, x.device)
        grid = x.reshape(*x.shape[:-1], a2, b2)
        out = torch.matmul(w1, grid) @ w2.T
        return out.reshape(*x.shape[:-1], a1 * b1) * self.scale

    def low_rank_approximation(self, rank: int, base_weight: torch.Tensor | None = None) -> tuple[LoRA, float]:
        """Truncated-SVD LoRA of ``ΔW`` and its relative Frobenius error."""
        fit = fit_low_rank(self.delta_weight(), rank)
        return LoRA(up=fit.up, down=fit.down, target_shape=self.target_shape, offset=self.offset), fit.relative_error

    def swap_output_halves(self) -> "LoKr | WeightDiff":
        """Output rows ``[a; b] -> [b; a]``: swaps the halves of ``W1`` (``a1`` even) or of ``W2`` (``a1 == 1``);
        otherwise the permuted delta is no Kronecker product and an exact dense WeightDiff is returned."""
        (a1, _), (b1, _) = self.factor_shapes
        if a1 % 2 == 0:
            if self.w1 is not None:
                return replace(self, w1=swap_row_halves(self.w1))
            return replace(self, w1_a=swap_row_halves(self.w1_a))
        if a1 == 1 and b1 % 2 == 0:
            if self.w2 is not None:
                return replace(self, w2=swap_row_halves(self.w2))
            if self.t2 is not None:
                return replace(self, w2_a=swap_row_halves(self.w2_a.T).T)
            return replace(self, w2_a=swap_row_halves(self.w2_a))
        logger.info("LoKr with W1 rows %d, W2 rows %d: row-half swap kept as a dense delta", a1, b1)
        return WeightDiff(delta=swap_row_halves(self.delta_weight()), target_shape=self.target_shape,
                          offset=self.offset)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LoKr":
        """Copy with every factor moved/cast."""
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)
        return replace(self, w1=mv(self.w1), w1_a=mv(self.w1_a), w1_b=mv(self.w1_b), w2=mv(self.w2),
                       w2_a=mv(self.w2_a), w2_b=mv(self.w2_b), t2=mv(self.t2))
