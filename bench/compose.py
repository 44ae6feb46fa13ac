"""``loom bench compose``: per-step time of regional composition against the merged-LoRA baseline.

For every (adapter count, region count) the same random LoRAs (rank ``rank`` on every block Linear) are applied
two ways to one Flux model: merged into the weights (ComfyUI's patch system, the classic path) and composed
per region (this pack: per-token adapters + attention rules, rules active). One "step" is one
``BaseModel.apply_model`` call; each is timed ``repeats`` times after a warm-up and the median is kept. All rows
come from one run in one process, so the ratios compare like with like.
"""
from __future__ import annotations

import logging
import statistics
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch

from ..composition.adapters import AdapterSet, LoRA
from ..composition.comfy_bridge.flux_model import flux_model
from ..composition.comfy_bridge.merged import apply_merged
from ..composition.comfy_bridge.regional import build_plan, regional_controller
from ..composition.comfy_bridge.runtime import install
from ..composition.plan import ComposedRegion, ComposeOptions, Region, TextSpans
from ..composition.prompts import EncodedPrompt
from ..composition.stack import StackEntry, StackRow

logger = logging.getLogger(__name__)

BENCH_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=64,
                  hidden_size=256, mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=4, axes_dim=[16, 24, 24],
                  theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


@dataclass(frozen=True)
class BenchRow:
    """One measurement: milliseconds per step (median) merged vs composed, and composed / merged."""

    adapters: int
    regions: int
    merged_ms: float
    composed_ms: float

    @property
    def ratio(self) -> float:
        return self.composed_ms / self.merged_ms if self.merged_ms > 0 else float("inf")


def bench_model(dtype: torch.dtype = torch.float32, **overrides: Any) -> comfy.model_patcher.ModelPatcher:
    """A small random ComfyUI Flux in a ModelPatcher (the shape of Flux, not its size, unless overridden)."""
    model = flux_model({**BENCH_FLUX, **overrides}, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.02)).to(dtype))
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def random_adapters(patcher: Any, count: int, rank: int) -> list[StackEntry]:
    """``count`` random LoRAs of ``rank`` on every Linear of the double and single blocks."""
    shapes = {k.removeprefix("diffusion_model.").removesuffix(".weight"): tuple(v.shape)
              for k, v in patcher.model.state_dict().items()
              if k.startswith("diffusion_model.") and k.endswith(".weight") and v.ndim == 2}
    entries = []
    for i in range(count):
        adapters = {}
        for module, (out, inp) in shapes.items():
            if not module.startswith(("double_blocks.", "single_blocks.")):
                continue
            gen = torch.Generator().manual_seed(i * 7919 + zlib.crc32(module.encode()))
            adapters[module] = (LoRA(up=torch.randn(out, rank, generator=gen) * 0.1,
                                     down=torch.randn(rank, inp, generator=gen) / inp ** 0.5,
                                     target_shape=(out, inp), alpha=float(rank)),)
        name = f"bench_{i}"
        entries.append(StackEntry(StackRow(lora=name, strength=1.0 / count),
                                  AdapterSet(source=name, format="bench", adapters=adapters), name))
    return entries


def step_ms(patcher: Any, x: torch.Tensor, context: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one ``apply_model`` call with the patcher's patches, options and wrappers."""
    patcher.patch_model()
    try:
        options = comfy.patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
        comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), patcher.wrappers,
                                                   copy_dict1=False)
        options["cond_or_uncond"] = [0]
        sigma = torch.full((x.shape[0],), 0.98, device=x.device)
        guidance = torch.full((x.shape[0],), 3.5, device=x.device)
        times = []
        with torch.inference_mode():
            for i in range(repeats + 1):
                if x.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options, y=y,
                                          guidance=guidance)
                if x.device.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first call warms up
                    times.append((time.perf_counter() - start) * 1000.0)
        return statistics.median(times)
    finally:
        patcher.unpatch_model()


def run_compose_bench(model: Any = None, adapter_counts: Sequence[int] = (1, 2, 4, 8),
                      region_counts: Sequence[int] = (1, 2, 3, 4), latent_hw: tuple[int, int] = (32, 32),
                      prompt_tokens: int = 32, rank: int = 16, repeats: int = 3,
                      attention_path: str = "grouped") -> list[BenchRow]:
    """Time merged vs composed for every (adapters, regions); adapter i paints region ``i % regions``.

    model: a Flux ModelPatcher (default: :func:`bench_model`). Regions are vertical strips of equal width;
    rules (injection, isolation, base blend) are active for the timed step.
    """
    patcher = model if model is not None else bench_model()
    width = patcher.model.model_config.unet_config["context_in_dim"]
    device = patcher.load_device
    dtype = patcher.model_dtype()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, *latent_hw, generator=gen).to(device, dtype)
    y = torch.randn(1, patcher.model.model_config.unet_config["vec_in_dim"], generator=gen).to(device, dtype)
    rows = []
    for count in adapter_counts:
        entries = random_adapters(patcher, count, rank)
        merged = apply_merged(patcher, None, entries).model
        for n_regions in region_counts:
            regions = [ComposedRegion(Region(prompt=f"region {k}", box=(k / n_regions, 0.0, (k + 1) / n_regions, 1.0)),
                                      tuple(e for i, e in enumerate(entries) if i % n_regions == k))
                       for k in range(n_regions)]
            spans = TextSpans.from_lengths(prompt_tokens, [prompt_tokens] * n_regions)
            context = torch.randn(1, spans.total, width, generator=gen)
            prompt = EncodedPrompt("bench", context, {}, None,
                                   {k: tuple(range(s.start, s.end)) for k, s in enumerate(spans.region_spans)}, spans)
            options = ComposeOptions(latent_reinit=False, attention_path=attention_path, end_percent=1.0)
            controller = regional_controller(build_plan("bench", regions, options), prompt, regions,
                                             int(patcher.model.diffusion_model.patch_size))
            composed = install(patcher, controller).model
            context = context.to(device, dtype)
            merged_ms = step_ms(merged, x, context, y, repeats)
            composed_ms = step_ms(composed, x, context, y, repeats)
            row = BenchRow(count, n_regions, merged_ms, composed_ms)
            logger.info("bench compose: %d adapters, %d regions: merged %.1f ms, composed %.1f ms (x%.2f)",
                        count, n_regions, merged_ms, composed_ms, row.ratio)
            rows.append(row)
    return rows
