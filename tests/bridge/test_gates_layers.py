"""Gates inside the per-token layers, on a real tiny ComfyUI Flux: gate 1 == the ungated layer, gate 0 == no
LoRA (bit for bit, matmuls skipped), block gates, learned gate == its formula, regions carry gates, and the
gated stack agrees with the merged LoRA."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from comfy_models import flux_inputs
from lora_loom.composition.adapter_gate import AdapterGate
from lora_loom.composition.block_weights import parse_block_weights
from lora_loom.composition.comfy_bridge.merged import apply_merged
from lora_loom.composition.comfy_bridge.stack import install_gated
from lora_loom.composition.gates import GateSchedule, Keyframe
from lora_loom.composition.learned_gate import (
    load_learned_gates,
    write_synthetic_checkpoint,
)
from lora_loom.composition.plan import ComposeOptions
from lora_loom.composition.runtime import layers
from lora_loom.composition.runtime.gated import GatedOptions, GatedState
from lora_loom.composition.runtime.layers import LoomLinear

sys.path.insert(0, str(Path(__file__).parent))  # the regional mechanism tests' helpers
from test_regional_mechanism import (
    apply_model,
    box_region,
    compose_clone,
    entry,
    flux_modules,
    in_call,
    lora_set,
    prompts,
)

SIGMA = 0.6


@pytest.fixture(scope="module")
def inputs(flux):
    data = flux_inputs(flux, latent_hw=(8, 8))
    return data


@pytest.fixture(scope="module")
def loras(flux):
    return [lora_set(flux, flux_modules(flux), seed=1, name="a", split_qkv=True),
            lora_set(flux, flux_modules(flux), seed=2, name="b")]


def gated(entry_, schedule: GateSchedule | None = None, learned=None) -> object:
    return replace(entry_, gate=AdapterGate(lora=entry_.row.lora, schedule=schedule, learned=learned))


def run(patcher, inputs, sigma: float = SIGMA) -> torch.Tensor:
    return apply_model(patcher, inputs["x"], sigma, inputs["context"], inputs["y"])


def test_gate_one_everywhere_equals_the_ungated_layer_bit_for_bit(flux, inputs, loras):
    entries = [gated(entry(loras[0], 0.8), GateSchedule.constant("a", 1.0)), gated(entry(loras[1], 0.5))]
    result = install_gated(flux, entries)
    with_gates = run(result.model, inputs)
    result.runtime.adapter_gates = lambda block_type, block_index: None  # no gates: the plain per-token path
    plain = run(result.model, inputs)
    assert torch.equal(with_gates, plain)
    merged = run(apply_merged(flux, None, [entry(loras[0], 0.8), entry(loras[1], 0.5)]).model, inputs)
    assert (merged - run(flux, inputs)).abs().max() > 1e-2  # the LoRAs matter
    assert (with_gates - merged).abs().max() <= 2e-5


def test_gate_zero_is_bit_identical_to_no_lora_and_skips_the_matmuls(flux, inputs, loras, monkeypatch):
    chosen: list[int] = []
    exact: list[str] = []
    original_kernel = layers.masked_multi_lora_fast
    original_exact = LoomLinear._exact_delta

    def counting_kernel(x, stacked, scale, active=None):
        chosen.append(active.rank)
        return original_kernel(x, stacked, scale, active)

    def counting_exact(self, slot, x):
        exact.append(self.loom_module)
        return original_exact(self, slot, x)

    monkeypatch.setattr(layers, "masked_multi_lora_fast", counting_kernel)
    monkeypatch.setattr(LoomLinear, "_exact_delta", counting_exact)
    off = GateSchedule.constant("off", 0.0)
    result = install_gated(flux, [gated(entry(loras[0]), off), gated(entry(loras[1]), off)])
    assert torch.equal(run(result.model, inputs), run(flux, inputs))
    assert chosen == [] and exact == []  # no adapter matmul at all (modulations included)
    only_b = run(install_gated(flux, [entry(loras[1])]).model, inputs)
    half = run(install_gated(flux, [gated(entry(loras[0]), off), entry(loras[1])]).model, inputs)
    assert chosen and set(chosen) == {4}  # b's rank only: a's ranks (4 or 3 x 4 on qkv) are never gathered
    assert torch.allclose(half, only_b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spec,double_on,single_on", [("DOUBLE-ONLY", True, False), ("SINGLE-ONLY", False, True)])
def test_block_gates_equal_row_block_weights(flux, inputs, loras, spec, double_on, single_on):
    """A gate's block vector acts like the same vector in the row's ``blocks`` (merged reference)."""
    blocks = parse_block_weights(spec)
    schedule = GateSchedule("a", (Keyframe(0.0, 0.7),), "hold", blocks)
    out = run(install_gated(flux, [gated(entry(loras[0]), schedule)]).model, inputs)
    merged = run(apply_merged(flux, None, [entry(loras[0], 0.7, blocks=spec)]).model, inputs)
    assert (out - merged).abs().max() <= 2e-5
    assert double_on != single_on


@pytest.mark.parametrize("sigma,expected_on", [(0.95, True), (0.2, False)])
def test_window_gate_follows_the_sigma(flux, inputs, loras, sigma, expected_on):
    """On for the first 40 % of sampling: a high sigma gets the LoRA, a low one runs the plain model."""
    window = GateSchedule.window("a", 1.0, 0.0, 0.4)
    out = run(install_gated(flux, [gated(entry(loras[0]), window)]).model, inputs, sigma)
    with_lora = run(install_gated(flux, [entry(loras[0])]).model, inputs, sigma)
    plain = run(flux, inputs, sigma)
    assert torch.equal(out, with_lora if expected_on else plain)


def _direct_learned(layer, gate_params, x, strengths_and_slots):
    """``o + Σ w_out ⊙ σ(w_b LN_b(o) + w_l LN_l(Δ) + w_c LN_b(o) LN_l(Δ) + b) ⊙ Δ`` written out."""
    p = gate_params
    o = F.linear(x, layer.weight, layer.bias)
    width = o.shape[-1]
    out = o.clone()
    ln_o = F.layer_norm(o, (width,), p["norm_base.weight"], p["norm_base.bias"], 1e-5)
    for strength, slot in strengths_and_slots:
        delta = torch.zeros_like(o)
        rows = slice(slot.adapter.offset.start, slot.adapter.offset.stop) if slot.adapter.offset else slice(None)
        delta[..., rows] = strength * slot.adapter.bypass_delta(x)
        ln_d = F.layer_norm(delta, (width,), p["norm_lora.weight"], p["norm_lora.bias"], 1e-5)
        g = torch.sigmoid(p["weight_base"] * ln_o + p["weight_lora"] * ln_d + p["weight_cross"] * ln_o * ln_d
                          + p["bias"])
        out = out + p["weight_out"] * g * delta
    return out


@pytest.mark.parametrize("module", ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2",
                                    "single_blocks.0.linear1", "single_blocks.1.modulation.lin"])
def test_learned_gate_from_a_diffsynth_file_matches_the_formula(flux, loras, tmp_path, module):
    from safetensors.torch import load_file

    path = tmp_path / "gate.safetensors"
    write_synthetic_checkpoint(path, hidden_size=64, double_blocks=2, single_blocks=2, seed=3)
    learned = load_learned_gates(path)
    schedule = GateSchedule.constant("a", 0.5)
    entries = [gated(entry(loras[0], 0.8), schedule, learned), gated(entry(loras[1], 0.6), None, learned)]
    result = install_gated(flux, entries)
    layer = result.model.object_patches[f"diffusion_model.{module}"]
    assert len(layer.loom_learned) >= 2 and layer.loom_fast is None
    from lora_loom.composition.learned_gate import diffsynth_layer_for_comfy
    prefix = "model_dict." + diffsynth_layer_for_comfy(module).replace(".", "___") + "."
    params = {k.removeprefix(prefix): v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    assert len(params) == 9
    per_sample = "mod" in module
    x = torch.randn(2, 1 if per_sample else 10, layer.weight.shape[1], generator=torch.Generator().manual_seed(4))
    ones = torch.ones(1, 1, 1)
    result.runtime.current = (GatedState({"img": ones, "txt": ones, "joint": ones}, frozenset({0}), 0.3, None, -1),)
    try:
        out = layer(x)
    finally:
        result.runtime.current = None
    of_a = {id(a) for a in loras[0].adapters[module]}
    slots = [(0.8 * 0.5 if id(s.adapter) in of_a else 0.6, s) for s in layer.loom_learned]
    assert torch.allclose(out, _direct_learned(layer, params, x, slots), atol=1e-5, rtol=1e-5)


def test_regions_carry_their_entries_gates(flux, inputs, loras):
    """A full-canvas region whose entry has gate 0 == the region without that entry (bit for bit)."""
    options = ComposeOptions(injection=False, isolation=False, base_blend=False, latent_reinit=False,
                             start_percent=0.0, end_percent=1.0)
    encoded = prompts(flux, 4, [3])
    off = GateSchedule.window("a", 1.0, 0.5, 1.0)  # off for the first half, on later
    with_gate, composition = compose_clone(
        flux, [box_region((0, 0, 1, 1), [gated(entry(loras[0]), off), entry(loras[1])])], options, encoded)
    without, _ = compose_clone(flux, [box_region((0, 0, 1, 1), [entry(loras[1])])], options, encoded)
    early = apply_model(with_gate, inputs["x"], 0.95, encoded.context, inputs["y"])
    assert torch.equal(early, apply_model(without, inputs["x"], 0.95, encoded.context, inputs["y"]))
    late = apply_model(with_gate, inputs["x"], 0.1, encoded.context, inputs["y"])
    assert not torch.allclose(late, apply_model(without, inputs["x"], 0.1, encoded.context, inputs["y"]), atol=1e-4)
    assert len(composition.book) == 1
    layout = composition.layout_for(8, 8, 1, 1, 0, (True,), torch.device("cpu"))
    with in_call(with_gate, layout, 0.2) as runtime:
        assert runtime.adapter_gates("double", 0) == (0.0,)


def test_gated_stack_leaves_the_input_model_untouched(flux, inputs, loras):
    before = run(flux, inputs)
    result = install_gated(flux, [gated(entry(loras[0]), GateSchedule.constant("a", 0.5))],
                           GatedOptions("gated"))
    run(result.model, inputs)
    assert flux.object_patches == {} and flux.wrappers == {}
    assert torch.equal(run(flux, inputs), before)


def test_a_gated_stack_feeds_loom_compose(flux, inputs, loras):
    """Gated stack -> Loom Compose on one runtime: gate 1 == the same row merged upstream of Compose (per-token rows
    equal merged weights to fp32 rounding), gate 0 == Compose alone, bit for bit."""
    options = ComposeOptions(latent_reinit=False, start_percent=0.0, end_percent=1.0)
    encoded = prompts(flux, 4, [3, 3])
    regions = [box_region((0.0, 0.0, 0.5, 1.0), [entry(loras[1])]), box_region((0.5, 0.0, 1.0, 1.0), [])]

    def composed(upstream):
        clone, _ = compose_clone(upstream, regions, options, encoded)
        return apply_model(clone, inputs["x"], SIGMA, encoded.context, inputs["y"])

    on = composed(install_gated(flux, [gated(entry(loras[0], 0.8), GateSchedule.constant("a", 1.0))]).model)
    merged = composed(apply_merged(flux, None, [entry(loras[0], 0.8)]).model)
    alone = composed(flux)
    assert (merged - alone).abs().max() > 1e-2  # the stack's row matters
    assert (on - merged).abs().max() <= 2e-5
    off = composed(install_gated(flux, [gated(entry(loras[0]), GateSchedule.constant("a", 0.0))]).model)
    assert torch.equal(off, alone)
