"""Format converters: every fixture is consumed whole and converts to its known delta; foreign models named."""
from __future__ import annotations

import pytest
import torch
from lora_factory import FORMATS, KIND_FORMATS, KINDS, FluxDims, LoraCase, build_lora, flux_param_shapes
from lora_loom.composition.adapters import AdapterSet, merged_delta
from lora_loom.composition.formats import (
    NotFluxLoRAError,
    ShapeMismatchError,
    check_shapes,
    identify_foreign_model,
    read_adapter_set,
)

DIMS = FluxDims()


def deltas_by_parameter(adapter_set: AdapterSet, case: LoraCase) -> dict[str, torch.Tensor]:
    """Parameter key -> merged delta of the converted adapters (slices summed), using the case's bases."""
    grouped: dict[str, list] = {}
    for module, adapters in {**adapter_set.adapters, **adapter_set.te_adapters}.items():
        for a in adapters:
            grouped.setdefault(module if a.parameter == "weight" else f"{module}.{a.parameter}", []).append(a)
    expected = {**case.expected, **case.expected_te}
    return {k: merged_delta(v, tuple(v[0].target_shape), case.base.get(k)) for k, v in grouped.items()
            if k in expected}


def assert_converts_exactly(case: LoraCase) -> AdapterSet:
    adapter_set = read_adapter_set(dict(case.state_dict), f"{case.format}_{case.kind}.safetensors", case.metadata)
    assert adapter_set.leftovers == ()
    expected = {**case.expected, **case.expected_te}
    got = deltas_by_parameter(adapter_set, case)
    modules = {**adapter_set.adapters, **adapter_set.te_adapters}
    assert set(got) == set(expected), set(got) ^ set(expected)
    assert sum(len(v) for v in modules.values()) >= len(expected)
    for key, delta in expected.items():
        err = float((got[key] - delta).norm() / delta.norm())
        assert err < 1e-5, f"{key}: relative error {err}"
    return adapter_set


FORMAT_LABEL = {"lycoris": "lycoris", "ai-toolkit": "ai-toolkit", "comfyui": "comfyui"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_converts_to_the_known_delta(fmt: str) -> None:
    case = build_lora(fmt, "lora", DIMS)
    adapter_set = assert_converts_exactly(case)
    assert adapter_set.format == FORMAT_LABEL.get(fmt, fmt)
    check_shapes(adapter_set, flux_param_shapes(DIMS))


@pytest.mark.parametrize("fmt", KIND_FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_converts_to_the_known_delta(kind: str, fmt: str) -> None:
    assert_converts_exactly(build_lora(fmt, kind, DIMS))


def test_text_encoder_parts_are_kept_apart() -> None:
    adapter_set = assert_converts_exactly(build_lora("kohya", "lora", DIMS))
    assert set(adapter_set.te_adapters) == {"clip_l:text_model.encoder.layers.0.self_attn.q_proj",
                                            "clip_l:text_model.encoder.layers.0.mlp.fc1",
                                            "t5xxl:encoder.block.0.layer.0.SelfAttention.q",
                                            "t5xxl:encoder.block.0.layer.1.DenseReluDense.wi_0"}
    assert not any(":" in k for k in adapter_set.adapters)


def test_fused_qkv_slices_and_norm_out_swap() -> None:
    adapter_set = assert_converts_exactly(build_lora("diffusers", "lora", DIMS))
    h = DIMS.hidden
    offsets = sorted((a.offset.start, a.offset.length) for a in adapter_set.adapters["double_blocks.0.img_attn.qkv"])
    assert offsets == [(0, h), (h, h), (2 * h, h)]
    mlp = [a for a in adapter_set.adapters["single_blocks.1.linear1"] if a.offset.start == 3 * h]
    assert len(mlp) == 1 and mlp[0].offset.length == DIMS.mlp_hidden
    assert adapter_set.adapters["final_layer.adaLN_modulation.1"][0].target_shape == (2 * h, h)


def test_geometry_of_linear1_follows_the_files_mlp_width() -> None:
    dims = FluxDims(hidden=24, mlp_ratio=2.0)
    adapter_set = assert_converts_exactly(build_lora("onetrainer", "lora", dims))
    assert {a.target_shape for a in adapter_set.adapters["single_blocks.1.linear1"]} == {(3 * 24 + 48, 24)}
    check_shapes(adapter_set, flux_param_shapes(dims))


def test_bfl_control_lora_bias_norms_and_widened_input() -> None:
    adapter_set = assert_converts_exactly(build_lora("bfl", "lora", DIMS))
    assert adapter_set.widened_inputs == {"img_in": (DIMS.hidden, 2 * DIMS.in_channels)}
    kinds = {(type(a).__name__, a.parameter) for a in adapter_set.adapters["double_blocks.0.img_attn.norm.key_norm"]}
    assert kinds == {("SetWeight", "scale")}
    assert {a.parameter for a in adapter_set.adapters["img_in"]} == {"weight", "bias"}
    check_shapes(adapter_set, flux_param_shapes(DIMS))


SPELLINGS = [(".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"),
             (".lora.up.weight", ".lora.down.weight"), (".lora_B.default.weight", ".lora_A.default.weight"),
             ("_lora.up.weight", "_lora.down.weight"),
             (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
             (".up.weight", ".down.weight")]


@pytest.mark.parametrize("up_key, down_key", SPELLINGS)
def test_every_lora_spelling_reads_the_same(up_key: str, down_key: str) -> None:
    up, down = torch.randn(32, 4), torch.randn(4, 32)
    prefix = "diffusion_model.double_blocks.0.img_attn.proj"
    sd = {prefix + up_key: up, prefix + down_key: down, prefix + ".alpha": torch.tensor(8.0)}
    adapter_set = read_adapter_set(sd, "s.safetensors")
    (adapter,) = adapter_set.adapters["double_blocks.0.img_attn.proj"]
    assert adapter_set.leftovers == ()
    assert torch.allclose(adapter.delta_weight(), up @ down * 2.0)


FOREIGN = [
    ("SDXL", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"),
    ("SDXL", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"),
    ("SD1.5/SD2", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"),
    ("SD3", "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"),
    ("Flux.2", "diffusion_model.double_stream_modulation_img.lin.lora_A.weight"),
    ("Chroma", "diffusion_model.distilled_guidance_layer.in_proj.lora_A.weight"),
    ("Wan", "diffusion_model.blocks.0.self_attn.q.lora_A.weight"),
    ("HunyuanVideo", "diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight"),
    ("Qwen-Image", "transformer.transformer_blocks.0.img_mod.1.lora_A.weight"),
]


@pytest.mark.parametrize("model, key", FOREIGN)
def test_foreign_loras_are_named(model: str, key: str) -> None:
    sd = {key: torch.zeros(4, 8), key.replace("down", "up").replace("lora_A", "lora_B"): torch.zeros(8, 4)}
    assert identify_foreign_model(sd) == model
    with pytest.raises(NotFluxLoRAError) as err:
        read_adapter_set(sd, "X.safetensors")
    assert str(err.value) == f"X.safetensors is a LoRA for {model}, not Flux (key {key})"


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_flux_format_looks_foreign(fmt: str) -> None:
    for kind in ("lora", "lokr", "dora"):
        if fmt in KIND_FORMATS or kind == "lora":
            assert identify_foreign_model(build_lora(fmt, kind, DIMS).state_dict) is None


def test_a_file_without_flux_keys_is_refused() -> None:
    with pytest.raises(NotFluxLoRAError, match="Y.safetensors has no Flux keys at all"):
        read_adapter_set({"some.model.layer.lora_up.weight": torch.zeros(2, 1),
                          "some.model.layer.lora_down.weight": torch.zeros(1, 2)}, "Y.safetensors")


def test_leftovers_are_reported_by_key() -> None:
    case = build_lora("kohya", "lora", DIMS)
    sd = dict(case.state_dict)
    sd["lora_unet_unknown_module.lora_down.weight"] = torch.zeros(4, 4)
    sd["some_training_step"] = torch.tensor(3)
    adapter_set = read_adapter_set(sd, "k.safetensors")
    assert adapter_set.leftovers == ("lora_unet_unknown_module.lora_down.weight", "some_training_step")
    assert "double_blocks.0.img_attn.qkv" in adapter_set.adapters


def test_shape_mismatch_names_key_and_both_shapes() -> None:
    adapter_set = read_adapter_set(dict(build_lora("kohya", "lora", DIMS).state_dict), "k.safetensors")
    shapes = flux_param_shapes(FluxDims(hidden=48))
    with pytest.raises(ShapeMismatchError) as err:
        check_shapes(adapter_set, shapes)
    message = str(err.value)
    assert "k.safetensors" in message and "double_blocks.0.img_attn.qkv" in message
    assert "(96, 32)" in message and "(144, 48)" in message
    assert "lora_unet_double_blocks_0_img_attn_qkv" in message


def test_missing_module_is_reported() -> None:
    adapter_set = read_adapter_set(dict(build_lora("comfyui", "lora", DIMS).state_dict), "c.safetensors")
    with pytest.raises(ShapeMismatchError, match="double_blocks.1.txt_mlp.0.*no such parameter"):
        check_shapes(adapter_set, flux_param_shapes(FluxDims(double_blocks=1)))


@pytest.mark.parametrize("drop, message", [(".lora_down.weight", "only one of up/down"),
                                           (".hada_w2_b", "LoHa is missing")])
def test_incomplete_adapters_raise_with_file_and_key(drop: str, message: str) -> None:
    kind = "lora" if "lora" in drop else "loha"
    sd = {k: v for k, v in build_lora("comfyui", kind, DIMS, include_text_encoders=False).state_dict.items()
          if not k.endswith(drop) or "img_attn.qkv" not in k}
    with pytest.raises(ValueError, match=f"bad.safetensors: double_blocks.0.img_attn.qkv.*{message}"):
        read_adapter_set(sd, "bad.safetensors")
