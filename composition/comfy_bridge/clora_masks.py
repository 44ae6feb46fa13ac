"""CLoRA's masks after sampling: a ComfyUI MASK, a preview IMAGE and ``LOOM_REGIONS`` for ``Loom Compose``.

``Loom CLoRA`` outputs its :class:`~..runtime.clora.CLoraController` as a ``LOOM_CLORA`` handle; every cond model call
of a sampler using its MODEL records the concept masks of that call (the last call wins: the final step's masks).
``Loom CLoRA Masks`` takes the handle and the sampler's LATENT (only so ComfyUI runs it after sampling) and turns the
record into masks at image resolution (latent size × 8), regions (one per LoRA: its prompt, its mask, its adapters)
and a picture of them (``region_preview.preview_image``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..clora import CLoraError
from ..plan import ComposedRegion
from .region_preview import make_region, preview_image

logger = logging.getLogger(__name__)

VAE_SCALE = 8


@dataclass(frozen=True)
class CLoraMasks:
    """masks ``[N, H, W]`` (one per LoRA, image pixels, 0/1), maps ``[N, H, W]`` (normalised attention), regions
    (``LOOM_REGIONS``) and preview ``[1, H, W, 3]``."""

    masks: torch.Tensor
    maps: torch.Tensor
    regions: tuple[ComposedRegion, ...]
    preview: torch.Tensor


def masks_at(composition: Any, height: int, width: int, sample: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The recorded masks and maps of batch entry ``sample`` resized to ``height x width``: ``[N, H, W]`` each."""
    record = composition.record
    if record is None:
        raise CLoraError("Loom CLoRA Masks: no masks recorded yet; connect the LATENT of a sampler that used "
                         "Loom CLoRA's MODEL (with the composition's prompt as its positive)")
    index = min(sample, record.masks.shape[0] - 1)
    masks = F.interpolate(record.masks[index][None].float(), size=(height, width), mode="nearest")[0]
    maps = record.maps[index].float()
    low = maps.flatten(1).min(dim=1).values[:, None, None]
    high = maps.flatten(1).max(dim=1).values[:, None, None]
    maps = (maps - low) / (high - low).clamp_min(1e-12)
    maps = F.interpolate(maps[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return masks.clamp(0, 1), maps.clamp(0, 1)


def clora_masks(composition: Any, latent: dict | torch.Tensor | None = None, sample: int = 0) -> CLoraMasks:
    """Masks, regions and preview from the latest sampling run (image size from the latent ``[B, C, h, w]``)."""
    samples = latent.get("samples") if isinstance(latent, dict) else latent
    if samples is not None:
        height, width = int(samples.shape[-2]) * VAE_SCALE, int(samples.shape[-1]) * VAE_SCALE
    else:
        h, w = composition.record.latent_hw if composition.record is not None else (64, 64)
        height, width = h * VAE_SCALE, w * VAE_SCALE
    masks, maps = masks_at(composition, height, width, sample)
    regions: tuple[ComposedRegion, ...] = ()
    for i, concept in enumerate(composition.concepts):
        mask = masks[i]
        if float(mask.max()) <= 0.0:
            logger.warning("CLoRA LoRA %d (%s): empty mask; its region covers nothing", i + 1, concept.concept)
        regions = make_region(concept.prompt, (0.0, 0.0, 1.0, 1.0), mask[None], concept.entries, True, regions)
    return CLoraMasks(masks, maps, regions, preview_image(list(regions), width, height))
