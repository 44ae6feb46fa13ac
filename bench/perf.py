"""``loom bench perf``: per-step time and peak memory of every composition method, side by side in one run.

One *step* is one sampler step through ComfyUI's own sampling (``CFGGuider`` at cfg 1, euler): conds, masks, hook
groups, wrappers and attention overrides all run as in a workflow. Each method samples ``steps`` steps; the time
between consecutive step callbacks is one step (set-up, model loading and the first step are excluded). Methods are
interleaved ``repeats`` times within a row and the median of all their steps is kept, so a shared or busy machine
slows every method alike and the ratios (vs the merged-LoRA step of the same row) compare like with like.
Peak memory is measured on a separate two-step run after a warm-up (:mod:`.memory`). Each row carries the FLOP limit
(:mod:`.flops`): a ratio reads against it. Every prompt is ``prompt_tokens`` long, except that Loom's regional
method keeps ``region_tokens`` of each region prompt (Loom Compose trims a region prompt's padding after its end
token; the peers — hooks, CLoRA, dense per-head — do not trim); the limit counts the same.
"""
from __future__ import annotations

import itertools
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.samplers
import torch

from ..composition.plan import ComposeOptions
from ..composition.regional import active_rules, allowed_groups, base_allowed
from ..kernels.joint_attention import grouped_layout
from . import baselines
from .compose import bench_model, random_adapters
from .flops import FluxShape, method_flops
from .memory import measure_peak

logger = logging.getLogger(__name__)

MODELS: dict[str, dict[str, Any]] = {
    "small": dict(hidden_size=256, num_heads=4, depth=1, depth_single_blocks=1, context_in_dim=64, vec_in_dim=64,
                  axes_dim=[16, 24, 24]),
    "demo": dict(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1, context_in_dim=768, vec_in_dim=768,
                 axes_dim=[16, 56, 56]),
    "flux-dev": dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, context_in_dim=4096,
                     vec_in_dim=768, axes_dim=[16, 56, 56]),
}
METHODS = ("base", "merged", "regional", "regional_noblend", "gates", "clora", "hooks", "dense_per_head", "composite")


class PerfError(ValueError):
    """A harness option is out of range; the message names it."""


@dataclass(frozen=True)
class PerfConfig:
    """A sweep: ``model`` preset, ``adapters`` × ``regions`` × ``resolutions`` (pixels, square), LoRA ``rank``,
    ``prompt_tokens`` of every prompt, ``region_tokens`` of each region prompt in Loom's regional method (default
    12: what Loom Compose keeps of a few-word CLIP-L region prompt once it trims the padding after the end token;
    0 = ``prompt_tokens``, untrimmed; the peers always sample full-length prompts), ``steps`` sampled per method
    and repeat, ``repeats``, ``methods``, ``dtype``, ``memory`` (the one-step peak probe), ``device`` (None =
    ComfyUI's)."""

    model: str = "small"
    adapters: tuple[int, ...] = (1, 4)
    regions: tuple[int, ...] = (1, 4)
    resolutions: tuple[int, ...] = (256,)
    rank: int = 16
    prompt_tokens: int = 77
    region_tokens: int = 12
    steps: int = 4
    repeats: int = 3
    methods: tuple[str, ...] = METHODS
    dtype: str = "auto"
    memory: bool = True
    device: str | None = None

    def validate(self) -> PerfConfig:
        if self.model not in MODELS:
            raise PerfError(f"model: {self.model!r} is not one of {sorted(MODELS)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise PerfError(f"methods: unknown {unknown}; choose from {METHODS}")
        if self.steps < 2 or self.repeats < 1:
            raise PerfError(f"steps/repeats: need steps >= 2 and repeats >= 1, got {self.steps}, {self.repeats}")
        if any(r % 16 for r in self.resolutions):
            raise PerfError(f"resolutions: {self.resolutions} must be multiples of 16")
        if self.prompt_tokens < 1 or self.region_tokens < 0:
            raise PerfError(f"prompt_tokens/region_tokens: need prompt_tokens >= 1 and region_tokens >= 0 "
                            f"(0 = prompt_tokens), got {self.prompt_tokens}, {self.region_tokens}")
        return self

    @property
    def region_length(self) -> int:
        """Tokens of each of Loom regional's region prompts: ``region_tokens``, or ``prompt_tokens`` when it is 0
        (untrimmed) or larger (trimming never lengthens a prompt)."""
        return min(self.region_tokens or self.prompt_tokens, self.prompt_tokens)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]


@dataclass(frozen=True)
class PerfRow:
    """One method in one (resolution, adapters, regions) cell, ``image_tokens`` + ``text_tokens`` per pass (the
    context actually sampled: global + trimmed region prompts for regional, global + full region prompts for
    dense_per_head, one full-length region prompt for a hook pass).
    ``step_ms`` median, ``step_ms_min``/``max`` its
    spread, ``samples`` steps timed; ``ratio`` = step / merged step of the cell; ``limit`` = FLOPs / merged
    FLOPs; ``peak_mib`` extra memory of one step; ``note`` says why a method is missing or how it was measured."""

    model: str
    device: str
    resolution: int
    adapters: int
    regions: int
    method: str
    image_tokens: int = 0
    text_tokens: int = 0
    passes: int = 0
    step_ms: float = float("nan")
    step_ms_min: float = float("nan")
    step_ms_max: float = float("nan")
    samples: int = 0
    ratio: float = float("nan")
    tflops: float = float("nan")
    limit: float = float("nan")
    peak_mib: float = float("nan")
    note: str = ""


@dataclass
class _Timing:
    steps: list[float] = field(default_factory=list)


def flux_shape(patcher: Any) -> FluxShape:
    cfg = patcher.model.model_config.unet_config
    return FluxShape(hidden=cfg["hidden_size"], heads=cfg["num_heads"], depth=cfg["depth"],
                     depth_single=cfg["depth_single_blocks"], mlp_ratio=cfg["mlp_ratio"],
                     in_channels=cfg["in_channels"], patch_size=cfg["patch_size"],
                     context_dim=cfg["context_in_dim"], vec_dim=cfg["vec_in_dim"])


def sample_steps(setup: baselines.MethodSetup, latent: torch.Tensor, steps: int, seed: int = 0) -> list[float]:
    """Sample ``steps`` euler steps at cfg 1 with ComfyUI's guider; milliseconds of steps 2..n (callback gaps)."""
    guider = comfy.samplers.CFGGuider(setup.model)
    guider.set_conds(setup.positive, setup.positive)
    guider.set_cfg(1.0)
    sigmas = comfy.samplers.calculate_sigmas(setup.model.get_model_object("model_sampling"), "simple", steps)
    stamps: list[float] = []
    device = comfy.model_management.get_torch_device()

    def callback(step: int, x0: torch.Tensor, x: torch.Tensor, total: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, callback=callback,
                      disable_pbar=True, seed=seed)
    return [(b - a) * 1000.0 for a, b in itertools.pairwise(stamps)]


def build_setup(method: str, patcher: Any, scene: baselines.Scene, folder: Path,
                latent_hw: tuple[int, int]) -> baselines.MethodSetup | str:
    """The method's setup, or a note saying why it is not available."""
    if method == "base":
        return baselines.base_setup(patcher, scene)
    if method == "merged":
        return baselines.merged_setup(patcher, scene)
    if method == "regional":
        return baselines.regional_setup(patcher, scene)
    if method == "regional_noblend":
        return baselines.regional_setup(patcher, scene, method=method, options=ComposeOptions(
            latent_reinit=False, end_percent=1.0, base_blend=False))
    if method == "dense_per_head":
        return baselines.dense_per_head_setup(patcher, scene)
    if method == "hooks":
        return baselines.hooks_setup(patcher, scene, folder, latent_hw)
    if method == "composite":
        return baselines.composite_setup(patcher, scene, folder)
    return {"gates": baselines.gates_setup, "clora": baselines.clora_setup}[method](patcher, scene)


def attention_pairs(setup: baselines.MethodSetup, image_tokens: int) -> tuple[float | None, float | None]:
    """(regional, base-blend) query-key pairs per block that the grouped path computes for this composition."""
    composition = setup.composition
    if composition is None:
        return None, None
    plan = composition.plan
    side = round(image_tokens ** 0.5) * composition.patch_size
    layout = composition.layout_for(side, side, 1, 1, 0, (True,), torch.device("cpu"))
    labels = layout.chunks[0][1]
    rules = active_rules(plan, "double", 0, 0.0)
    regional = allowed_groups(plan, rules)
    base = base_allowed(plan, regional)

    def pairs(allowed: torch.Tensor) -> float:
        lay = grouped_layout(labels, allowed, "cpu")
        return float(sum(int(b.query_index.numel()) * (int(b.key_index.numel()) if b.key_index is not None
                                                         else int(labels.numel())) for b in lay.blocks))

    return pairs(regional), (pairs(base) if rules.base_blend else None)


def run_cell(patcher: Any, config: PerfConfig, resolution: int, adapters: int, regions: int,
             folder: Path) -> list[PerfRow]:
    """Every method of one (resolution, adapters, regions) cell, interleaved ``repeats`` times."""
    cfg = patcher.model.model_config.unet_config
    device = comfy.model_management.get_torch_device()
    latent_hw = (resolution // 8, resolution // 8)
    latent = torch.zeros(1, cfg["in_channels"], *latent_hw)
    entries = random_adapters(patcher, adapters, config.rank)
    scene = baselines.make_scene(entries, regions, config.prompt_tokens, cfg["context_in_dim"], cfg["vec_in_dim"],
                                 region_tokens=config.region_length)
    setups: dict[str, baselines.MethodSetup] = {}
    notes: dict[str, str] = {}
    for method in config.methods:
        built = build_setup(method, patcher, scene, folder, latent_hw)
        if isinstance(built, str):
            notes[method] = built
        else:
            setups[method] = built
    peaks: dict[str, float] = {}
    for method, setup in setups.items():
        sample_steps(setup, latent, 2)  # warm-up: weights patched and loaded, caches and layouts built
        if config.memory:
            peaks[method] = measure_peak(lambda s=setup: sample_steps(s, latent, 2), device).peak_mib
    timings = {m: _Timing() for m in setups}
    for repeat in range(config.repeats):
        for method, setup in setups.items():
            timings[method].steps += sample_steps(setup, latent, config.steps, seed=repeat)
    comfy.model_management.unload_all_models()  # unpatch; drop hook weight caches before the next cell
    shape = flux_shape(patcher)
    image_tokens = (latent_hw[0] // shape.patch_size) * (latent_hw[1] // shape.patch_size)
    merged_ms = statistics.median(timings["merged"].steps) if "merged" in timings else float("nan")
    rows = []
    for method in config.methods:
        common = dict(model=config.model, device=str(device), resolution=resolution, adapters=adapters,
                      regions=regions, method=method)
        if method in notes:
            rows.append(PerfRow(**common, note=notes[method]))
            continue
        setup = setups[method]
        regional_pairs, base_pairs = (attention_pairs(setup, image_tokens) if method.startswith("regional")
                                       else (None, None))
        work = method_flops(method, shape, image_tokens, config.prompt_tokens, adapters, regions, config.rank,
                            regional_pairs=regional_pairs, base_pairs=base_pairs, region_tokens=config.region_length)
        steps = timings[method].steps
        step = statistics.median(steps)
        peak = peaks.get(method, float("nan"))
        text = int(setup.positive[0][0].shape[1])
        rows.append(PerfRow(**common, image_tokens=image_tokens, text_tokens=text, passes=setup.passes, step_ms=step,
                            step_ms_min=min(steps), step_ms_max=max(steps), samples=len(steps), ratio=step / merged_ms,
                            tflops=work.flops.total / 1e12, limit=work.limit, peak_mib=peak))
        logger.info("perf %s %d² %d adapters %d regions %s: %.1f ms (x%.3f, limit x%.3f)", config.model, resolution,
                    adapters, regions, method, step, step / merged_ms, work.limit)
    return rows


def preset_model(config: PerfConfig) -> Any:
    """The random-weight Flux ModelPatcher of ``config.model`` in ``config``'s dtype on ComfyUI's device."""
    device = comfy.model_management.get_torch_device()
    return bench_model(config.torch_dtype(torch.device(device)), **MODELS[config.model])


def run_perf(config: PerfConfig, patcher: Any = None,
             progress: Callable[[PerfRow], None] | None = None) -> list[PerfRow]:
    """Run the sweep; ``patcher`` overrides the model preset (a Flux ModelPatcher)."""
    config.validate()
    patcher = patcher if patcher is not None else preset_model(config)
    rows: list[PerfRow] = []
    with tempfile.TemporaryDirectory(prefix="loom-perf-") as tmp:
        for resolution in config.resolutions:
            for adapters in config.adapters:
                for regions in config.regions:
                    if regions > adapters:
                        continue  # a region without an adapter measures nothing new
                    for row in run_cell(patcher, config, resolution, adapters, regions, Path(tmp)):
                        rows.append(row)
                        if progress is not None:
                            progress(row)
    return rows


__all__ = ["METHODS", "MODELS", "PerfConfig", "PerfError", "PerfRow", "attention_pairs",
           "build_setup", "flux_shape", "preset_model", "run_cell", "run_perf", "sample_steps"]
