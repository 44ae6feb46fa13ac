"""LoRA-Composer test-time latent refinement: losses and schedule (pure torch; optional, off by default).

Maps are on the token grid ``[h, w]``; a region's box is a :class:`Box` in token cells (half-open).

- concept enhancement ``8 · max(0, 1 − mean(top-20% of the Gaussian-smoothed in-box attention))`` per concept
  token (the token's map is first scaled by its max), averaged over the region's tokens;
- fill ``2 · L1`` between the max projections of the (max-scaled) attention on x and y and the box's own
  projections (1 inside the box's columns / rows, 0 outside);
- region ``10 · mean(top-k self-attention from the region's image queries to image keys outside the region)``;
- step size ``lr_i = 20 · sqrt(linspace(1, 0.5, T)[i])``; stop when the loss rises after step 5, or at step 25.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .clora import step_sizes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Box:
    """Token-grid box, rows ``[top, bottom)`` and columns ``[left, right)``."""

    top: int
    left: int
    bottom: int
    right: int

    def mask(self, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
        out = torch.zeros(h, w, device=device)
        out[self.top:self.bottom, self.left:self.right] = 1.0
        return out


@dataclass(frozen=True)
class RefineOptions:
    """Weights and schedule of the refinement (the authors' defaults)."""

    enhance_weight: float = 8.0
    fill_weight: float = 2.0
    region_weight: float = 10.0
    top_fraction: float = 0.2
    region_top_k: int = 10
    smooth_sigma: float = 0.5
    smooth_kernel: int = 3
    step: float = 20.0
    max_steps: int = 25
    patience_after: int = 5


def gaussian_smooth(maps: torch.Tensor, sigma: float = 0.5, kernel: int = 3) -> torch.Tensor:
    """Gaussian blur of ``maps [..., h, w]`` (reflect padding), shape kept."""
    coords = torch.arange(kernel, dtype=torch.float32, device=maps.device) - kernel // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    weight = (g[:, None] * g[None, :])[None, None].to(maps.dtype)
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    pad = kernel // 2
    out = F.conv2d(F.pad(flat, (pad, pad, pad, pad), mode="reflect") if pad else flat, weight)
    return out.reshape(maps.shape)


def _scaled(maps: torch.Tensor) -> torch.Tensor:
    return maps / maps.flatten(-2).max(dim=-1).values[..., None, None].clamp_min(1e-12)


def enhancement_loss(token_maps: torch.Tensor, box: Box, options: RefineOptions = RefineOptions()) -> torch.Tensor:
    """``token_maps [T, h, w]`` of one region's concept tokens -> weight · mean_t max(0, 1 − mean(top-20% in box))."""
    smooth = gaussian_smooth(_scaled(token_maps), options.smooth_sigma, options.smooth_kernel)
    inside = smooth[:, box.top:box.bottom, box.left:box.right].flatten(1)  # [T, n]
    k = max(1, int(round(options.top_fraction * inside.shape[1])))
    top = inside.topk(k, dim=1).values.mean(dim=1)
    return options.enhance_weight * torch.clamp(1.0 - top, min=0.0).mean()


def fill_loss(token_maps: torch.Tensor, box: Box, options: RefineOptions = RefineOptions()) -> torch.Tensor:
    """weight · L1 between the max projections on x and y of ``token_maps [T, h, w]`` and the box's projections."""
    maps = _scaled(token_maps)
    h, w = maps.shape[-2:]
    box_mask = box.mask(h, w, maps.device)
    x_loss = (maps.amax(dim=-2) - box_mask.amax(dim=0)).abs().mean()
    y_loss = (maps.amax(dim=-1) - box_mask.amax(dim=1)).abs().mean()
    return options.fill_weight * (x_loss + y_loss)


def region_loss(self_attention: torch.Tensor, region_mask: torch.Tensor,
                options: RefineOptions = RefineOptions()) -> torch.Tensor:
    """weight · mean(top-k attention from the region's queries to keys outside it).

    self_attention ``[Lq, L_img]``: probabilities from the region's image queries to every image key;
    region_mask ``[L_img]`` (1 inside the region)."""
    outside = self_attention * (1.0 - region_mask.to(self_attention))[None, :]
    k = min(options.region_top_k, outside.shape[1])
    return options.region_weight * outside.topk(k, dim=1).values.mean()


def refinement_step_sizes(steps: int, options: RefineOptions = RefineOptions()) -> list[float]:
    """``lr_i = step · sqrt(linspace(1, 0.5, steps)[i])``."""
    return step_sizes(options.step, steps)


def should_stop(step: int, losses: list[float], options: RefineOptions = RefineOptions()) -> bool:
    """Stop refining at ``max_steps``, or when the loss rose at a step after ``patience_after``."""
    if step >= options.max_steps:
        return True
    return step > options.patience_after and len(losses) >= 2 and losses[-1] > losses[-2]
