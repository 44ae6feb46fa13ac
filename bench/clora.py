"""``loom bench clora``: step cost and peak memory of CLoRA against the plain model, for N LoRAs.

Per N (default 1, 2, 4) on one Flux model (``compose.bench_model`` unless given) with N random LoRAs:

- ``base``: one plain ``apply_model`` call (the model without LoRAs, one pass);
- ``fused``: one CLoRA call without a latent update (1 + N passes batched, probes, masked fusion);
- ``update``: one latent update (forward of 1 + N passes up to the last probed block, checkpointed, + backward).

Time is the median of ``repeats`` after a warm-up. Memory is the peak above the level before the call:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's resident set sampled every millisecond by a
thread (torch's CPU allocator is invisible to tracemalloc), so CPU figures are approximate.
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import comfy.patcher_extension
import torch

from ..composition.clora import CLoraOptions
from ..composition.comfy_bridge.clora import clora_controller, latent_updates
from ..composition.comfy_bridge.runtime import install
from ..composition.prompts import EncodedPrompt
from ..composition.runtime.clora import CLoraConcept
from .compose import bench_model, random_adapters

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CLoraBenchRow:
    """One N: milliseconds per call and peak extra memory (MiB) for base, fused (no update) and update."""

    loras: int
    base_ms: float
    fused_ms: float
    update_ms: float
    base_mib: float
    fused_mib: float
    update_mib: float

    @property
    def step_ratio(self) -> float:
        """(fused + update) / base: the cost of an updated CLoRA step in plain steps."""
        return (self.fused_ms + self.update_ms) / self.base_ms if self.base_ms > 0 else float("inf")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _measure(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak bytes above the starting level while ``fn`` runs."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated(device) - start)
    start, peak, running = _rss_bytes(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        running[0] = False
        thread.join()
    return float(max(0, max(peak[0], _rss_bytes()) - start))


def _timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _options_of(patcher: Any) -> dict:
    options = comfy.patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    options["cond_or_uncond"] = [0]
    return options


def run_clora_bench(model: Any = None, lora_counts: Sequence[int] = (1, 2, 4), latent_hw: tuple[int, int] = (32, 32),
                    prompt_tokens: int = 32, rank: int = 16, repeats: int = 3,
                    options: CLoraOptions = CLoraOptions()) -> list[CLoraBenchRow]:
    """Time and measure base / fused / update calls for each N in ``lora_counts``; returns one row per N."""
    patcher = model if model is not None else bench_model()
    config = patcher.model.model_config.unet_config
    device, dtype = patcher.load_device, patcher.model_dtype()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, *latent_hw, generator=gen).to(device, dtype)
    sigma = torch.full((1,), 0.9, device=device)
    guidance = torch.full((1,), 3.5, device=device)

    def prompt(concepts: dict) -> EncodedPrompt:
        return EncodedPrompt("bench", torch.randn(1, prompt_tokens, config["context_in_dim"], generator=gen),
                             {"pooled_output": torch.randn(1, config["vec_in_dim"], generator=gen)}, None, concepts)

    rows = []
    for n in lora_counts:
        entries = random_adapters(patcher, n, rank)
        base = prompt({i: (1 + i,) for i in range(n)})
        prompts = (base,) + tuple(prompt({i: (1 + i,)}) for i in range(n))
        concepts = [CLoraConcept("bench", f"c{i}", (entries[i],)) for i in range(n)]
        controller = clora_controller(concepts, prompts, options, int(patcher.model.diffusion_model.patch_size))
        clone = install(patcher, controller).model
        updates = latent_updates(clone)
        context = base.context.to(device, dtype)
        y = base.pooled.to(device, dtype)
        results: dict[str, tuple[float, float]] = {}
        for name, target in (("base", patcher), ("fused", clone)):
            target.patch_model()
            try:
                call_options = _options_of(target)

                def call(target: Any = target, call_options: dict = call_options) -> Any:
                    with torch.inference_mode():
                        return target.model.apply_model(x, sigma, c_crossattn=context, y=y, guidance=guidance,
                                                        transformer_options=call_options)
                results[name] = (_timed(call, repeats, device), _measure(call, device))
            finally:
                target.unpatch_model()
        clone.patch_model()
        try:
            model_options = {"transformer_options": _options_of(clone)}

            def update() -> Any:
                return updates.update_latent(clone.model, x, sigma, model_options, options.step_size)
            results["update"] = (_timed(update, repeats, device), _measure(update, device))
        finally:
            clone.unpatch_model()
        mib = 1.0 / (1024 * 1024)
        row = CLoraBenchRow(n, results["base"][0], results["fused"][0], results["update"][0],
                            results["base"][1] * mib, results["fused"][1] * mib, results["update"][1] * mib)
        logger.info("bench clora: N=%d base %.1f ms, fused %.1f ms, update %.1f ms (step x%.2f); peak +%.0f/%.0f/%.0f "
                    "MiB", n, row.base_ms, row.fused_ms, row.update_ms, row.step_ratio, row.base_mib,
                    row.fused_mib, row.update_mib)
        rows.append(row)
    return rows
