"""AutoLoRA learned gate, DiffSynth checkpoint loader and training step (composition/learned_gate.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_loom.composition.learned_gate import (
    LearnedGate,
    LearnedGateError,
    comfy_module_for_diffsynth,
    diffsynth_layer_for_comfy,
    flux_gate_channels,
    gate_training_step,
    load_learned_gates,
    write_synthetic_checkpoint,
)
from safetensors.torch import save_file


def direct_gate(base: torch.Tensor, deltas: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """The AutoLoRA formula written out, with an affine LayerNorm computed by hand (eps 1e-5)."""
    def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        variance = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
        return (x - mean) / torch.sqrt(variance + 1e-5) * weight + bias
    normed_base = layer_norm(base, p["norm_base.weight"], p["norm_base.bias"])
    out = base.clone()
    for delta in deltas:
        normed_delta = layer_norm(delta, p["norm_lora.weight"], p["norm_lora.bias"])
        gate = torch.sigmoid(p["weight_base"] * normed_base + p["weight_lora"] * normed_delta
                             + p["weight_cross"] * normed_base * normed_delta + p["bias"])
        out = out + p["weight_out"] * gate * delta
    return out


@pytest.mark.parametrize("theirs,ours", [
    ("blocks.0.attn.a_to_qkv", "double_blocks.0.img_attn.qkv"),
    ("blocks.3.attn.b_to_out", "double_blocks.3.txt_attn.proj"),
    ("blocks.18.ff_a.0", "double_blocks.18.img_mlp.0"),
    ("blocks.2.ff_b.2", "double_blocks.2.txt_mlp.2"),
    ("blocks.1.norm1_a.linear", "double_blocks.1.img_mod.lin"),
    ("blocks.1.norm1_b.linear", "double_blocks.1.txt_mod.lin"),
    ("single_blocks.37.to_qkv_mlp", "single_blocks.37.linear1"),
    ("single_blocks.5.proj_out", "single_blocks.5.linear2"),
    ("single_blocks.5.norm.linear", "single_blocks.5.modulation.lin"),
])
def test_name_mapping_both_ways(theirs, ours):
    assert comfy_module_for_diffsynth(theirs) == ours
    assert diffsynth_layer_for_comfy(ours) == theirs


@pytest.mark.parametrize("call", [
    lambda: comfy_module_for_diffsynth("blocks.0.attn.to_q"),
    lambda: comfy_module_for_diffsynth("final_layer.linear"),
    lambda: diffsynth_layer_for_comfy("img_in"),
    lambda: diffsynth_layer_for_comfy("double_blocks.0.img_norm1"),
])
def test_unknown_names_raise(call):
    with pytest.raises(LearnedGateError):
        call()


def test_flux_dev_channels_match_diffsynth_patterns():
    channels = flux_gate_channels(3072)
    assert channels == {"attn.a_to_qkv": 9216, "attn.a_to_out": 3072, "ff_a.0": 12288, "ff_a.2": 3072,
                        "norm1_a.linear": 18432, "attn.b_to_qkv": 9216, "attn.b_to_out": 3072, "ff_b.0": 12288,
                        "ff_b.2": 3072, "norm1_b.linear": 18432, "to_qkv_mlp": 21504, "proj_out": 3072,
                        "norm.linear": 9216}


@pytest.mark.parametrize("prefix", ["model_dict.", ""])
@pytest.mark.parametrize("module,shape", [
    ("double_blocks.0.img_attn.qkv", (2, 5)),
    ("double_blocks.1.txt_mlp.0", (1, 3)),
    ("single_blocks.0.linear1", (2, 4)),
    ("single_blocks.0.modulation.lin", (2,)),
    ("double_blocks.0.img_mod.lin", (3,)),
])
def test_loaded_gate_matches_direct_formula(tmp_path: Path, prefix: str, module: str, shape: tuple[int, ...]):
    path = tmp_path / "gates.safetensors"
    names = write_synthetic_checkpoint(path, hidden_size=8, double_blocks=2, single_blocks=1, seed=3, prefix=prefix)
    gates = load_learned_gates(path)
    assert gates.module_names() == sorted(names) and len(names) == 2 * 10 + 3
    gate = gates.gate_for(module)
    assert gate is not None and gates.gate_for("diffusion_model." + module) is gate
    assert gates.gate_for("img_in") is None
    from safetensors.torch import load_file
    stored = load_file(str(path))
    key = prefix + diffsynth_layer_for_comfy(module).replace(".", "___")
    parameters = {name: stored[f"{key}.{name}"] for name in ("weight_base", "weight_lora", "weight_cross",
                                                              "weight_out", "bias", "norm_base.weight",
                                                              "norm_base.bias", "norm_lora.weight", "norm_lora.bias")}
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(*shape, gate.channels, generator=generator)
    deltas = torch.randn(3, *shape, gate.channels, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(gate(base, deltas), direct_gate(base, deltas, parameters), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gate(base, list(deltas)), gate(base, deltas))


def test_fresh_gate_is_plain_lora_stacking():
    gate = LearnedGate(6)
    base = torch.randn(2, 4, 6)
    deltas = torch.randn(2, 2, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(gate(base, deltas), base + deltas.sum(dim=0))


def test_gate_keeps_base_dtype():
    gate = LearnedGate(8)
    base = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        out = gate(base, torch.randn(2, 1, 3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == base.shape


def test_shape_mismatch_raises():
    with pytest.raises(LearnedGateError, match="expected \\[N, \\*base.shape\\]"):
        LearnedGate(8)(torch.randn(1, 3, 8), torch.randn(2, 1, 4, 8))


@pytest.mark.parametrize("tensors,reason", [
    ({"model_dict.blocks___0___attn___a_to_qkv.weight_gate": torch.ones(3)}, "weight_gate"),
    ({"model_dict.blocks___0___attn___to_q.bias": torch.ones(3)}, "attn___to_q"),
    ({"model_dict.blocks___0___ff_a___0.bias": torch.ones(3)}, "lacks"),
    ({}, "no gate parameters"),
])
def test_malformed_checkpoints_name_file_and_key(tmp_path: Path, tensors, reason):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LearnedGateError) as caught:
        load_learned_gates(path)
    assert reason in str(caught.value) and str(path) in str(caught.value)


def test_wrong_parameter_shape_is_reported(tmp_path: Path):
    path = tmp_path / "gates.safetensors"
    write_synthetic_checkpoint(path, hidden_size=4, double_blocks=1, single_blocks=0)
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    tensors["model_dict.blocks___0___ff_a___2.weight_out"] = torch.ones(5)
    save_file(tensors, str(path))
    with pytest.raises(LearnedGateError, match="ff_a.2.weight_out has shape \\(5,\\)"):
        load_learned_gates(path)


class ToyLayer(torch.nn.Module):
    """A frozen base Linear plus two frozen LoRAs, mixed by a LearnedGate; conditioning added to the input."""

    def __init__(self, channels: int = 8, rank: int = 2) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.base = torch.randn(channels, channels, generator=generator) / channels ** 0.5
        self.downs = [torch.randn(rank, channels, generator=generator) for _ in range(2)]
        self.ups = [torch.randn(channels, rank, generator=generator) * 0.5 for _ in range(2)]
        self.gate = LearnedGate(channels)

    def predict(self, latent: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = latent + cond + sigma.reshape(-1, 1, 1)
        deltas = torch.stack([x @ down.T @ up.T for down, up in zip(self.downs, self.ups)])
        return self.gate(x @ self.base.T, deltas)


@pytest.mark.parametrize("with_hinge", [False, True])
def test_training_step_reduces_loss_on_toy_model(with_hinge: bool):
    torch.manual_seed(0)
    toy = ToyLayer()
    optimizer = torch.optim.Adam(toy.gate.parameters(), lr=0.05)
    clean, noise = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.8])
    cond, mismatched = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    reports = [gate_training_step(toy.predict, optimizer, clean, noise, sigma, cond,
                                  mismatched if with_hinge else None, margin=0.05) for _ in range(40)]
    assert reports[-1].flow_loss < 0.8 * reports[0].flow_loss
    assert reports[-1].loss < reports[0].loss
    if with_hinge:
        assert any(report.hinge_loss > 0 for report in reports)
    else:
        assert all(report.hinge_loss == 0.0 for report in reports)


def test_training_step_works_inside_inference_mode():
    toy = ToyLayer()
    optimizer = torch.optim.SGD(toy.gate.parameters(), lr=0.1)
    before = toy.gate.bias.detach().clone()
    with torch.inference_mode():
        clean, noise = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
        sigma, cond = torch.tensor([0.3, 0.7]), torch.zeros(1, 1, 8)
        report = gate_training_step(toy.predict, optimizer, clean, noise, sigma, cond)
    assert report.loss > 0 and not torch.equal(before, toy.gate.bias.detach())
