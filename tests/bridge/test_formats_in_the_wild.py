"""Issue 17's layouts through the nodes on a real tiny ComfyUI Flux: fp8 / 16-bit files merge exactly as
ComfyUI core's LoraLoaderModelOnly does and run per token like the merged model; PEFT DoRA on fused-qkv slices
merges to the PEFT formula; a ComfyUI-format file's CLIP ``layer_norm*.diff`` / ``.diff_b`` and embedding LoRAs
patch a real ComfyUI CLIP exactly as core's LoraLoader does."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import nodes as comfy_nodes  # ComfyUI's top-level nodes module
import pytest
import torch
from comfy_models import flux_inputs
from lora_factory import build_lora
from lora_loom.nodes.lora_stack import LoomLoraStack
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))  # helpers of the other bridge tests
from test_merged_vs_comfy import DIMS, assert_same_weights, clip_weights, patched_weights, tiny_clip
from test_regional_mechanism import apply_model

FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "bf16": torch.bfloat16,
       "fp16": torch.float16}


pytestmark = pytest.mark.usefixtures("fresh_lora_cache")


def write_cast(case, folder: Path, name: str, dtype: torch.dtype) -> str:
    """``case`` saved with every floating tensor (alpha too, as sd-scripts' fp8 re-save does) in ``dtype``."""
    save_file({k: v.to(dtype).contiguous() for k, v in case.state_dict.items()}, str(folder / name),
              metadata=case.metadata)
    return name


def node(model, rows: list[dict], clip=None, mode: str = "auto"):
    return LoomLoraStack.execute(model=model, rows=json.dumps(rows), clip=clip, mode=mode).args


@pytest.mark.parametrize("fmt, kind, dtype", [("kohya", "lora", "fp8_e4m3fn"), ("comfyui", "lora", "fp8_e5m2"),
                                              ("diffusers", "lora", "fp8_e4m3fn"), ("kohya", "loha", "fp8_e4m3fn"),
                                              ("lycoris", "lokr_factored", "fp8_e5m2"), ("diffusers", "lora", "bf16"),
                                              ("comfyui", "lora", "fp16")])
def test_8_and_16_bit_files_merge_exactly_like_comfyui_core(flux, loras_folder, fmt, kind, dtype):
    """Core casts the factors to its float32 intermediate dtype; ours compute ΔW in float32 from the same values."""
    case = build_lora(fmt, kind, DIMS, include_text_encoders=False)
    name = write_cast(case, loras_folder, f"{fmt}_{kind}_{dtype}.safetensors", FP8[dtype])
    base = patched_weights(flux)
    core = patched_weights(comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(flux, name, 0.9)[0])
    ours = patched_weights(node(flux, [{"lora": name, "strength": 0.9}])[0])
    assert_same_weights(ours, core, base)


@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_file_per_token_equals_the_merged_model(flux, loras_folder, dtype):
    """The per-token (gated) path runs fp8 factors in the model's float dtype and agrees with the merged path."""
    case = build_lora("diffusers", "lora", DIMS, include_text_encoders=False)
    # time/vector/guidance embedders run once per sample: the gated path leaves them out by design
    per_token_only = {k: v for k, v in case.state_dict.items() if "time_text_embed" not in k}
    name = write_cast(replace(case, state_dict=per_token_only), loras_folder, f"per_token_{dtype}.safetensors",
                      FP8[dtype])
    inputs = flux_inputs(flux, latent_hw=(8, 6))
    rows = [{"lora": name, "strength": 0.8}]
    merged = node(flux, rows, mode="merged")[0]
    per_token = node(flux, rows, mode="gated")[0]
    assert per_token.object_patches and not merged.object_patches

    def predict(patcher):
        return apply_model(patcher, inputs["x"], 0.7, inputs["context"], inputs["y"])

    reference, plain = predict(merged), predict(flux)
    assert (reference - plain).abs().max() > 1e-2  # the LoRA matters
    assert (predict(per_token) - reference).abs().max() <= 2e-5


def test_peft_dora_on_qkv_slices_merges_to_the_peft_formula(flux, loras_folder):
    """``lora_magnitude_vector`` on ``to_q`` / ``to_k`` (slices of img_attn.qkv): only those rows change, each to
    ``m · (W + B@A) / ‖W + B@A‖`` over its own rows, computed here on the real model's weight."""
    h = DIMS.hidden
    qkv = patched_weights(flux)["double_blocks.0.img_attn.qkv.weight"]
    gen = torch.Generator().manual_seed(3)
    tensors, expected = {}, qkv.clone()
    for start, name in ((0, "to_q"), (h, "to_k")):
        a, b = torch.randn(4, h, generator=gen) * 0.05, torch.randn(h, 4, generator=gen) * 0.05
        merged = qkv[start:start + h] + b @ a
        norm = merged.norm(dim=1)
        magnitude = norm * (1 + torch.rand(h, generator=gen))
        prefix = f"transformer.transformer_blocks.0.attn.{name}"
        tensors.update({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b,
                        f"{prefix}.lora_magnitude_vector": magnitude})
        expected[start:start + h] = merged * (magnitude / (norm + torch.finfo(torch.float32).eps))[:, None]
    save_file(tensors, str(loras_folder / "peft_dora.safetensors"))
    ours = patched_weights(node(flux, [{"lora": "peft_dora.safetensors"}])[0])
    torch.testing.assert_close(ours["double_blocks.0.img_attn.qkv.weight"], expected, rtol=1e-5, atol=1e-6)


def test_clip_norm_diffs_and_embedding_loras_patch_clip_like_comfyui_core(flux, loras_folder):
    """A ComfyUI LoraSave-style file with text-encoder parts core applies (its key map has every CLIP weight)."""
    c = DIMS.clip_dim
    te = "text_encoders.clip_l.transformer."
    gen = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return torch.randn(shape, generator=gen) * 0.1

    tensors = {f"{te}text_model.encoder.layers.0.layer_norm1.diff": rnd(c),
               f"{te}text_model.encoder.layers.0.layer_norm1.diff_b": rnd(c),
               f"{te}text_model.encoder.layers.0.layer_norm2.diff": rnd(c),
               f"{te}text_model.final_layer_norm.diff": rnd(c),
               f"{te}text_model.final_layer_norm.diff_b": rnd(c),
               f"{te}text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight": rnd(c, 2),
               f"{te}text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight": rnd(2, c),
               f"{te}text_model.encoder.layers.0.self_attn.q_proj.diff_b": rnd(c),
               f"{te}text_model.embeddings.position_embedding.lora_up.weight": rnd(77, 2),
               f"{te}text_model.embeddings.position_embedding.lora_down.weight": rnd(2, c),
               f"{te}text_projection.lora_up.weight": rnd(c, 2), f"{te}text_projection.lora_down.weight": rnd(2, c),
               "diffusion_model.double_blocks.0.img_attn.proj.diff_b": rnd(DIMS.hidden)}
    save_file({k: v.half() for k, v in tensors.items()}, str(loras_folder / "extracted_te.safetensors"))
    clip = tiny_clip(DIMS)
    base = clip_weights(clip)
    _, core_clip = comfy_nodes.LoraLoader().load_lora(flux, clip, "extracted_te.safetensors", 1.0, 0.7)
    core = clip_weights(core_clip)
    _, our_clip, *_ = node(flux, [{"lora": "extracted_te.safetensors", "strength": 1.0, "clip_strength": 0.7}],
                           clip=clip)
    ours = clip_weights(our_clip)
    changed = {k for k in base if not torch.equal(base[k], core[k])}
    assert {"clip_l.transformer.text_model.encoder.layers.0.layer_norm1.weight",
            "clip_l.transformer.text_model.encoder.layers.0.layer_norm1.bias",
            "clip_l.transformer.text_model.final_layer_norm.weight",
            "clip_l.transformer.text_projection.weight"} <= changed
    assert changed == {k for k in base if not torch.equal(base[k], ours[k])}
    for key in base:
        torch.testing.assert_close(ours[key], core[key], rtol=1e-5, atol=1e-6, msg=key)
