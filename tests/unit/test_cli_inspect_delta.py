"""``loom inspect`` and ``loom delta`` run in-process on lora_factory files with known deltas."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from lora_factory import NO_ALPHA, FluxDims, LoraCase, base_weight, build_lora, flux_param_shapes, save_case
from lora_loom.cli import main
from safetensors.torch import load_file, save_file

DIMS = FluxDims(hidden=32, double_blocks=2, single_blocks=2)


def comfy_name(key: str) -> str:
    """lora_factory parameter key -> ComfyUI state-dict name (weights get ``.weight``)."""
    return key if key.endswith((".bias", ".scale")) else f"{key}.weight"


def write(case: LoraCase, folder: Path) -> Path:
    return save_case(case, folder / f"{case.format}_{case.kind}.safetensors")


def write_model(case: LoraCase, folder: Path, seed: int = 3) -> Path:
    """A whole 'diffusion model' file (the case's base weights where it has them) under checkpoint names."""
    tensors = {f"model.diffusion_model.{comfy_name(k)}": case.base.get(k, base_weight(k, shape, seed)).contiguous()
               for k, shape in flux_param_shapes(case.dims).items()}
    path = folder / "flux_base.safetensors"
    save_file(tensors, str(path))
    return path


pytestmark = pytest.mark.usefixtures("fresh_lora_cache")


DELTA_CASES = [("kohya", "lora", 1.0), ("comfyui", "loha", 0.5), ("diffusers", "lokr_factored", -1.5),
               ("ai-toolkit", "lora", 0.8), ("onetrainer", "lora", 1.0), ("lycoris", "lora_mid", 2.0),
               ("xlabs", "lora", 1.0), ("bfl", "lora", 0.7), ("diffsynth", "lora", 1.0), ("kohya", "diff_b", 1.0),
               ("comfyui", "lokr_tucker", 1.0), ("kohya", "dora", 0.6), ("diffusers", "dora_input_axis", 1.0),
               ("comfyui", "set_weight", 0.25)]


@pytest.mark.parametrize("fmt, kind, strength", DELTA_CASES)
def test_delta_file_equals_known_delta_times_strength(tmp_path, capsys, fmt, kind, strength):
    case = build_lora(fmt, kind, DIMS, seed=3)
    lora = write(case, tmp_path)
    out = tmp_path / "delta.safetensors"
    args = ["delta", str(lora), "--out", str(out), "--strength", str(strength)]
    needs_base = kind.startswith("dora") or kind == "set_weight" or fmt == "bfl"
    if needs_base:
        args += ["--model", str(write_model(case, tmp_path))]
    assert main(args) == 0, capsys.readouterr().err
    got = load_file(str(out))
    assert set(got) == {comfy_name(k) for k in case.expected}
    for key, delta in case.expected.items():
        tensor = got[comfy_name(key)]
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, strength * delta, rtol=1e-4, atol=1e-5, msg=key)
    assert not any(":" in k or k.startswith(("clip", "t5")) for k in got)


@pytest.mark.parametrize("kind, module", [("dora", "double_blocks.0.img_attn.qkv.weight"),
                                          ("set_weight", "double_blocks.0.img_attn.qkv.weight")])
def test_delta_without_model_names_the_module_that_needs_it(tmp_path, capsys, kind, module):
    lora = write(build_lora("comfyui", kind, DIMS), tmp_path)
    assert main(["delta", str(lora), "--out", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert lora.name in err and "--model" in err and "double_blocks." in err and ".weight" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_delta_with_a_model_of_another_size_names_key_and_shapes(tmp_path, capsys):
    case = build_lora("comfyui", "dora", DIMS)
    small = build_lora("comfyui", "dora", FluxDims(hidden=16))
    lora = write(case, tmp_path)
    model = write_model(small, tmp_path, seed=0)
    assert main(["delta", str(lora), "--out", str(tmp_path / "o.safetensors"), "--model", str(model)]) == 1
    err = capsys.readouterr().err
    assert lora.name in err and "double_blocks.0.img_attn.qkv" in err and "(96, 32)" in err and "(48, 16)" in err


INSPECT_CASES = [("kohya", "lora", "kohya", {"LoRA"}), ("diffusers", "lora", "diffusers", {"LoRA"}),
                 ("ai-toolkit", "lora", "ai-toolkit", {"LoRA"}), ("comfyui", "loha", "comfyui", {"LoHa"}),
                 ("lycoris", "lokr", "lycoris", {"LoKr"}), ("kohya", "dora", "kohya", {"DoRA"}),
                 ("xlabs", "lora", "xlabs", {"LoRA"})]


@pytest.mark.parametrize("fmt, kind, label, kinds", INSPECT_CASES)
def test_inspect_json_fields(tmp_path, capsys, fmt, kind, label, kinds):
    case = build_lora(fmt, kind, DIMS, rank=4, alpha=2.0)
    lora = write(case, tmp_path)
    assert main(["inspect", str(lora), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    from lora_loom.composition.loading import file_sha256

    assert report["file"] == str(lora) and report["sha256"] == file_sha256(lora)
    assert report["format"] == label
    assert set(report["kinds"]) == kinds
    assert report["leftover_keys"] == []
    assert report["metadata"] == case.metadata
    base = report["base_model"]
    assert base["family"] == "flux-1" and base["variant"] is None and "dev or schnell" in base["note"]
    assert base["hidden_size"] == DIMS.hidden
    targets = {comfy_name(k).removesuffix(".weight") for k in case.expected}
    assert {m["module"] for m in report["modules"]} == targets
    low_rank = [m for m in report["modules"] if m["kind"] in ("LoRA", "LoHa", "DoRA")]
    assert all(m["rank"] == 4 for m in low_rank)
    assert report["alphas"] == ([] if fmt in NO_ALPHA else [2.0])
    if fmt == "diffusers":
        qkv = sorted(m["rows"] for m in report["modules"] if m["module"] == "double_blocks.0.img_attn.qkv")
        assert qkv == ["0:32", "32:64", "64:96"]
    te = {m["module"].split(":")[0] for m in report["text_encoder_modules"]}
    assert te == ({"clip_l", "t5xxl"} if fmt in ("kohya", "diffusers", "ai-toolkit", "comfyui") else set())


def test_inspect_reads_blocks_and_variant_from_metadata(tmp_path, capsys):
    case = build_lora("kohya", "lora", DIMS)
    lora = tmp_path / "k.safetensors"
    save_file({k: v.contiguous() for k, v in case.state_dict.items()}, str(lora),
              metadata={"modelspec.architecture": "flux-1-dev/lora", "ss_base_model_version": "flux1"})
    assert main(["inspect", str(lora), "--json"]) == 0
    base = json.loads(capsys.readouterr().out)["base_model"]
    assert base["variant"] == "dev" and base["metadata_architecture"] == "flux-1-dev/lora"
    assert base["double_blocks_seen"] == [0, 1] and base["single_blocks_seen"] == [0, 1]


def test_inspect_prints_a_table_by_default(tmp_path, capsys):
    lora = write(build_lora("diffusers", "lora", DIMS), tmp_path)
    assert main(["inspect", str(lora)]) == 0
    out = capsys.readouterr().out
    assert "format    diffusers" in out and "flux-1" in out
    row = next(line for line in out.splitlines() if line.startswith("double_blocks.0.img_attn.qkv"))
    assert row.split()[1:5] == ["weight", "LoRA", "4", "2"] and row.split()[-1] == "96x32"
    assert "leftover keys (0): none" in out


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif how == "absurd_header":
        path.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
    elif how == "garbage_json":
        path.write_bytes(data[:8] + b"[" + data[9:])


BAD_FILES = [("truncated", "truncated"), ("absurd_header", "header length"), ("garbage_json", "header"),
             ("pickle", "pickle"), ("sdxl", "SDXL"), ("no_flux", "no Flux keys")]


@pytest.mark.parametrize("command", ["inspect", "delta"])
@pytest.mark.parametrize("how, words", BAD_FILES)
def test_bad_files_exit_nonzero_naming_the_file(tmp_path, capsys, command, how, words):
    lora = tmp_path / f"bad_{how}.safetensors"
    if how == "pickle":
        lora = tmp_path / "bad_pickle.ckpt"
        torch.save({"a": torch.zeros(2)}, lora)
    elif how == "sdxl":
        save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8)},
                  str(lora))
    elif how == "no_flux":
        save_file({"some.random.tensor": torch.zeros(4)}, str(lora))
    else:
        save_case(build_lora("kohya", "lora", DIMS), lora)
        _corrupt(lora, how)
    args = [command, str(lora)] + (["--out", str(tmp_path / "o.safetensors")] if command == "delta" else [])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert lora.name in err and words in err, err


def test_missing_file_exits_nonzero(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 1
    assert "nope.safetensors" in capsys.readouterr().err
