"""Loom Compose: regional composition (LoRA-Composer on Flux) installed on a cloned ModelPatcher.

``compose(model, clip, global_prompt, regions, options)``:

1. encodes the global prompt and every region prompt with the workflow's CLIP (``tokens.encode``) and concatenates
   them along the token axis (``prompts.concatenate``; Flux text position ids are zero, so this is RoPE-neutral),
   each region prompt without its padding by default;
2. builds the plan and its :class:`~..runtime.regional.RegionalController` (one adapter group per region; entries'
   gate schedules and learned gates included: nothing is re-patched during sampling);
3. installs it with the runtime (``runtime.install``): wrapped layers, attention rules, the ``APPLY_MODEL``
   wrapper — after any Loom per-token method the MODEL already carries (a gated stack, Loom CLoRA, ...);
4. with the options, LoRA-Composer's latent re-initialisation (``SAMPLER_SAMPLE``, ``reinit.py``) and test-time
   refinement (``PREDICT_NOISE``, ``refine.py``).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import comfy.patcher_extension

from ..plan import ComposedRegion, ComposeOptions, Plan, PlanError, parse_rule_blocks
from ..prompts import EncodedPrompt, concatenate
from ..runtime.regional import RegionalController
from .refine import RefineWrapper
from .reinit import ReinitWrapper
from .runtime import install
from .tokens import encode

logger = logging.getLogger(__name__)


def encode_prompts(clip: Any, global_prompt: str, region_prompts: Sequence[str],
                   trim_padding: bool = False) -> EncodedPrompt:
    """The composed prompt ``[global | region_0 | ...]``; with ``trim_padding`` each region prompt loses the
    padding after its end token."""
    if clip is None:
        raise PlanError("Loom Compose: a CLIP is required to encode the global and region prompts")
    encoded = [encode(clip, text)[0] for text in [global_prompt, *region_prompts]]
    return concatenate(encoded[0], encoded[1:], trim_padding)


def build_plan(global_prompt: str, regions: Sequence[ComposedRegion], options: ComposeOptions) -> Plan:
    """The plan of a composition (its rules follow the options)."""
    if not regions:
        raise PlanError("Loom Compose: no regions given (connect a Loom Region)")
    return Plan(global_prompt, tuple(r.region for r in regions), options).validate()


def _wrappers(controller: RegionalController, runtime: Any) -> dict:
    kinds = comfy.patcher_extension.WrappersMP
    out: dict = {}
    if controller.options.latent_reinit and any(r.box is not None for r in controller.plan.regions):
        out[kinds.SAMPLER_SAMPLE] = ReinitWrapper(controller)
    if controller.options.refinement:
        out[kinds.PREDICT_NOISE] = RefineWrapper(controller, runtime)
    return out


def regional_controller(plan: Plan, prompt: EncodedPrompt, regions: Sequence[ComposedRegion],
                        patch_size: int = 2) -> RegionalController:
    """The controller of ``plan`` over the composed ``prompt``, with the bridge's wrappers."""
    return RegionalController(plan, prompt, [r.entries for r in regions], patch_size, _wrappers)


@dataclass(frozen=True)
class ComposeResult:
    """The patched clone, the composed CONDITIONING, the controller and what was left out (module.parameter)."""

    model: Any
    conditioning: list
    composition: RegionalController
    skipped: tuple[str, ...] = field(default_factory=tuple)


def compose(model: Any, clip: Any, global_prompt: str, regions: Sequence[ComposedRegion],
            options: ComposeOptions = ComposeOptions()) -> ComposeResult:
    """Loom Compose's one function: MODEL, CLIP, prompts and regions -> patched MODEL clone + CONDITIONING."""
    plan = build_plan(global_prompt, regions, options)
    prompt = encode_prompts(clip, global_prompt, [r.region.prompt for r in regions], options.trim_region_padding)
    patch = int(getattr(model.get_model_object("diffusion_model"), "patch_size", 2))
    controller = regional_controller(plan, prompt, regions, patch)
    installed = install(model, controller)
    return ComposeResult(installed.model, [[prompt.context, dict(prompt.extra)]], controller, installed.skipped)


__all__ = ["ComposeOptions", "ComposeResult", "ComposedRegion", "build_plan", "compose", "encode_prompts",
           "parse_rule_blocks", "regional_controller"]
