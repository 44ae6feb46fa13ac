"""Issue 17's layouts: alpha after ``lora_A``, alpha only in ``lora_adapter_metadata``, PEFT DoRA (on fused-qkv
slices, checked against PEFT's formula on the separate Linear), fp8 factors, kohya names flattened from diffusers
names with a trailing underscore, CLIP-L ``layer_norm*.diff``, and kinds we cannot apply named in the error."""
from __future__ import annotations

import json

import pytest
import torch
from lora_loom.cli import main
from lora_loom.composition.adapters import DoRA, WeightDiff, bypass_output, merged_delta
from lora_loom.composition.formats import read_adapter_set
from lora_loom.composition.loading import load_adapter_set
from safetensors.torch import load_file, save_file

H, R = 8, 2


def rnd(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5


def only(adapter_set, module: str):
    (adapter,) = adapter_set.adapters[module]
    return adapter


pytestmark = pytest.mark.usefixtures("fresh_lora_cache")


# ------------------------------------------------------------------------------------------------ 1. alpha
def test_alpha_stored_after_lora_a_scales_its_module() -> None:
    """``...to_k.lora_A.weight.alpha`` (the spelling diffusers' Flux tests copy from a published file)."""
    up, down = rnd(H, R, seed=1), rnd(R, H, seed=2)
    prefix = "transformer.transformer_blocks.1.attn.to_k"
    sd = {f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up,
          f"{prefix}.lora_A.weight.alpha": torch.tensor(16.0)}
    adapter_set = read_adapter_set(sd, "jon.safetensors")
    assert adapter_set.leftovers == ()
    adapter = only(adapter_set, "double_blocks.1.img_attn.qkv")
    assert adapter.offset.start == H and adapter.alpha == 16.0
    torch.testing.assert_close(adapter.delta_weight(), up @ down * (16.0 / R))


def test_two_spellings_of_one_alpha_leave_the_second_over_instead_of_dropping_it() -> None:
    prefix = "transformer.transformer_blocks.1.attn.to_k"
    sd = {f"{prefix}.lora_A.weight": rnd(R, H, seed=2), f"{prefix}.lora_B.weight": rnd(H, R, seed=1),
          f"{prefix}.alpha": torch.tensor(4.0), f"{prefix}.lora_A.weight.alpha": torch.tensor(16.0)}
    adapter_set = read_adapter_set(sd, "twice.safetensors")
    assert len(adapter_set.leftovers) == 1 and adapter_set.leftovers[0].endswith("alpha")


# ------------------------------------------------------------------------------ 2. lora_adapter_metadata
def _diffusers_file(modules: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """PEFT keys ``<module>.lora_A/B.weight`` with the rank given per module (in = out = H)."""
    sd = {}
    for i, (module, rank) in enumerate(modules.items()):
        sd[f"{module}.lora_A.weight"] = rnd(rank, H, seed=seed + 2 * i)
        sd[f"{module}.lora_B.weight"] = rnd(H, rank, seed=seed + 2 * i + 1)
    return sd


def _metadata(**components: dict) -> dict[str, str]:
    packed = {f"{c}.{k}": v for c, fields in components.items() for k, v in fields.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def test_alpha_only_in_lora_adapter_metadata_follows_peft_patterns() -> None:
    q, k, proj = ("transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k",
                  "transformer.transformer_blocks.0.attn.to_out.0")
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    sd = _diffusers_file({q: 4, k: 4, proj: 2, te: 4})
    metadata = _metadata(
        transformer={"r": 4, "lora_alpha": 16, "alpha_pattern": {"transformer_blocks.0.attn.to_k": 2},
                     "rank_pattern": {"to_out.0": 2}, "use_rslora": False, "use_dora": False},
        text_encoder={"r": 4, "lora_alpha": 4, "use_rslora": True})
    adapter_set = read_adapter_set(sd, "meta.safetensors", metadata)
    expect = {q: 16 / 4, k: 2 / 4, proj: 16 / 2, te: 4 / 4 ** 0.5}
    qkv = {a.offset.start: a for a in adapter_set.adapters["double_blocks.0.img_attn.qkv"]}
    got = {q: qkv[0], k: qkv[H], proj: only(adapter_set, "double_blocks.0.img_attn.proj"),
           te: adapter_set.te_adapters["clip_l:text_model.encoder.layers.0.self_attn.q_proj"][0]}
    for module, adapter in got.items():
        torch.testing.assert_close(adapter.delta_weight(), sd[f"{module}.lora_B.weight"]
                                   @ sd[f"{module}.lora_A.weight"] * expect[module], msg=module)
    notes = " | ".join(adapter_set.notes)
    assert "alpha 16 from lora_adapter_metadata (transformer.lora_alpha, r 4: scale 4) on 1 module" in notes
    assert "alpha_pattern['transformer_blocks.0.attn.to_k']" in notes and "use_rslora" in notes


def test_inspect_says_where_the_alpha_came_from(tmp_path, capsys) -> None:
    q = "transformer.single_transformer_blocks.0.proj_out"
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(_diffusers_file({q: 4}), str(path), _metadata(transformer={"r": 4, "lora_alpha": 16}))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "note      alpha 16 from lora_adapter_metadata (transformer.lora_alpha, r 4: scale 4) on 1 module" in out
    assert "writer    diffusers / PEFT (metadata lora_adapter_metadata)" in out


@pytest.mark.parametrize("raw, field", [("{not json", "is not valid JSON"), (json.dumps({"transformer.r": "four"}),
                                                                         "'transformer.r'")])
def test_malformed_lora_adapter_metadata_names_file_and_field(raw: str, field: str) -> None:
    sd = _diffusers_file({"transformer.proj_out": 2})
    with pytest.raises(ValueError, match=f"bad.safetensors: metadata 'lora_adapter_metadata'.*{field}"):
        read_adapter_set(sd, "bad.safetensors", {"lora_adapter_metadata": raw})


# ----------------------------------------------------------------------------------------------- 3. PEFT DoRA
def peft_dora_forward(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                      magnitude: torch.Tensor) -> torch.Tensor:
    """PEFT's ``DoraLinearLayer.forward`` + base output on ONE Linear ``weight [out, in]`` (no bias), written out:
    ``norm = ‖W + s·B@A‖`` over dim 1; ``y = W x + (m/norm - 1)·W x + (m/norm)·s·B A x``."""
    norm = torch.linalg.norm(weight + scaling * (b @ a), dim=1)
    mag_norm_scale = (magnitude / norm).view(1, -1)
    base = x @ weight.T
    return base + (mag_norm_scale - 1) * base + mag_norm_scale * (x @ a.T @ b.T) * scaling


@pytest.mark.parametrize("module, target, start, mlp", [
    ("transformer.transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv", 0, 0),
    ("transformer.transformer_blocks.0.attn.add_v_proj", "double_blocks.0.txt_attn.qkv", 2 * H, 0),
    ("transformer.single_transformer_blocks.0.attn.to_k", "single_blocks.0.linear1", H, 4 * H),
])
@pytest.mark.parametrize("spelling", ["lora_magnitude_vector", "lora_magnitude_vector.weight",
                                      "lora_magnitude_vector.default.weight"])
def test_peft_dora_on_a_slice_of_a_fused_layer_equals_peft_on_the_separate_linear(
        module: str, target: str, start: int, mlp: int, spelling: str) -> None:
    """The file was trained on a separate ``to_q`` Linear; its rows inside the fused weight must come out as PEFT
    computes them on that Linear, and every other row of the fused layer must stay the base output."""
    rows = 3 * H + mlp
    fused = rnd(rows, H, seed=3)
    own = fused[start:start + H]
    a, b = rnd(R, H, seed=4), rnd(H, R, seed=5)
    magnitude = torch.linalg.norm(own + b @ a, dim=1) * (1 + rnd(H, seed=6).abs())
    sd = {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b, f"{module}.{spelling}": magnitude}
    adapter_set = read_adapter_set(sd, "dora.safetensors")
    assert adapter_set.leftovers == ()
    dora = only(adapter_set, target)
    assert isinstance(dora, DoRA) and dora.on_output_axis and dora.offset.start == start
    x = rnd(5, H, seed=7)
    merged = x @ (fused + merged_delta([dora], (rows, H), base_weight=fused)).T
    expected = x @ fused.T
    expected[:, start:start + H] = peft_dora_forward(x, own, a, b, 1.0, magnitude)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    per_token = x @ fused.T + bypass_output([dora], x, rows, base_weight=fused)
    torch.testing.assert_close(per_token, expected, rtol=1e-5, atol=1e-5)


def test_peft_magnitude_of_the_wrong_length_names_the_key() -> None:
    module = "transformer.transformer_blocks.0.attn.to_q"
    sd = {f"{module}.lora_A.weight": rnd(R, H, seed=1), f"{module}.lora_B.weight": rnd(H, R, seed=2),
          f"{module}.lora_magnitude_vector": rnd(H + 1, seed=3)}
    with pytest.raises(ValueError, match=r"short.safetensors: double_blocks.0.img_attn.qkv .*lora_magnitude_vector "
                                         r"has 9 values, the module writes 8 rows"):
        read_adapter_set(sd, "short.safetensors")


# ------------------------------------------------------------------------------------------------------ 4. fp8
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_file_gives_its_delta_through_loom_delta(tmp_path, capsys, dtype: torch.dtype) -> None:
    """``loom delta`` on an fp8 file (it crashed in LoRA.delta_weight): ΔW = (alpha/r)·up@down computed in fp32
    on the fp8 values, the fused-qkv slice placed, no key left over."""
    up, down = rnd(3 * 16, 4, seed=1).to(dtype), rnd(4, 16, seed=2).to(dtype)
    q_up, q_down = rnd(16, 4, seed=3).to(dtype), rnd(4, 16, seed=4).to(dtype)
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
          "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
          "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(8.0),
          "lora_unet_single_transformer_blocks_0_attn_to_q.lora_up.weight": q_up,
          "lora_unet_single_transformer_blocks_0_attn_to_q.lora_down.weight": q_down}
    lora = tmp_path / "fp8.safetensors"
    save_file(sd, str(lora))
    assert load_adapter_set(lora).leftovers == ()
    out = tmp_path / "delta.safetensors"
    assert main(["delta", str(lora), "--out", str(out)]) == 0, capsys.readouterr().err
    got = load_file(str(out))
    torch.testing.assert_close(got["double_blocks.0.img_attn.qkv.weight"], up.float() @ down.float() * 2.0,
                               rtol=1e-5, atol=1e-6)
    linear1 = got["single_blocks.0.linear1.weight"]
    assert linear1.shape == (3 * 16 + 4 * 16, 16) and not linear1[16:].any()
    torch.testing.assert_close(linear1[:16], q_up.float() @ q_down.float(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- 5. trailing underscore
def test_kohya_names_flattened_from_diffusers_names_with_a_trailing_underscore() -> None:
    """sd-scripts #1463 / ComfyUI #4347: ``lora_unet_<diffusers module>_.lora_down.weight``."""
    modules = {"lora_unet_single_transformer_blocks_0_attn_to_k_": ("single_blocks.0.linear1", H, H),
               "lora_unet_context_embedder_": ("txt_in", H, 12),
               "lora_unet_norm_out_linear_": ("final_layer.adaLN_modulation.1", 2 * H, H),
               "lora_unet_proj_out_": ("final_layer.linear", 4, H),
               "lora_unet_time_text_embed_guidance_embedder_linear_1_": ("guidance_in.in_layer", H, 16),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1_": ("clip_l:text_model.encoder.layers.0.mlp.fc1", 32, H)}
    sd = {}
    for i, (prefix, (_, rows, cols)) in enumerate(modules.items()):
        sd.update({f"{prefix}.lora_up.weight": rnd(rows, R, seed=i),
                   f"{prefix}.lora_down.weight": rnd(R, cols, seed=50 + i), f"{prefix}.alpha": torch.tensor(1.0)})
    adapter_set = read_adapter_set(sd, "thelastben.safetensors")
    assert adapter_set.leftovers == ()
    groups = {**adapter_set.adapters, **adapter_set.te_adapters}
    for prefix, (target, rows, cols) in modules.items():
        (adapter,) = groups[target]
        delta = sd[f"{prefix}.lora_up.weight"] @ sd[f"{prefix}.lora_down.weight"] / R
        if target == "final_layer.adaLN_modulation.1":  # diffusers' (shift, scale) -> Flux's (scale, shift)
            delta = torch.cat(delta.chunk(2)[::-1])
        torch.testing.assert_close(adapter.delta_weight(), delta, msg=prefix)
    assert only(adapter_set, "single_blocks.0.linear1").offset.start == H


# -------------------------------------------------------------------------------- 6. CLIP layer_norm diffs
def test_clip_layer_norm_diffs_in_a_comfyui_file_are_text_encoder_parts() -> None:
    """ComfyUI's LoraSave writes ``.diff`` on 1-D weights and ``.diff_b`` on biases for every CLIP weight."""
    te = "text_encoders.clip_l.transformer.text_model"
    sd = {f"{te}.encoder.layers.0.layer_norm1.diff": rnd(H, seed=1),
          f"{te}.encoder.layers.0.layer_norm1.diff_b": rnd(H, seed=2),
          f"{te}.final_layer_norm.diff": rnd(H, seed=3),
          f"{te}.embeddings.position_embedding.lora_up.weight": rnd(77, R, seed=4),
          f"{te}.embeddings.position_embedding.lora_down.weight": rnd(R, H, seed=5),
          "text_encoders.clip_l.transformer.text_projection.lora_up.weight": rnd(H, R, seed=6),
          "text_encoders.clip_l.transformer.text_projection.lora_down.weight": rnd(R, H, seed=7),
          "diffusion_model.double_blocks.0.img_attn.proj.diff_b": rnd(16, seed=8)}
    adapter_set = read_adapter_set(sd, "extracted.safetensors")
    assert adapter_set.leftovers == ()
    norm = adapter_set.te_adapters["clip_l:text_model.encoder.layers.0.layer_norm1"]
    assert {(a.parameter, tuple(a.target_shape)) for a in norm} == {("weight", (H,)), ("bias", (H,))}
    assert all(isinstance(a, WeightDiff) for a in norm)
    assert set(adapter_set.te_adapters) == {"clip_l:text_model.encoder.layers.0.layer_norm1",
                                            "clip_l:text_model.final_layer_norm",
                                            "clip_l:text_model.embeddings.position_embedding", "clip_l:text_projection"}


# --------------------------------------------------------------------------------------- kinds we cannot apply
@pytest.mark.parametrize("suffixes, kind", [((".oft_blocks", ".alpha"), "OFT"),
                                           ((".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight"), "GLoRA")])
def test_a_kind_we_cannot_apply_is_named_in_the_error(suffixes: tuple[str, ...], kind: str) -> None:
    sd = {f"diffusion_model.double_blocks.0.img_attn.proj{s}": rnd(4, 4, seed=i) for i, s in enumerate(suffixes)}
    with pytest.raises(ValueError, match=f"oft.safetensors: double_blocks.0.img_attn.proj .*{kind} adapters are not "
                                         "supported"):
        read_adapter_set(sd, "oft.safetensors")


def test_bundled_embeddings_stay_over_as_leftovers() -> None:
    """OneTrainer bundles textual-inversion vectors (``bundle_emb.<name>.clip_l``); ComfyUI core leaves them too."""
    prefix = "diffusion_model.double_blocks.0.img_attn.proj"
    sd = {f"{prefix}.lora_up.weight": rnd(16, R, seed=1), f"{prefix}.lora_down.weight": rnd(R, 16, seed=2),
          "bundle_emb.ohwx.clip_l": rnd(1, 768, seed=3), "bundle_emb.ohwx.t5": rnd(1, 4096, seed=4)}
    adapter_set = read_adapter_set(sd, "bundled.safetensors")
    assert adapter_set.leftovers == ("bundle_emb.ohwx.clip_l", "bundle_emb.ohwx.t5")


def test_provenance_reads_hostile_metadata_without_failing() -> None:
    """The scan asks every header who wrote it: JSON nested past the parser's depth, or not JSON at all, is just
    not a trainer's mark (``files.json_text``), never an exception that stops the scan."""
    from lora_loom.composition.formats.provenance import identify

    shapes = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 32)}
    for raw in ("[" * 100_000, "{not json", '{"name": ["ai-toolkit"]}'):
        assert identify(shapes, {"software": raw}).writer == "kohya"  # the key style, not the broken mark
        found = identify(shapes, {"ot_config": raw})  # the field names OneTrainer; its text tells no variant
        assert (found.writer, found.variant) == ("onetrainer", None)
