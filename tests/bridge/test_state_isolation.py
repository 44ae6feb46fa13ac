"""Per-token Loom models sample the same image whatever ran before them, and leave the next run unchanged.

ComfyUI restores a model's weights lazily: after a merged LoRA run the shared model still holds the merged weights
until another patcher takes the model over. A per-token wrapper must therefore compute with whatever ComfyUI has put
in place at sampling time, never with weights captured when the node ran. Every Loom per-token mode (Loom Compose,
the gated stack in each mode, CLoRA, and chains of them on one runtime: a gated stack into Loom Compose, Loom CLoRA
into Loom Compose, LoRA Composite into Loom CLoRA) is sampled first, then again after each kind of predecessor (a
merged Loom stack, ComfyUI's own LoRA loader, core hook LoRAs, another Loom mode, another base model), and must be
bit-identical; a plain run after it must be bit-identical to a plain run before it. No test here unloads models
between runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import comfy.hooks
import comfy.model_management
import comfy.sample
import pytest
import torch
from comfy_models import tiny_flux

sys.path.insert(0, str(Path(__file__).parent))  # the regional mechanism tests' helpers
from lora_loom.composition.clora import CLoraOptions
from lora_loom.composition.comfy_bridge.clora import clora_controller
from lora_loom.composition.comfy_bridge.merged import apply_merged
from lora_loom.composition.comfy_bridge.runtime import install
from lora_loom.composition.comfy_bridge.stack import install_gated
from lora_loom.composition.plan import ComposeOptions
from lora_loom.composition.prompts import EncodedPrompt
from lora_loom.composition.runtime.clora import CLoraConcept
from lora_loom.composition.runtime.gated import GatedOptions
from lora_loom.composition.runtime.layers import LoomLinear
from test_regional_mechanism import box_region, compose_clone, entry, flux_modules, lora_set, prompts

T, CONTEXT, POOLED = 8, 48, 32


@pytest.fixture(scope="module")
def sets(flux):
    modules = flux_modules(flux)
    return [lora_set(flux, modules, seed=s, scale=2.0, name=f"l{s}") for s in (1, 2, 3)]


def _cond(context: torch.Tensor, pooled: torch.Tensor | None = None) -> list:
    pooled = torch.zeros(1, POOLED) if pooled is None else pooled
    return [[context, {"pooled_output": pooled, "guidance": 3.5}]]


PLAIN = _cond(torch.randn(1, T, CONTEXT, generator=torch.Generator().manual_seed(11)))


def sample(patcher, positive) -> torch.Tensor:
    latent = torch.zeros(1, 16, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, 2, 1.0, "euler", "simple", positive, positive, latent,
                                   seed=0, disable_pbar=True)


def _compose(flux, sets):
    encoded = prompts(flux, T, [4, 4])
    regions = [box_region((0.0, 0.0, 0.5, 1.0), (entry(sets[0]),)),
               box_region((0.5, 0.0, 1.0, 1.0), (entry(sets[1]),))]
    clone, _ = compose_clone(flux, regions, ComposeOptions(latent_reinit=False), encoded)
    return clone, _cond(encoded.context)


def _gated(mode: str):
    def build(flux, sets):
        clone = install_gated(flux, [entry(sets[0]), entry(sets[1], 0.7)], GatedOptions(mode=mode)).model
        return clone, PLAIN
    return build


def _clora(flux, sets):
    g = torch.Generator().manual_seed(7)
    made = [EncodedPrompt(f"p{i}", torch.randn(1, T, CONTEXT, generator=g),
                          {"pooled_output": torch.randn(1, POOLED, generator=g)}, None,
                          {j: (1 + 2 * j,) for j in range(2)} if i == 0 else {i - 1: (2 + i,)}) for i in range(3)]
    concepts = [CLoraConcept(made[i + 1].text, f"c{i}", (entry(sets[i]),)) for i in range(2)]
    clone = install(flux, clora_controller(concepts, made, CLoraOptions(iterations=0), 2)).model
    return clone, _cond(made[0].context, made[0].pooled)


def _chained(first, second):
    """``second`` installed on the MODEL ``first`` returned: one runtime running both (sampled with the
    conditioning of ``second``)."""
    def build(flux, sets):
        upstream, _ = first(flux, sets)
        return second(upstream, sets)
    return build


PER_TOKEN = {"compose": _compose, "gated": _gated("gated"), "switch": _gated("switch"),
             "composite": _gated("composite"), "clora": _clora,
             "gated>compose": _chained(_gated("gated"), _compose), "clora>compose": _chained(_clora, _compose),
             "composite>clora": _chained(_gated("composite"), _clora)}


def _merged_stack(flux, sets):
    return apply_merged(flux, None, [entry(sets[2], 1.5)]).model


def _core_lora(flux, sets):
    import comfy.sd

    patches = {}
    for module, (lora,) in sets[2].adapters.items():
        patches[f"diffusion_model.{module}.lora_up.weight"] = lora.up
        patches[f"diffusion_model.{module}.lora_down.weight"] = lora.down
        patches[f"diffusion_model.{module}.alpha"] = torch.tensor(lora.alpha)
    model, _ = comfy.sd.load_lora_for_models(flux, None, patches, 1.5, 0.0)
    return model


def _hooks(flux, sets):
    lora = {f"diffusion_model.{m}.{part}": getattr(a, attr) for m, (a,) in sets[2].adapters.items()
            for part, attr in (("lora_up.weight", "up"), ("lora_down.weight", "down"))}
    hooks = comfy.hooks.create_hook_lora(lora, strength_model=1.5, strength_clip=0.0)
    return flux.clone(), [[c, dict(o, hooks=hooks)] for c, o in PLAIN]


PREDECESSORS = {
    "merged_stack": lambda flux, sets: sample(_merged_stack(flux, sets), PLAIN),
    "core_lora": lambda flux, sets: sample(_core_lora(flux, sets), PLAIN),
    "hooks": lambda flux, sets: sample(*_hooks(flux, sets)),
    "other_loom_mode": lambda flux, sets: sample(*_gated("gated")(flux, sets[1:])),
    "other_base_model": lambda flux, sets: sample(tiny_flux(seed=5), PLAIN),
}


@pytest.fixture(scope="module")
def references(flux, sets):
    """Each per-token mode sampled before anything else touched the model (a fresh model per mode)."""
    out = {}
    for name, build in PER_TOKEN.items():
        fresh = tiny_flux(seed=0)
        out[name] = sample(*build(fresh, sets))
    out["plain"] = sample(tiny_flux(seed=0), PLAIN)
    return out


@pytest.mark.parametrize("predecessor", list(PREDECESSORS))
@pytest.mark.parametrize("mode", list(PER_TOKEN))
def test_per_token_run_is_bit_identical_whatever_ran_before(flux, sets, references, mode, predecessor):
    before = PREDECESSORS[predecessor](flux, sets)
    assert not torch.equal(before, references["plain"]) or predecessor == "other_base_model"
    built = PER_TOKEN[mode](flux, sets)  # the node runs while the predecessor's state is still in place
    assert torch.equal(sample(*built), references[mode]), f"{mode} after {predecessor} differs"
    assert torch.equal(sample(*built), references[mode]), f"{mode} twice after {predecessor} differs"
    assert torch.equal(sample(flux, PLAIN), references["plain"]), f"plain run after {mode} differs"


def test_merged_after_per_token_is_unchanged(flux, sets, references):
    merged_first = sample(_merged_stack(tiny_flux(seed=0), sets), PLAIN)
    for build in PER_TOKEN.values():
        sample(*build(flux, sets))
        assert torch.equal(sample(_merged_stack(flux, sets), PLAIN), merged_first)


def test_wrapper_is_a_view_of_the_live_module(flux, sets):
    clone, _ = _compose(flux, sets)
    key = "diffusion_model.double_blocks.0.img_attn.qkv"
    wrapper, original = clone.object_patches[key], flux.get_model_object(key)
    assert isinstance(wrapper, LoomLinear) and not isinstance(original, LoomLinear)
    replaced = torch.nn.Parameter(original.weight.detach() * 2, requires_grad=False)
    saved = original.weight
    try:
        original.weight = replaced  # what ComfyUI's set_attr_param does when it patches or restores a weight
        assert wrapper.weight is replaced
    finally:
        original.weight = saved
    assert not any(name.startswith("loom_") for name in vars(original))
    chained, _ = _chained(_gated("gated"), _compose)(flux, sets)  # a downstream runtime re-views the same module
    assert chained.object_patches[key].__dict__ is original.__dict__
    assert type(chained.object_patches[key]) is type(wrapper)
    comfy.model_management.unload_all_models()
