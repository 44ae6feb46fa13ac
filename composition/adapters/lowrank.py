"""LoRA / LoCon: ``ΔW = (alpha / rank) · up @ [mid @] down``.

Shapes: ``up [out, r]``, ``down [r, in]``, optional ``mid [r, r]`` (LyCORIS Tucker core; a conv-style
``[r, r, 1, 1]`` core is accepted and squeezed). ``out`` is the number of rows written (the slice length
when ``offset`` is set).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from .common import WEIGHT, Offset, compute_dtype, delta_shape_of, fit_low_rank, store_tensors, swap_row_halves

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRA:
    """Low-rank adapter on a Linear weight. ``alpha=None`` means scale 1 (PEFT / ai-toolkit convention)."""

    up: torch.Tensor
    down: torch.Tensor
    target_shape: tuple[int, ...]
    alpha: float | None = None
    mid: torch.Tensor | None = None
    offset: Offset | None = None
    parameter: str = WEIGHT

    def __post_init__(self) -> None:
        store_tensors(self, "up", "down", "mid")
        if self.up.dim() != 2 or self.down.dim() != 2:
            raise ValueError(f"LoRA up/down must be 2-D, got {tuple(self.up.shape)} / {tuple(self.down.shape)}")
        if self.mid is not None and self.mid.dim() == 4:
            if tuple(self.mid.shape[2:]) != (1, 1):
                raise ValueError(f"LoRA mid {tuple(self.mid.shape)}: only 1x1 Tucker cores fit a Linear")
            object.__setattr__(self, "mid", self.mid[:, :, 0, 0])
        r_up, r_down = self.up.shape[1], self.down.shape[0]
        if self.mid is None and r_up != r_down:
            raise ValueError(f"LoRA up {tuple(self.up.shape)} and down {tuple(self.down.shape)} ranks differ")
        if self.mid is not None and tuple(self.mid.shape) != (r_up, r_down):
            raise ValueError(f"LoRA mid {tuple(self.mid.shape)} does not fit up {tuple(self.up.shape)} "
                             f"and down {tuple(self.down.shape)}")
        expected = delta_shape_of(self.target_shape, self.offset)
        if (self.up.shape[0], self.down.shape[1]) != tuple(expected):
            raise ValueError(f"LoRA factors give {(self.up.shape[0], self.down.shape[1])}, target rows {expected}")

    @property
    def rank(self) -> int:
        """Rank ``r`` (rows of ``down``)."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank``, or 1 without alpha."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the rows written ``[out_rows, in]``."""
        return delta_shape_of(self.target_shape, self.offset)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``[out_rows, in]`` merged delta, computed and returned in float32 for 16-bit factors (as ComfyUI's
        intermediate dtype), else in the factors' dtype."""
        ct = compute_dtype(self.up.dtype)
        down = self.down.to(ct)
        if self.mid is not None:
            down = self.mid.to(device=down.device, dtype=ct) @ down
        return (self.up.to(device=down.device, dtype=ct) @ down) * self.scale

    def bypass_delta(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., in] -> [..., out_rows]`` through the factors, never materialising ``ΔW``."""
        h = x @ self.down.to(device=x.device, dtype=x.dtype).T
        if self.mid is not None:
            h = h @ self.mid.to(device=x.device, dtype=x.dtype).T
        return (h @ self.up.to(device=x.device, dtype=x.dtype).T) * self.scale

    def low_rank_approximation(self, rank: int, base_weight: torch.Tensor | None = None) -> tuple["LoRA", float]:
        """Itself when ``rank >= self.rank`` (error 0), else the SVD truncation and its relative error."""
        if rank >= self.rank and self.mid is None:
            return self, 0.0
        fit = fit_low_rank(self.delta_weight(), rank)
        return replace(self, up=fit.up, down=fit.down, alpha=None, mid=None), fit.relative_error

    def swap_output_halves(self) -> "LoRA":
        """The same adapter with output rows ``[a; b]`` reordered to ``[b; a]``."""
        return replace(self, up=swap_row_halves(self.up))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LoRA":
        """Copy with every factor moved/cast."""
        mid = None if self.mid is None else self.mid.to(device=device, dtype=dtype)
        return replace(self, up=self.up.to(device=device, dtype=dtype),
                       down=self.down.to(device=device, dtype=dtype), mid=mid)
