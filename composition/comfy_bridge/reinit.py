"""LoRA-Composer latent re-initialisation on Flux, as a ``SAMPLER_SAMPLE`` wrapper on the composed clone.

Before the first step, one probing pass of the model on the initial noisy latent collects, in every double block,
each concept's attention map: the probability that image queries put on the region prompt's content tokens
(explicit q·k probes with a full softmax, so the map covers the whole canvas, not only the box the rules allow),
averaged over heads, tokens and blocks. For every box region, a box-sized window slides over its concept's map;
the noise under the best-scoring window is copied into the box. The noise is then renormalised to its original
per-sample mean and standard deviation. Mask regions are left alone; img2img (a non-empty latent) is skipped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...kernels.probes import text_to_image_maps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenBox:
    """A region's box on the token grid, half-open: rows ``[top, bottom)``, columns ``[left, right)``."""

    region: int
    top: int
    left: int
    bottom: int
    right: int


def token_boxes(regions: tuple, grid_h: int, grid_w: int) -> list[TokenBox]:
    """Token-grid boxes of the box regions (rounded to whole tokens, at least one token each way)."""
    boxes = []
    for k, region in enumerate(regions):
        if region.box is None:
            continue
        x0, y0, x1, y1 = region.normalised_box()
        top, left = min(int(round(y0 * grid_h)), grid_h - 1), min(int(round(x0 * grid_w)), grid_w - 1)
        bottom, right = max(int(round(y1 * grid_h)), top + 1), max(int(round(x1 * grid_w)), left + 1)
        boxes.append(TokenBox(k, top, left, min(bottom, grid_h), min(right, grid_w)))
    return boxes


def best_window(attention: torch.Tensor, height: int, width: int) -> tuple[int, int]:
    """Top-left token ``(row, col)`` of the ``height x width`` window with the largest attention sum;
    attention ``[grid_h, grid_w]``. Ties go to the first window in raster order."""
    sums = F.avg_pool2d(attention[None, None].float(), (height, width), stride=1)[0, 0]  # [gh-h+1, gw-w+1]
    index = int(torch.argmax(sums.flatten()))
    return index // sums.shape[1], index % sums.shape[1]


def reinitialise_noise(noise: torch.Tensor, maps: torch.Tensor, boxes: list[TokenBox], patch: int) -> torch.Tensor:
    """Copy, per sample and box, the best window of the original noise into the box, then renormalise.

    noise ``[B, C, H, W]``; maps ``[B, N_regions, grid_h, grid_w]`` (concept attention on the token grid).
    Returns a new ``[B, C, H, W]`` tensor with each sample's original mean and std.
    """
    out = noise.clone()
    for b in range(noise.shape[0]):
        for box in boxes:
            h, w = box.bottom - box.top, box.right - box.left
            row, col = best_window(maps[b, box.region], h, w)
            if (row, col) == (box.top, box.left):
                continue
            src = noise[b, :, row * patch:(row + h) * patch, col * patch:(col + w) * patch]
            dst = out[b, :, box.top * patch:box.bottom * patch, box.left * patch:box.right * patch]
            rows, cols = min(src.shape[-2], dst.shape[-2]), min(src.shape[-1], dst.shape[-1])
            dst[:, :rows, :cols] = src[:, :rows, :cols]
    dims = tuple(range(1, noise.ndim))
    mean, std = noise.mean(dim=dims, keepdim=True), noise.std(dim=dims, keepdim=True)
    new_mean, new_std = out.mean(dim=dims, keepdim=True), out.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return (out - new_mean) / new_std * std + mean


class ConceptMaps:
    """A probe for the regional attention: accumulates concept maps ``[B, N, grid_h, grid_w]`` over double
    blocks for the composed batch entries."""

    def __init__(self, controller: Any):
        self.controller = controller
        self.total: torch.Tensor | None = None
        self.count = 0
        self.entries: list[int] = []

    def observe(self, q: torch.Tensor, k: torch.Tensor, layout: Any, block_type: str, block_index: int) -> None:
        if block_type != "double":
            return
        entries = [b for b, composed in enumerate(layout.composed) if composed]
        if not entries:
            return
        concepts = self.controller.prompt.concepts
        positions = [concepts[k] for k in sorted(concepts)]
        text_index = torch.tensor([p for region in positions for p in region], device=q.device)
        grid_h, grid_w = layout.grid
        start = layout.text_length
        image_index = torch.arange(start, start + grid_h * grid_w, device=q.device)
        index = torch.tensor(entries, device=q.device)
        with torch.no_grad():
            maps = text_to_image_maps(q.index_select(0, index), k.index_select(0, index), text_index, image_index,
                                      grid_h, grid_w)  # [b, T_concepts, gh, gw]
        per_region, offset = [], 0
        for region in positions:
            per_region.append(maps[:, offset:offset + len(region)].mean(dim=1))
            offset += len(region)
        stacked = torch.stack(per_region, dim=1).float().cpu()  # [b, N, gh, gw]
        self.total = stacked if self.total is None else self.total + stacked
        self.count += 1
        self.entries = entries

    def maps(self) -> torch.Tensor | None:
        return None if self.total is None else self.total / self.count


class ReinitWrapper:
    """``WrappersMP.SAMPLER_SAMPLE``: probe once, re-initialise the noise, then sample as usual."""

    def __init__(self, controller: Any):
        self.controller = controller

    def __deepcopy__(self, memo: dict) -> "ReinitWrapper":
        return self

    def __call__(self, executor: Any, guider: Any, sigmas: torch.Tensor, extra_args: dict, callback: Any,
                 noise: torch.Tensor, latent_image: torch.Tensor | None = None, denoise_mask: Any = None,
                 disable_pbar: bool = False) -> torch.Tensor:
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            logger.info("latent re-initialisation skipped: the latent is not empty (img2img)")
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        noise = self.reinitialised(executor.class_obj, guider, sigmas, extra_args, noise, latent_image)
        return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)

    def reinitialised(self, sampler: Any, guider: Any, sigmas: torch.Tensor, extra_args: dict,
                      noise: torch.Tensor, latent_image: torch.Tensor | None) -> torch.Tensor:
        """The probing pass and the window copy; returns the new noise ``[B, C, H, W]``."""
        controller = self.controller
        model_sampling = guider.inner_model.model_sampling
        latent = latent_image if latent_image is not None else torch.zeros_like(noise)
        max_denoise = bool(sampler.max_denoise(guider, sigmas)) if hasattr(sampler, "max_denoise") else True
        x = model_sampling.noise_scaling(sigmas[0], noise, latent, max_denoise)
        probe = ConceptMaps(controller)
        previous = controller.probe
        controller.probe = probe
        try:
            with torch.no_grad():
                guider(x, sigmas[0] * x.new_ones((x.shape[0],)), model_options=extra_args.get("model_options", {}),
                       seed=extra_args.get("seed"))
        finally:
            controller.probe = previous
        maps = probe.maps()
        if maps is None:
            logger.warning("latent re-initialisation skipped: no batch entry carried the composed prompt")
            return noise
        grid_h, grid_w = maps.shape[-2:]
        boxes = token_boxes(controller.plan.regions, grid_h, grid_w)
        per_sample = maps[:noise.shape[0]] if maps.shape[0] >= noise.shape[0] else maps[:1].expand(
            noise.shape[0], *maps.shape[1:])
        logger.debug("latent re-initialisation: %d boxes on a %dx%d token grid", len(boxes), grid_h, grid_w)
        return reinitialise_noise(noise, per_sample.to(noise.device), boxes, controller.patch_size)
