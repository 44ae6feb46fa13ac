"""Gates through ComfyUI's own samplers on a tiny Flux: schedule values per step against a reference table
(ComfyUI's sigma -> percent included), LoRA Switch and LoRA Composite by their definitions, no weight
re-patched during sampling, and learned-gate training on the tiny model."""
from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.samplers
import pytest
import torch
from comfy_models import flux_inputs
from lora_loom.composition.adapter_gate import AdapterGate, parse_keyframes
from lora_loom.composition.comfy_bridge.gate_training import (
    GateBatch,
    fresh_gates,
    train_learned_gates,
)
from lora_loom.composition.comfy_bridge.merged import apply_merged
from lora_loom.composition.comfy_bridge.stack import install_gated
from lora_loom.composition.gates import GateSchedule, flux_sigma_to_percent
from lora_loom.composition.runtime.gated import GatedOptions

sys.path.insert(0, str(Path(__file__).parent))  # the regional mechanism tests' helpers
from test_regional_mechanism import apply_model, entry, flux_modules, lora_set

STEPS = 4


@pytest.fixture(scope="module")
def inputs(flux):
    return flux_inputs(flux, latent_hw=(8, 8))


@pytest.fixture(scope="module")
def loras(flux):
    return [lora_set(flux, flux_modules(flux), seed=1, name="a"), lora_set(flux, flux_modules(flux), seed=2, name="b")]


def gated(entry_, schedule: GateSchedule | None = None):
    return replace(entry_, gate=AdapterGate(lora=entry_.row.lora, schedule=schedule))


def record_gates(runtime) -> list[dict]:
    """Replace the runtime's gate hook (on the instance) by one that records every layer's answer, per pass."""
    calls: list[dict] = []
    hook = runtime.adapter_gates

    def recording(block_type: str, block_index: int):
        values = hook(block_type, block_index)
        (state,) = runtime.current
        if not calls or calls[-1]["percent"] != state.percent or calls[-1]["solo"] != state.solo:
            calls.append({"percent": state.percent, "solo": state.solo, "values": {}})
        calls[-1]["values"][(block_type, block_index)] = values
        return values

    runtime.adapter_gates = recording
    return calls


def sample(patcher, inputs, steps: int = STEPS) -> torch.Tensor:
    """ComfyUI's ``comfy.sample.sample`` (euler, simple, cfg 1) on the tiny model; models unloaded after."""
    positive = [[inputs["context"], {"pooled_output": inputs["y"], "guidance": 3.5}]]
    negative = [[torch.zeros_like(inputs["context"]), {"pooled_output": inputs["y"], "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    comfy.model_management.unload_all_models()
    try:
        return comfy.sample.sample(patcher, noise, steps, 1.0, "euler", "simple", positive, negative, latent,
                                   disable_pbar=True, seed=7)
    finally:
        comfy.model_management.unload_all_models()


# keyframes, interpolation, reference gate at the start of each of 4 steps (simple scheduler: progress i/4)
REFERENCE = [
    ("0:1, 0.4:0.2", "hold", [1.0, 1.0, 0.2, 0.2]),
    ("0:1, 1:0", "linear", [1.0, 0.75, 0.5, 0.25]),
    ("0:0, 1:1", "cosine", [0.0, (1 - math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(3 * math.pi / 4)) / 2]),
    # step 2's sigma is a hair above percent_to_sigma(0.5) (ComfyUI's 1000-entry sigma table), so by ComfyUI's
    # own rule "sigma <= percent_to_sigma(q)" a keyframe at 0.5 starts at step 3, not 2
    ("0:0, 0.5:1", "hold", [0.0, 0.0, 0.0, 1.0]),
]


@pytest.mark.parametrize("keyframes,interpolation,expected", REFERENCE)
def test_schedule_values_per_step_match_the_reference_table(flux, inputs, loras, keyframes, interpolation, expected):
    schedule = GateSchedule("a", parse_keyframes(keyframes), interpolation)
    result = install_gated(flux, [gated(entry(loras[0]), schedule)])
    calls = record_gates(result.runtime)
    sample(result.model, inputs)
    assert len(calls) == STEPS
    sampling = flux.model.model_sampling
    shift = sampling.shift
    if interpolation == "hold":  # the table agrees with ComfyUI's hook-keyframe rule on the scheduler's sigmas
        sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", STEPS)[:-1]
        rule = [[k.value for k in schedule.keyframes if float(s) <= sampling.percent_to_sigma(k.progress)][-1]
                for s in sigmas]
        assert rule == expected
    for call, want in zip(calls, expected):
        gates = {values[0] for values in call["values"].values()}
        assert len(gates) == 1  # no block weights: one value in every block
        assert abs(gates.pop() - want) <= 2e-3, (call["percent"], want)
    percents = [c["percent"] for c in calls]
    assert percents == sorted(percents) and abs(percents[0]) < 1e-6
    for step, percent in enumerate(percents):
        assert abs(percent - step / STEPS) <= 1e-3  # ComfyUI's sigma -> percent for Flux's simple scheduler
    # the bisection inverse agrees with the closed form of ModelSamplingFlux.percent_to_sigma
    for percent in percents:
        sigma = flux.model.model_sampling.percent_to_sigma(percent)
        assert abs(flux_sigma_to_percent(sigma, shift) - percent) <= 1e-6


def test_lora_switch_runs_one_adapter_per_step_in_turn(flux, inputs, loras):
    result = install_gated(flux, [entry(loras[0]), entry(loras[1])], GatedOptions("switch", switch_every=1))
    calls = record_gates(result.runtime)
    sample(result.model, inputs)
    active = [[i for i, v in enumerate(next(iter(c["values"].values()))) if v != 0.0] for c in calls]
    assert active == [[0], [1], [0], [1]]
    every_two = install_gated(flux, [entry(loras[0]), entry(loras[1])], GatedOptions("switch", switch_every=2))
    calls = record_gates(every_two.runtime)
    sample(every_two.model, inputs)
    assert [[i for i, v in enumerate(next(iter(c["values"].values()))) if v != 0.0] for c in calls] == \
        [[0], [0], [1], [1]]
    # at step 1 the switch model is exactly "only b"
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    result.model.model_options["transformer_options"]["sample_sigmas"] = sigmas
    out = apply_model(result.model, inputs["x"], 0.75, inputs["context"], inputs["y"])
    only_b = apply_model(install_gated(flux, [entry(loras[1])]).model, inputs["x"], 0.75, inputs["context"],
                         inputs["y"])
    assert torch.allclose(out, only_b, atol=1e-6, rtol=0)


def test_lora_composite_averages_one_pass_per_adapter(flux, inputs, loras):
    result = install_gated(flux, [entry(loras[0], 0.9), entry(loras[1], 0.7)], GatedOptions("composite"))
    out = apply_model(result.model, inputs["x"], 0.6, inputs["context"], inputs["y"])
    assert result.gates.calls == 2
    passes = [apply_model(install_gated(flux, [e]).model, inputs["x"], 0.6, inputs["context"], inputs["y"])
              for e in (entry(loras[0], 0.9), entry(loras[1], 0.7))]
    assert torch.allclose(out, (passes[0] + passes[1]) / 2, atol=1e-6, rtol=0)
    both = apply_model(install_gated(flux, [entry(loras[0], 0.9), entry(loras[1], 0.7)]).model, inputs["x"], 0.6,
                       inputs["context"], inputs["y"])
    assert not torch.allclose(out, both, atol=1e-4)  # composite is not the summed LoRAs
    late_only = install_gated(flux, [gated(entry(loras[0]), GateSchedule.window("a", 1.0, 0.5, 1.0)),
                                     entry(loras[1])], GatedOptions("composite"))
    early = apply_model(late_only.model, inputs["x"], 0.95, inputs["context"], inputs["y"])
    assert late_only.gates.calls == 1  # a is off early: one pass, b alone
    assert torch.allclose(early, apply_model(install_gated(flux, [entry(loras[1])]).model, inputs["x"], 0.95,
                                             inputs["context"], inputs["y"]), atol=1e-6, rtol=0)


def _count_patching(clone, inputs, steps: int) -> tuple[list[str], int]:
    """Sample ``steps`` steps; the weight keys ComfyUI patched and the number of unpatch calls meanwhile."""
    keys: list[str] = []
    unpatched = [0]
    patch, unpatch = clone.patch_weight_to_device, clone.unpatch_model

    def counting_patch(key, *args, **kwargs):
        keys.append(key)
        return patch(key, *args, **kwargs)

    def counting_unpatch(*args, **kwargs):
        unpatched[0] += 1
        return unpatch(*args, **kwargs)

    clone.patch_weight_to_device, clone.unpatch_model = counting_patch, counting_unpatch  # this clone only
    positive = [[inputs["context"], {"pooled_output": inputs["y"], "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 8, 8)
    comfy.model_management.unload_all_models()
    try:
        comfy.sample.sample(clone, torch.randn(latent.shape, generator=torch.Generator().manual_seed(1)), steps, 1.0,
                            "euler", "simple", positive, positive, latent, disable_pbar=True, seed=1)
        return list(keys), unpatched[0]
    finally:
        comfy.model_management.unload_all_models()
        del clone.patch_weight_to_device, clone.unpatch_model


def test_no_weight_is_repatched_during_sampling(flux, inputs, loras):
    """A merged LoRA upstream (real weight patches) + a gated row whose gate changes every step: ComfyUI
    visits each weight once when it loads the model, whatever the number of steps."""
    merged = apply_merged(flux, None, [entry(loras[1], 0.5)]).model
    result = install_gated(merged, [gated(entry(loras[0]), GateSchedule("a", parse_keyframes("0:1, 1:0"),
                                                                         "linear"))])
    clone = result.model
    calls = record_gates(result.runtime)
    short_keys, short_unpatch = _count_patching(clone, inputs, 2)
    calls.clear()
    keys, unpatched = _count_patching(clone, inputs, 6)
    assert len(calls) == 6 and len({c["values"][("double", 0)] for c in calls}) == 6  # the gate really moved
    assert len(keys) == len(set(keys)) and set(clone.patches) <= set(keys)  # each weight written once
    assert keys == short_keys and unpatched == short_unpatch <= 1  # no growth with steps (load bookkeeping only)


def test_learned_gates_train_on_the_tiny_model(flux, inputs, loras):
    modules = ["double_blocks.0.img_attn.qkv", "double_blocks.1.img_mlp.2", "single_blocks.0.linear2"]
    gates = fresh_gates(flux, modules)
    before = {k: v.clone() for k, v in gates.state_dict().items()}
    weights_before = {k: v.clone() for k, v in flux.model.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    batch = GateBatch(clean=torch.randn(1, 16, 8, 8, generator=gen), context=inputs["context"], pooled=inputs["y"],
                      mismatched=torch.randn(inputs["context"].shape, generator=gen))
    reports = train_learned_gates(flux, [entry(loras[0])], gates, batch, steps=6, lr=5e-2, resample=False)
    assert len(reports) == 6 and reports[-1].loss < reports[0].loss
    assert all(math.isfinite(r.loss) and r.loss >= r.flow_loss for r in reports)
    assert any(not torch.equal(before[k], v) for k, v in gates.state_dict().items())
    assert all(torch.equal(weights_before[k], v) for k, v in flux.model.state_dict().items())
    assert not any(p.requires_grad for p in gates.parameters())
