"""CLoRA (Meral et al. 2024) math: contrastive attention loss, latent step sizes, concept masks, fusion.

Pure torch. Shapes: a *map* is a concept's text->image attention on the token grid ``[h, w]``; a batch of them
``[M, h, w]`` with a concept label per map ``[M]`` (the same concept seen from different prompts shares a label).

- :func:`normalise_maps`: min-max per map, flattened -> ``[M, h·w]`` in [0, 1].
- :func:`contrastive_loss`: NT-Xent / InfoNCE over the normalised maps (cosine similarity / τ, τ = 0.5):
  maps with the same label are positives, different labels negatives; mean over anchors with a positive.
- :func:`step_sizes`: ``step · sqrt(linspace(1, 0.5, T))`` (the Attend-and-Excite schedule CLoRA's code reuses).
- :func:`concept_masks`: map > α·max per map (α in the authors' 0.3-0.4), optional morphology.
- :func:`fuse_predictions`: ``Σ M_i v_i / Σ M_i``; pixels no mask covers keep the base prediction.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

MORPHOLOGY = ("none", "dilate", "erode", "open", "close")


class CLoraError(ValueError):
    """Bad CLoRA options or inputs; the message names the field."""


@dataclass(frozen=True)
class CLoraOptions:
    """CLoRA switches (authors' defaults where they exist).

    temperature: NT-Xent τ. step_size: latent step ``z <- z - step·∇z`` (scaled by :func:`step_sizes`).
    update_end_percent: latent updates run while sampling percent < this (0 = no updates). iterations: gradient
    steps per updated sampling step. alpha: mask threshold α·max. morphology/kernel: mask clean-up.
    fuse_start_percent: masked fusion from this sampling percent on (before: the LoRA predictions averaged).
    map_size: longest side of the attention maps' query grid (image queries are strided to reach it).
    map_blocks: blocks whose maps are read, ``"d0-18 s0-3"`` style, ``"all-double"`` = every double block.
    """

    temperature: float = 0.5
    step_size: float = 20.0
    update_end_percent: float = 0.25
    iterations: int = 1
    alpha: float = 0.35
    morphology: str = "none"
    kernel: int = 3
    fuse_start_percent: float = 0.0
    map_size: int = 32
    map_blocks: str = "all-double"

    def validate(self) -> CLoraOptions:
        if not self.temperature > 0:
            raise CLoraError(f"clora.temperature: must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise CLoraError(f"clora.alpha: must lie in [0, 1], got {self.alpha}")
        if self.morphology not in MORPHOLOGY:
            raise CLoraError(f"clora.morphology: {self.morphology!r} is not one of {MORPHOLOGY}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise CLoraError(f"clora.kernel: must be an odd number >= 1, got {self.kernel}")
        if self.iterations < 0 or self.map_size < 1:
            raise CLoraError(f"clora.iterations/map_size: iterations >= 0 and map_size >= 1, got "
                             f"{self.iterations}, {self.map_size}")
        return self


def normalise_maps(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``[M, h, w]`` -> ``[M, h·w]``, each map min-max scaled to [0, 1] (differentiable)."""
    flat = maps.flatten(1).float()
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return (flat - low) / (high - low + eps)


def contrastive_loss(maps: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over ``maps [M, h, w]`` with concept ``labels [M]``; a scalar (0 when no anchor has a positive).

    For anchor i with positives P(i) (same label, j != i): ``-mean_{j∈P(i)} log(exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ))``
    with ``s`` the cosine similarity of the min-max-normalised maps."""
    if maps.shape[0] != labels.shape[0]:
        raise CLoraError(f"contrastive_loss: {maps.shape[0]} maps but {labels.shape[0]} labels")
    z = F.normalize(normalise_maps(maps), dim=1)
    sim = z @ z.T / temperature  # [M, M]
    m = sim.shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=sim.device)
    labels = labels.to(sim.device)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    counts = positive.sum(dim=1)
    anchors = counts > 0
    if not bool(anchors.any()):
        return sim.sum() * 0.0
    per_anchor = -(log_prob * positive).sum(dim=1)[anchors] / counts[anchors]
    return per_anchor.mean()


def step_sizes(step: float, steps: int, low: float = 0.5) -> list[float]:
    """Step size per sampling step: ``step · sqrt(linspace(1, low, steps))``."""
    if steps <= 0:
        return []
    if steps == 1:
        return [float(step)]
    return [float(step) * math.sqrt(1.0 + (low - 1.0) * i / (steps - 1)) for i in range(steps)]


def morphology(mask: torch.Tensor, operation: str, kernel: int = 3) -> torch.Tensor:
    """Binary morphology on ``mask [..., h, w]`` (0/1 floats) with a square ``kernel``; shape kept."""
    if operation == "none" or kernel <= 1:
        return mask
    shape = mask.shape
    flat = mask.reshape(-1, 1, *shape[-2:]).float()
    pad = kernel // 2

    def dilate(t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(t, kernel, stride=1, padding=pad)

    def erode(t: torch.Tensor) -> torch.Tensor:
        return -F.max_pool2d(-t, kernel, stride=1, padding=pad)

    if operation == "dilate":
        out = dilate(flat)
    elif operation == "erode":
        out = erode(flat)
    elif operation == "open":
        out = dilate(erode(flat))
    elif operation == "close":
        out = erode(dilate(flat))
    else:
        raise CLoraError(f"morphology: {operation!r} is not one of {MORPHOLOGY}")
    return out.reshape(shape).to(mask.dtype)


def concept_masks(maps: torch.Tensor, alpha: float, operation: str = "none", kernel: int = 3) -> torch.Tensor:
    """``maps [B, N, h, w]`` -> float masks ``[B, N, h, w]``: 1 where a map reaches α·(its max), else 0."""
    peak = maps.flatten(2).max(dim=2).values[..., None, None]
    mask = (maps >= alpha * peak).float()
    return morphology(mask, operation, kernel)


def resize_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, N, h, w]`` -> ``[B, N, height, width]`` (nearest: every latent pixel takes its token's value)."""
    if masks.shape[-2:] == (height, width):
        return masks
    return F.interpolate(masks.float(), size=(height, width), mode="nearest")


def fuse_predictions(base: torch.Tensor, predictions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``Σ_i M_i v_i / Σ_i M_i``; where no mask covers a pixel the base prediction.

    base ``[B, C, H, W]``; predictions ``[N, B, C, H, W]``; masks ``[B, N, H, W]`` (any non-negative weights)."""
    if predictions.shape[0] != masks.shape[1] or masks.shape[-2:] != base.shape[-2:]:
        raise CLoraError(f"fuse_predictions: {predictions.shape[0]} predictions of {tuple(base.shape)} but masks "
                         f"{tuple(masks.shape)}")
    weights = masks.to(predictions.dtype).permute(1, 0, 2, 3)[:, :, None]  # [N, B, 1, H, W]
    total = weights.sum(dim=0)  # [B, 1, H, W]
    fused = (weights * predictions).sum(dim=0) / total.clamp_min(1e-12)
    return torch.where(total > 0, fused, base)


def map_overlap(maps: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of the normalised maps of different concepts ``[N, h, w]`` (1 = same,
    0 = disjoint); what the contrastive loss pushes down."""
    n = maps.shape[0]
    if n < 2:
        return 0.0
    z = F.normalize(normalise_maps(maps), dim=1)
    sim = z @ z.T
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    return float(sim[off].mean())
