"""LoRA-Composer latent refinement on a tiny Flux: one gradient step per sampling step in inference mode, losses
recorded, the image changes, no gradients left on weights."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import torch
from comfy_models import tiny_flux

sys.path.insert(0, str(Path(__file__).parent))  # the regional mechanism tests' helpers
from lora_loom.composition.comfy_bridge.refine import RefineWrapper
from lora_loom.composition.plan import ComposeOptions
from lora_loom.composition.refine import RefineOptions
from test_regional_mechanism import (
    LEFT,
    RIGHT,
    box_region,
    compose_clone,
    entry,
    flux_modules,
    lora_set,
    prompts,
)


def composed(flux, refine: bool):
    a = lora_set(flux, flux_modules(flux), seed=1, name="a")
    b = lora_set(flux, flux_modules(flux), seed=2, name="b")
    regions = [box_region(LEFT, [entry(a)], prompt="left"), box_region(RIGHT, [entry(b)], prompt="right")]
    encoded = prompts(flux, 4, [3, 3])
    options = ComposeOptions(latent_reinit=False, refinement=refine, refine=RefineOptions(step=2.0))
    clone, _ = compose_clone(flux, regions, options, encoded)
    kind = comfy.patcher_extension.WrappersMP.PREDICT_NOISE
    wrappers = [w for group in clone.wrappers.get(kind, {}).values() for w in group if isinstance(w, RefineWrapper)]
    assert len(wrappers) == int(refine)
    wrapper = wrappers[0] if refine else None
    return clone, encoded, wrapper


def run(clone, encoded, steps: int = 3) -> tuple[torch.Tensor, float]:
    latent = torch.zeros(1, 16, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    pooled = {"pooled_output": torch.zeros(1, 32)}
    positive = [[encoded.context, pooled]]
    negative = [[torch.zeros_like(encoded.context), pooled]]
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            out = comfy.sample.sample(clone, noise, steps, 1.0, "euler", "simple", positive, negative, latent,
                                      seed=0, disable_pbar=True)
    finally:
        comfy.model_management.unload_all_models()
    return out, (time.perf_counter() - start) / steps


def test_refinement_steps_the_latent_in_inference_mode_and_leaves_weights_alone():
    with torch.inference_mode():
        flux = tiny_flux(seed=0)  # inference-tensor weights, as in a ComfyUI node
    plain_clone, encoded, _ = composed(flux, refine=False)
    refined_clone, _, wrapper = composed(flux, refine=True)
    plain, plain_s = run(plain_clone, encoded)
    refined, refined_s = run(refined_clone, encoded)
    assert len(wrapper.losses) == 3 and all(torch.isfinite(torch.tensor(wrapper.losses)))
    assert torch.isfinite(refined).all() and (refined - plain).abs().max() > 1e-4
    assert all(p.grad is None for p in flux.model.parameters())
    assert flux.wrappers == {} and flux.object_patches == {}
    print(f"refinement cost: {plain_s * 1000:.0f} ms/step plain, {refined_s * 1000:.0f} ms/step refined")
