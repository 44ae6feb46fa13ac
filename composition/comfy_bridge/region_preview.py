"""What ``Loom Region`` / ``Loom Regions`` / ``Loom Region Preview`` compute: region lists and a picture of them.

``LOOM_REGIONS`` is a tuple of :class:`ComposedRegion` (the plan region plus its loaded adapters). The preview
draws each region on the canvas — a box outline or a tinted mask — with its index, prompt and adapter names,
as a ComfyUI IMAGE ``[1, H, W, 3]`` float32 in [0, 1].
"""
from __future__ import annotations

import logging
import textwrap
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..plan import ComposedRegion, PlanError, Region, RegionMask, RegionOptions
from ..stack import StackEntry

logger = logging.getLogger(__name__)

COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60))
MAX_LABEL = 48


def make_region(prompt: str, box: tuple[float, float, float, float], mask: torch.Tensor | None = None,
                entries: Sequence[StackEntry] = (), isolate: bool = True,
                previous: Sequence[ComposedRegion] | None = None) -> tuple[ComposedRegion, ...]:
    """``previous`` + one region. ``mask`` (a ComfyUI MASK ``[B, H, W]`` or ``[H, W]``) overrides ``box``."""
    index = len(previous or ())
    if mask is not None:
        region = Region(prompt=prompt, mask=RegionMask.from_array(mask, index), options=RegionOptions(isolate=isolate))
    else:
        region = Region(prompt=prompt, box=tuple(float(v) for v in box), options=RegionOptions(isolate=isolate))
    region.validate(index)
    return tuple(previous or ()) + (ComposedRegion(region, tuple(entries)),)


def combine_regions(*groups: Sequence[ComposedRegion] | None) -> tuple[ComposedRegion, ...]:
    """Concatenate region lists in order (missing inputs skipped); at least one region is required."""
    out = tuple(r for group in groups if group for r in group)
    if not out:
        raise PlanError("Loom Regions: connect at least one region list")
    return out


def _label(region: ComposedRegion, index: int) -> str:
    prompt = " ".join(region.region.prompt.split())
    prompt = prompt if len(prompt) <= MAX_LABEL else prompt[:MAX_LABEL - 1] + "…"
    names = ", ".join(e.name.rsplit("/", 1)[-1].removesuffix(".safetensors") for e in region.entries)
    return f"{index + 1}. {prompt}" + (f" [LoRA: {names}]" if names else "")


def _label_lines(text: str, width_px: int, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont) -> list[str]:
    """``text`` wrapped to ``width_px`` (long words split), so a label never runs out of its region."""
    char = max(1.0, draw.textlength("abcdefghij", font=font) / 10)
    return textwrap.wrap(text, max(4, int((width_px - 6) / char)), break_long_words=True) or [""]


def preview_image(regions: Sequence[ComposedRegion], width: int, height: int) -> torch.Tensor:
    """Regions drawn on a ``width x height`` canvas: IMAGE ``[1, H, W, 3]`` float32."""
    if width <= 0 or height <= 0:
        raise PlanError(f"Loom Region Preview: canvas {width}x{height} must be positive")
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    overlay = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default()
    line = max(1, min(width, height) // 128)
    for i, composed in enumerate(regions):
        colour = COLOURS[i % len(COLOURS)]
        region = composed.region
        if region.mask is not None:
            mask = region.mask.to_tensor()
            mask = mask[0] if mask.ndim == 3 else mask
            resized = torch.nn.functional.interpolate(mask[None, None], size=(height, width), mode="bilinear",
                                                      align_corners=False)[0, 0].clamp(0, 1)
            alpha = Image.fromarray((resized.numpy() * 110).astype(np.uint8), mode="L")
            tint = Image.new("RGBA", (width, height), colour + (0,))
            tint.putalpha(alpha)
            overlay = Image.alpha_composite(overlay, tint)
            draw = ImageDraw.Draw(overlay)
            ys, xs = np.nonzero(resized.numpy() > 0.5)
            anchor = (int(xs.min()) if xs.size else 0, int(ys.min()) if ys.size else 0)
        else:
            x0, y0, x1, y1 = region.normalised_box()
            rect = (x0 * width, y0 * height, x1 * width - 1, y1 * height - 1)
            draw.rectangle(rect, fill=colour + (50,), outline=colour + (255,), width=line)
            anchor = (int(rect[0]), int(rect[1]))
        room = int((x1 - x0) * width) if region.mask is None else width - anchor[0]
        for row, text in enumerate(_label_lines(_label(composed, i), room, draw, font)):
            at = (anchor[0] + 3, anchor[1] + 3 + 12 * row)
            draw.rectangle(draw.textbbox(at, text, font=font), fill=(0, 0, 0, 170))
            draw.text(at, text, fill=colour + (255,), font=font)
    image = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
