"""Merged mode against ComfyUI core: ``Loom LoRA Stack`` patches a real tiny Flux ModelPatcher exactly as
ComfyUI's own ``LoraLoaderModelOnly`` does for every format and kind core reads, and differs only where we
mean to (DoRA's norm, set_weight's strength). Plus the node's contract: input untouched, block weights,
disabled rows never opened, LORA_STACK input, CLIP patches on a real ComfyUI CLIP, trigger words, errors."""
from __future__ import annotations

import functools
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import comfy.sd
import comfy.sd1_clip
import nodes as comfy_nodes  # ComfyUI's top-level nodes module
import pytest
import torch
from comfy_models import TINY_FLUX, tiny_flux
from lora_factory import FluxDims, LoraCase, build_lora
from lora_loom.composition.adapters import AdapterSet, DoRA
from lora_loom.composition.comfy_bridge.flux_model import model_key
from lora_loom.composition.comfy_bridge.merged import apply_merged
from lora_loom.composition.comfy_bridge.stack import load_entries
from lora_loom.composition.stack import StackRow
from lora_loom.nodes.lora_stack import LoomLoraStack
from lora_loom.retrieval.comfy_bridge import resolve_lora
from safetensors.torch import save_file

# lora_factory widths matching comfy_models.TINY_FLUX (img_in / final_layer see in_channels · patch² = 64).
DIMS = FluxDims(hidden=TINY_FLUX["hidden_size"], num_heads=TINY_FLUX["num_heads"], double_blocks=TINY_FLUX["depth"],
                single_blocks=TINY_FLUX["depth_single_blocks"], in_channels=TINY_FLUX["in_channels"] * 4,
                context_dim=TINY_FLUX["context_in_dim"], vec_dim=TINY_FLUX["vec_in_dim"], time_dim=256)
TUCKER_CORES = ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2")
# Diffusers' norm_out is (shift, scale), Flux's final_layer.adaLN_modulation.1 is (scale, shift): swapped rows.
SWAPPED = "final_layer.adaLN_modulation.1.weight"


def write(case: LoraCase, folder: Path, name: str | None = None, metadata: dict | None = None) -> str:
    """Save ``case`` for ComfyUI; Tucker cores as ``[r, r, 1, 1]`` (the only shape core's LoRA/LoHa read)."""
    name = name or f"{case.format}_{case.kind}.safetensors"
    tensors = {k: (v[:, :, None, None] if k.endswith(TUCKER_CORES) and v.dim() == 2 else v).contiguous()
               for k, v in case.state_dict.items()}
    save_file(tensors, str(folder / name), metadata={**case.metadata, **(metadata or {})})
    return name


def patched_weights(patcher) -> dict[str, torch.Tensor]:
    """Materialise the patcher's weights on the CPU (ComfyUI's own patch path), copy them, restore the model."""
    patcher.patch_model(device_to=torch.device("cpu"))
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model()


def run_node(model, rows: list[dict], clip=None, lora_stack=None):
    """``LoomLoraStack.execute`` -> (MODEL, CLIP, adapters, LORA_STACK, trigger words)."""
    return LoomLoraStack.execute(model=model, rows=json.dumps(rows), clip=clip, lora_stack=lora_stack).args


def comfy_core(model, name: str, strength: float):
    return comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def assert_same_weights(ours: dict[str, torch.Tensor], core: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                        skip: tuple[str, ...] = ()):
    assert set(ours) == set(core)
    changed = {k for k in base if not torch.equal(base[k], core[k])}
    assert changed, "ComfyUI changed no weight: the case does not test anything"
    assert changed == {k for k in base if not torch.equal(base[k], ours[k])}
    for key in set(base) - set(skip):
        torch.testing.assert_close(ours[key], core[key], rtol=1e-5, atol=2e-6, msg=key)


PARITY = ([(fmt, kind, 0.8) for fmt in ("kohya", "comfyui", "lycoris")
           for kind in ("lora", "lora_mid", "loha", "loha_tucker", "lokr", "lokr_factored", "dora_input_axis", "diff")]
          + [(fmt, "diff_b", 0.8) for fmt in ("kohya", "comfyui")]
          + [("diffusers", kind, 0.8) for kind in ("lora", "loha", "loha_tucker", "lokr", "lokr_factored",
                                                  "dora_input_axis", "diff")]
          + [("ai-toolkit", "lora", -0.6), ("onetrainer", "lora", 1.3)]
          + [(fmt, "set_weight", 1.0) for fmt in ("kohya", "comfyui")])


@pytest.mark.parametrize("fmt, kind, strength", PARITY)
def test_merged_weights_equal_comfyui_core(flux, loras_folder, fmt, kind, strength):
    name = write(build_lora(fmt, kind, DIMS, include_text_encoders=False), loras_folder)
    base = patched_weights(flux)
    core = patched_weights(comfy_core(flux, name, strength))
    ours = patched_weights(run_node(flux, [{"lora": name, "strength": strength}])[0])
    assert_same_weights(ours, core, base)


def test_bfl_control_lora_equals_comfyui_core_including_the_widened_img_in(flux, loras_folder):
    case = build_lora("bfl", "lora", DIMS)
    norm = "single_blocks.0.norm.key_norm.scale"  # the key core's convert_lora looks for
    value = torch.randn(DIMS.head_dim, generator=torch.Generator().manual_seed(5)) + 1.0
    name = write(replace(case, state_dict={**case.state_dict, norm: value}), loras_folder, "bfl_control.safetensors")
    base = patched_weights(flux)
    core = patched_weights(comfy_core(flux, name, 1.0))
    ours = patched_weights(run_node(flux, [{"lora": name}])[0])
    assert core["img_in.weight"].shape == ours["img_in.weight"].shape == (DIMS.hidden, 2 * DIMS.in_channels)
    # the loaded model's name for the checkpoint's norm gain (".weight" from ComfyUI 0.33 on)
    torch.testing.assert_close(ours[model_key(flux.model.model_config, norm)], value)
    for key in base:
        torch.testing.assert_close(ours[key], core[key], rtol=1e-5, atol=2e-6, msg=key)


def _with_norm_source(adapter_set: AdapterSet, norm_source: str) -> AdapterSet:
    adapters = {m: tuple(replace(a, norm_source=norm_source) if isinstance(a, DoRA) else a for a in group)
                for m, group in adapter_set.adapters.items()}
    return replace(adapter_set, adapters=adapters)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_dora_differs_from_core_only_by_the_norm_it_divides_by(flux, loras_folder, fmt):
    """ComfyUI 0.3.75 divides output-axis DoRA by the BASE weight's row norms; we follow the DoRA paper / PEFT
    (norms of W + ΔW). With ``norm_source="base"`` our math reproduces core exactly, except on diffusers'
    swapped norm_out, where core swaps the LoRA rows but not the magnitude vector (we swap both)."""
    name = write(build_lora(fmt, "dora", DIMS, include_text_encoders=False), loras_folder)
    base = patched_weights(flux)
    core = patched_weights(comfy_core(flux, name, 0.7))
    (entry,) = load_entries([StackRow(lora=name, strength=0.7)], resolve_lora)
    ours = patched_weights(apply_merged(flux, None, [entry]).model)
    as_core = patched_weights(apply_merged(flux, None, [replace(
        entry, adapter_set=_with_norm_source(entry.adapter_set, "base"))]).model)
    assert_same_weights(as_core, core, base, skip=(SWAPPED,) if fmt == "diffusers" else ())
    differs = [k for k in base if not torch.allclose(ours[k], core[k], rtol=1e-4, atol=1e-5)]
    assert differs, "our paper-faithful DoRA should differ from core's base-norm DoRA"


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_set_weight_strength_interpolates_where_core_ignores_it(flux, loras_folder, fmt):
    """Core's ``set`` patch copies the value whatever the strength; we apply ``base + s·(value - base)``."""
    case = build_lora(fmt, "set_weight", DIMS, include_text_encoders=False)
    name = write(case, loras_folder)
    base = patched_weights(flux)
    core = patched_weights(comfy_core(flux, name, 0.5))
    ours = patched_weights(run_node(flux, [{"lora": name, "strength": 0.5}])[0])
    for param in case.expected:
        key, value = f"{param}.weight", case.base[param] + case.expected[param]
        torch.testing.assert_close(core[key], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[key], base[key] + 0.5 * (value - base[key]), rtol=1e-5, atol=1e-6)


def test_set_weight_on_diffusers_norm_out_is_swapped_where_core_is_not(flux, loras_folder):
    """Diffusers' ``norm_out`` stores (shift, scale), Flux's ``final_layer.adaLN_modulation.1`` (scale, shift).
    Core swaps LoRA deltas there but its ``set`` patch ignores the swap function; we swap every kind."""
    case = build_lora("lycoris", "set_weight", DIMS, include_text_encoders=False)
    name = write(case, loras_folder)
    base = patched_weights(flux)
    core = patched_weights(comfy_core(flux, name, 1.0))
    ours = patched_weights(run_node(flux, [{"lora": name}])[0])
    param = SWAPPED.removesuffix(".weight")
    torch.testing.assert_close(ours[SWAPPED], case.base[param] + case.expected[param])
    assert not torch.allclose(core[SWAPPED], ours[SWAPPED])
    assert_same_weights(ours, core, base, skip=(SWAPPED,))


def test_node_leaves_its_input_model_untouched(loras_folder):
    model = tiny_flux(seed=1)
    uuid, before = model.patches_uuid, patched_weights(model)
    name = write(build_lora("kohya", "lora", DIMS), loras_folder)
    out = run_node(model, [{"lora": name}])[0]
    assert out is not model and out.patches and not model.patches and model.patches_uuid == uuid
    after = patched_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_block_weights_scale_only_the_named_blocks(flux, loras_folder):
    name = write(build_lora("comfyui", "lora", DIMS, include_text_encoders=False), loras_folder)
    base = patched_weights(flux)
    full = patched_weights(run_node(flux, [{"lora": name}])[0])
    half = patched_weights(run_node(flux, [{"lora": name, "blocks": "double1=0.5"}])[0])
    touched = [k for k in base if not torch.equal(base[k], full[k])]
    assert any(k.startswith("double_blocks.0.") for k in touched) and any(k.startswith("single_") for k in touched)
    for key in touched:
        factor = 0.5 if key.startswith("double_blocks.0.") else 1.0
        torch.testing.assert_close(half[key] - base[key], factor * (full[key] - base[key]), rtol=1e-5, atol=1e-6)


def test_disabled_row_is_never_opened_and_enabling_it_names_the_file(flux, loras_folder):
    (loras_folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    good = write(build_lora("kohya", "lora", DIMS), loras_folder)
    rows = [{"lora": "broken.safetensors", "on": False}, {"lora": good, "strength": 0.9}]
    out = run_node(flux, rows)
    assert [e.row.lora for e in out[2]] == [good]
    assert [item[0] for item in out[3]] == [good]
    with pytest.raises(ValueError, match="broken.safetensors"):
        run_node(flux, [{"lora": "broken.safetensors", "on": True}])


def test_lora_stack_input_rows_are_applied_first_and_passed_on(flux, loras_folder):
    a = write(build_lora("kohya", "lora", DIMS, seed=1), loras_folder, "stack_a.safetensors")
    b = write(build_lora("diffusers", "loha", DIMS, seed=2), loras_folder, "stack_b.safetensors")
    via_rows = patched_weights(run_node(flux, [{"lora": a, "strength": 0.6}, {"lora": b}])[0])
    out = run_node(flux, [{"lora": b}], lora_stack=[(a, 0.6, 0.6)])
    torch.testing.assert_close(patched_weights(out[0]), via_rows, rtol=1e-6, atol=1e-7)
    assert [e.row.lora for e in out[2]] == [a, b]
    assert out[3] == [(a, 0.6, 0.6), (b, 1.0, 1.0)]


def tiny_clip(dims: FluxDims) -> comfy.sd.CLIP:
    """A real ComfyUI CLIP object (SD1ClipModel + SD1Tokenizer) with a 1-layer CLIP-L of width ``clip_dim``."""
    config = {"hidden_size": dims.clip_dim, "intermediate_size": 4 * dims.clip_dim, "num_attention_heads": 2,
              "num_hidden_layers": 1, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "vocab_size": 49408,
              "max_position_embeddings": 77, "projection_dim": dims.clip_dim, "bos_token_id": 0,
              "eos_token_id": 49407, "pad_token_id": 1}

    class Target:
        params: ClassVar[dict] = {}
        clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=comfy.sd1_clip.SDClipModel,
                                 textmodel_json_config=config)
        tokenizer = comfy.sd1_clip.SD1Tokenizer

    clip = comfy.sd.CLIP(target=Target(), model_options={"dtype": torch.float32})
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # ComfyUI's ops leave parameters uninitialised
        for p in clip.cond_stage_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return clip


def clip_weights(clip) -> dict[str, torch.Tensor]:
    clip.patcher.patch_model(device_to=torch.device("cpu"))
    try:
        return {k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}
    finally:
        clip.patcher.unpatch_model()


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "diffusers"])
def test_text_encoder_parts_patch_a_real_clip_at_the_clip_strength(flux, loras_folder, fmt):
    case = build_lora(fmt, "lora", DIMS)
    name = write(case, loras_folder, f"te_{fmt}.safetensors")
    clip = tiny_clip(DIMS)
    base = clip_weights(clip)
    _, out_clip, *_ = run_node(flux, [{"lora": name, "strength": 1.0, "clip_strength": 0.4}], clip=clip)
    assert out_clip is not clip and not clip.patcher.patches
    got = clip_weights(out_clip)
    clip_deltas = {k.split(":", 1)[1]: v for k, v in case.expected_te.items() if k.startswith("clip_l:")}
    assert clip_deltas
    for path, delta in clip_deltas.items():
        key = f"clip_l.transformer.{path}.weight"
        torch.testing.assert_close(got[key] - base[key], 0.4 * delta, rtol=1e-4, atol=1e-6)
    unchanged = [k for k in base if not any(p in k for p in clip_deltas)]
    assert unchanged and all(torch.equal(got[k], base[k]) for k in unchanged)


def test_trigger_words_come_from_metadata(flux, loras_folder):
    tagged = write(build_lora("kohya", "lora", DIMS), loras_folder, "tagged.safetensors",
                   {"modelspec.trigger_phrase": "l00m style, woven"})
    counted = write(build_lora("comfyui", "lora", DIMS), loras_folder, "counted.safetensors",
                    {"ss_tag_frequency": json.dumps({"10_set": {"knit": 9, "wool": 4, "l00m style": 2}})})
    words = run_node(flux, [{"lora": tagged}, {"lora": counted}])[4]
    assert words == "l00m style, woven, knit, wool"


def test_foreign_model_and_shape_mismatch_errors_name_the_file(flux, loras_folder):
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4)},
              str(loras_folder / "sdxl_style.safetensors"))
    with pytest.raises(ValueError, match=r"sdxl_style\.safetensors is a LoRA for SDXL"):
        run_node(flux, [{"lora": "sdxl_style.safetensors"}])
    name = write(build_lora("comfyui", "lora", FluxDims(hidden=32)), loras_folder, "hidden32.safetensors")
    with pytest.raises(ValueError, match=r"hidden32\.safetensors.*double_blocks\.0\.img_attn\.qkv.*\(96, 32\).*"
                                         r"\(192, 64\)"):
        run_node(flux, [{"lora": name}])
    with pytest.raises(FileNotFoundError, match="missing_lora.safetensors"):
        run_node(flux, [{"lora": "missing_lora.safetensors"}])
    assert os.path.isdir(loras_folder)
