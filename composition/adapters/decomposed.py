"""DoRA (weight-decomposed LoRA): a magnitude vector ``m`` (``dora_scale``) wrapping a LoRA / LoHa / LoKr.

With ``W`` the base rows ``[out, in]`` and ``D`` the inner adapter's delta:
``W' = (W + D) · m / ‖W + D‖`` and ``ΔW = W' - W``. Two axis conventions exist in files:

* output axis (PEFT, LyCORIS ``wd_on_out=True``): ``m [out, 1]`` (or ``[out]``), norm of each ROW over ``in``;
* input axis (early LyCORIS): ``m [1, in]``, norm of each COLUMN over ``out``.

PEFT's ``lora_magnitude_vector`` (``[out]``) is always the output axis: PEFT's ``get_weight_norm`` takes
``‖W + s·B@A‖`` over ``dim=1`` of the ``[out, in]`` weight (its "column-wise" comment uses the paper's
``[in, out]`` layout) and the forward is ``(m / ‖·‖ - 1)·W x + (m / ‖·‖)·s·B A x``.

On a slice of a fused layer (a ``to_q`` LoRA on ``img_attn.qkv``, an ``offset`` adapter) ``W`` is the slice's own
rows, as in the separate Linear the file was trained on. Output-axis norms are per row, so they are the same
whether taken on the slice or on the fused weight, and only the slice's rows change. Input-axis norms are
per column over the slice's rows only: that is what a split-trained file means (OneTrainer writes per-input
``dora_scale`` on split ``to_q``/``to_k``/``to_v`` only when it trained them split) and it is not expressible
as one DoRA on the fused weight, so each slice is evaluated on its own rows and the results are placed at
their offsets.

ComfyUI picks the axis with ``m.shape[0] == out`` (``weight_decompose`` in comfy/weight_adapter/base.py) and adds
``finfo(W.dtype).eps`` to the norm; we do the same. On the output axis ComfyUI 0.3.75 takes the norm of the
BASE weight rather than of ``W + D``; ``norm_source="base"`` reproduces that, the default ``"merged"`` follows
the DoRA paper, PEFT and LyCORIS. Strength is applied by the caller to the whole ``ΔW`` (as ComfyUI does).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from .common import WEIGHT, base_rows, fit_low_rank, store_tensors, swap_row_halves
from .hadamard import LoHa
from .kronecker import LoKr
from .lowrank import LoRA

logger = logging.getLogger(__name__)

NORM_SOURCES = ("merged", "base")


@dataclass(frozen=True)
class DoRA:
    """Magnitude-direction decomposition around ``inner``; needs the base weight for every evaluation."""

    inner: LoRA | LoHa | LoKr
    magnitude: torch.Tensor
    norm_source: str = "merged"

    def __post_init__(self) -> None:
        if self.norm_source not in NORM_SOURCES:
            raise ValueError(f"DoRA norm_source {self.norm_source!r} not in {NORM_SOURCES}")
        store_tensors(self, "magnitude")
        rows, cols = self.inner.delta_shape
        m = self.magnitude
        if m.dim() == 1:
            m = m.reshape(-1, 1) if m.shape[0] == rows else m.reshape(1, -1)
        if tuple(m.shape) not in ((rows, 1), (1, cols)):
            raise ValueError(f"dora_scale {tuple(self.magnitude.shape)} fits neither [{rows}, 1] nor [1, {cols}]")
        object.__setattr__(self, "magnitude", m)

    @property
    def on_output_axis(self) -> bool:
        """True for ``m [out, 1]`` (row norms), False for ``m [1, in]`` (column norms)."""
        return self.magnitude.shape[0] == self.inner.delta_shape[0] and self.magnitude.shape[1] == 1

    target_shape = property(lambda self: self.inner.target_shape, doc="Whole target parameter shape.")
    offset = property(lambda self: self.inner.offset, doc="Rows written (from the inner adapter).")
    delta_shape = property(lambda self: self.inner.delta_shape, doc="Shape of the rows written.")
    rank = property(lambda self: self.inner.rank, doc="Rank of the inner adapter.")
    parameter = WEIGHT

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``[out_rows, in]``: ``(W + D) · m / ‖·‖ - W`` in float32, returned in the base dtype."""
        base = base_rows(base_weight, self.offset, "DoRA")
        w = base.to(torch.float32)
        merged = w + self.inner.delta_weight().to(device=w.device, dtype=torch.float32)
        eps = torch.finfo(base.dtype).eps
        if self.on_output_axis:
            source = w if self.norm_source == "base" else merged
            norm = source.norm(dim=1, keepdim=True)
        else:
            norm = merged.norm(dim=0, keepdim=True)
        m = self.magnitude.to(device=w.device, dtype=torch.float32)
        return (merged * (m / (norm + eps)) - w).to(base.dtype)

    def bypass_delta(self, x: torch.Tensor, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., in] -> [..., out_rows]`` (exact dense path; requires ``base_weight``)."""
        return x @ self.delta_weight(base_weight).to(device=x.device, dtype=x.dtype).T

    def low_rank_approximation(self, rank: int, base_weight: torch.Tensor | None = None) -> tuple[LoRA, float]:
        """Truncated-SVD LoRA of the DoRA delta (requires ``base_weight``) and its relative error."""
        fit = fit_low_rank(self.delta_weight(base_weight), rank)
        return LoRA(up=fit.up, down=fit.down, target_shape=self.target_shape, offset=self.offset), fit.relative_error

    def swap_output_halves(self) -> "DoRA":
        """Rows ``[a; b] -> [b; a]`` (the magnitude too, on the output axis)."""
        m = swap_row_halves(self.magnitude) if self.on_output_axis else self.magnitude
        return replace(self, inner=self.inner.swap_output_halves(), magnitude=m)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "DoRA":
        """Copy moved/cast."""
        return replace(self, inner=self.inner.to(device=device, dtype=dtype),
                       magnitude=self.magnitude.to(device=device, dtype=dtype))
