"""Full-tensor adapters: ``diff`` / ``diff_b`` (an additive delta) and ``set_weight`` (a replacement).

``WeightDiff.delta`` has the shape of the rows written (``[out_rows, in]`` for a weight, ``[C]`` for a bias or
a norm scale). ``SetWeight.value`` replaces the parameter, so its delta depends on the base:
``ΔW = value - base``. Neither has a cheap per-token form beyond the plain matmul.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from .common import (
    PARAMETERS,
    WEIGHT,
    Offset,
    apply_parameter_delta,
    base_rows,
    delta_shape_of,
    fit_low_rank,
    store_tensors,
    swap_row_halves,
)
from .lowrank import LoRA

logger = logging.getLogger(__name__)


def _check(kind: str, tensor: torch.Tensor, target_shape: tuple[int, ...], offset: Offset | None,
           parameter: str) -> None:
    """Raise unless ``tensor`` has the shape of the rows written and ``parameter`` is known."""
    if parameter not in PARAMETERS:
        raise ValueError(f"{kind}: unknown parameter {parameter!r} (one of {PARAMETERS})")
    expected = delta_shape_of(target_shape, offset)
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{kind} tensor {tuple(tensor.shape)} does not match target rows {expected}")


@dataclass(frozen=True)
class WeightDiff:
    """Additive delta on a weight (``.diff``), bias (``.diff_b``, ``lora_B.bias``) or norm scale."""

    delta: torch.Tensor
    target_shape: tuple[int, ...]
    offset: Offset | None = None
    parameter: str = WEIGHT

    def __post_init__(self) -> None:
        store_tensors(self, "delta")
        _check("diff", self.delta, self.target_shape, self.offset, self.parameter)

    @property
    def rank(self) -> int:
        """Full rank bound ``min(out_rows, in)`` for a matrix, 1 for a vector."""
        return min(self.delta.shape) if self.delta.dim() == 2 else 1

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the rows written."""
        return delta_shape_of(self.target_shape, self.offset)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The stored delta (``[out_rows, in]`` or ``[C]``)."""
        return self.delta

    def bypass_delta(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token effect (see ``common.apply_parameter_delta``): ``[..., in] -> [..., out_rows]``."""
        return apply_parameter_delta(x, self.delta.to(x.device), self.parameter)

    def low_rank_approximation(self, rank: int, base_weight: torch.Tensor | None = None) -> tuple[LoRA, float]:
        """Truncated-SVD LoRA of a weight delta and its relative Frobenius error."""
        if self.parameter != WEIGHT:
            raise ValueError(f"a {self.parameter} delta has no low-rank form")
        fit = fit_low_rank(self.delta, rank)
        return LoRA(up=fit.up, down=fit.down, target_shape=self.target_shape, offset=self.offset), fit.relative_error

    def swap_output_halves(self) -> "WeightDiff":
        """Rows ``[a; b] -> [b; a]``."""
        return replace(self, delta=swap_row_halves(self.delta))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "WeightDiff":
        """Copy moved/cast."""
        return replace(self, delta=self.delta.to(device=device, dtype=dtype))


@dataclass(frozen=True)
class SetWeight:
    """Replacement of a parameter (``.set_weight``; BFL control LoRAs' ``*_norm.scale``)."""

    value: torch.Tensor
    target_shape: tuple[int, ...]
    offset: Offset | None = None
    parameter: str = WEIGHT

    def __post_init__(self) -> None:
        store_tensors(self, "value")
        _check("set_weight", self.value, self.target_shape, self.offset, self.parameter)

    @property
    def rank(self) -> int:
        """Full rank bound ``min(out_rows, in)`` for a matrix, 1 for a vector."""
        return min(self.value.shape) if self.value.dim() == 2 else 1

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the rows written."""
        return delta_shape_of(self.target_shape, self.offset)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``value - base`` (``base_weight`` is the whole target parameter and is required)."""
        base = base_rows(base_weight, self.offset, "set_weight")
        return (self.value.to(device=base.device, dtype=torch.float32) - base.to(torch.float32)).to(base.dtype)

    def bypass_delta(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token effect of ``value - base`` (requires ``base_weight``)."""
        return apply_parameter_delta(x, self.delta_weight(base_weight).to(x.device), self.parameter)

    def low_rank_approximation(self, rank: int, base_weight: torch.Tensor | None = None) -> tuple[LoRA, float]:
        """Truncated-SVD LoRA of ``value - base`` (weights only) and its relative error."""
        if self.parameter != WEIGHT:
            raise ValueError(f"a {self.parameter} replacement has no low-rank form")
        fit = fit_low_rank(self.delta_weight(base_weight), rank)
        return LoRA(up=fit.up, down=fit.down, target_shape=self.target_shape, offset=self.offset), fit.relative_error

    def swap_output_halves(self) -> "SetWeight":
        """Rows ``[a; b] -> [b; a]``."""
        return replace(self, value=swap_row_halves(self.value))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SetWeight":
        """Copy moved/cast."""
        return replace(self, value=self.value.to(device=device, dtype=dtype))
