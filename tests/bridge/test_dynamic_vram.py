"""Merged Loom LoRAs where ComfyUI applies weight patches per forward instead of once.

ComfyUI 0.33 on NVIDIA runs models through ``ModelPatcherDynamic`` (dynamic VRAM): a patched weight is cast to the
device and patched in every forward by a ``LowVramPatch``, which first copies the patch's ``weights`` into a
device buffer (``prepare``) and rebuilds the patch around them; ``comfy.lora.calculate_shape`` decides which
patches resize their weight (those weights are loaded patched once instead). ``ModelPatcherDynamic`` itself needs
CUDA (comfy-aimdo's host buffers and virtual VRAM), so this tier runs those pieces of its code path that are plain
torch, on the CPU, exactly as ``ModelPatcherDynamic.load`` and ``comfy.ops`` call them. The low-VRAM partial
load (``ModelPatcher.load`` with a memory budget, both releases) runs whole forwards with per-forward patches.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import comfy.lora
import comfy.model_patcher
import comfy.utils
import pytest
import torch
from comfy_models import flux_inputs
from lora_factory import build_lora

sys.path.insert(0, str(Path(__file__).parent))  # the merged and mechanism tests' helpers
from lora_loom.composition.adapters import LoRA, adapter_tensors
from lora_loom.composition.comfy_bridge.merged import LoomWeightPatch
from lora_loom.nodes.lora_stack import LoomLoraStack
from test_merged_vs_comfy import DIMS, patched_weights, write
from test_regional_mechanism import apply_model

if DYNAMIC := hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
    import comfy.memory_management

needs_dynamic = pytest.mark.skipif(not DYNAMIC, reason="this ComfyUI has no dynamic VRAM (ModelPatcherDynamic: 0.33+)")

CASES = [("kohya", "lora"), ("diffusers", "lora"), ("lycoris", "loha"), ("lycoris", "lokr"),
         ("kohya", "dora_input_axis"), ("kohya", "diff"), ("comfyui", "set_weight"), ("bfl", "lora")]


def stacked(model, loras, fmt: str, kind: str, strength: float = 0.8):
    name = write(build_lora(fmt, kind, DIMS, include_text_encoders=False), loras, f"dyn_{fmt}_{kind}.safetensors")
    return LoomLoraStack.execute(model=model, rows=json.dumps([{"lora": name, "strength": strength}])).args[0]


def counting_deltas(monkeypatch) -> list[int]:
    """Count ΔW computations of Loom weight patches (``LoomWeightPatch.calculate_weight`` calls: a LoRA adds its
    product in place there, other kinds their ``merged_delta``)."""
    calls: list[int] = []
    real = LoomWeightPatch.calculate_weight

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(LoomWeightPatch, "calculate_weight", counted)
    return calls


@needs_dynamic
@pytest.mark.parametrize("fmt, kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_per_forward_patches_travel_to_the_buffer_and_equal_the_merged_weights(flux, loras_folder, fmt, kind,
                                                                                monkeypatch):
    clone = stacked(flux, loras_folder, fmt, kind)
    classic = patched_weights(clone)  # ComfyUI's patch-once path
    deltas = counting_deltas(monkeypatch)
    checked = 0
    for key, patches in clone.patches.items():
        weight = comfy.utils.get_attr(clone.model, key)
        want = tuple(classic[key.removeprefix("diffusion_model.")].shape)
        # ModelPatcherDynamic.load: a patch that resizes its weight makes ComfyUI load that weight patched once
        assert tuple(comfy.lora.calculate_shape(patches, weight, key)) == want, key
        if want != tuple(weight.shape):
            assert key == "diffusion_model.img_in.weight" and fmt == "bfl"
            continue
        # comfy.ops (cast_modules_with_vbar, then post_cast): memory_required, prepare into a buffer, call
        patch = comfy.model_patcher.LowVramPatch(key, clone.patches)
        size = patch.memory_required()
        loom = [p[1] for p in patches if isinstance(p[1], LoomWeightPatch)]
        assert loom and size == sum(comfy.memory_management.vram_aligned_size(t)
                                    for p in loom for t in p.weights[:-1])
        buffer = torch.zeros(size, dtype=torch.uint8)
        prepared = patch.prepare(buffer, None, copy=True, commit=True)
        start, stop = buffer.data_ptr(), buffer.data_ptr() + size
        for entry in prepared:
            for adapter in entry[1].adapters:
                assert all(start <= t.data_ptr() < stop for t in adapter_tensors(adapter)), key
        assert not deltas, "ΔW computed before the forward needed it"
        patched = patch(weight.detach().to(torch.float32).clone())
        assert len(deltas) == len(loom)
        deltas.clear()
        torch.testing.assert_close(patched, classic[key.removeprefix("diffusion_model.")], rtol=1e-5, atol=2e-6,
                                   msg=key)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("fmt, kind", [("kohya", "lora"), ("diffusers", "lora"), ("kohya", "dora_input_axis")])
def test_low_vram_forward_patches_each_weight_per_call_and_matches_the_full_load(flux, loras_folder, fmt, kind,
                                                                               monkeypatch):
    """ComfyUI's partial load (a memory budget below the model): Loom patches run as ``LowVramPatch`` weight
    functions in every forward, ΔW once per patched weight per call, and the output equals the fully patched
    model's."""
    clone = stacked(flux, loras_folder, fmt, kind)
    inputs = flux_inputs(clone, latent_hw=(8, 8))
    args = (inputs["x"], 0.7, inputs["context"], inputs["y"])
    full = apply_model(clone, *args)
    deltas = counting_deltas(monkeypatch)
    real_patch_model = clone.patch_model

    def low_vram_patch_model(*a, **k):
        return real_patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    monkeypatch.setattr(clone, "patch_model", low_vram_patch_model)
    low = apply_model(clone, *args)
    per_call = len(deltas)
    deltas.clear()
    apply_model(clone, *args)
    assert per_call == len(deltas) == len(clone.patches)  # every weight patched in each call, once
    torch.testing.assert_close(low, full, rtol=1e-5, atol=1e-6)


def test_bypass_mode_output_equals_the_merged_delta():
    """0.33's ``WeightAdapterBase`` bypass component ``h(x)``: ``multiplier · x @ ΔWᵀ``; kinds that need the base
    weight refuse with the file's name."""
    gen = torch.Generator().manual_seed(0)
    adapter = LoRA(up=torch.randn(6, 2, generator=gen), down=torch.randn(2, 4, generator=gen), alpha=1.0,
                   target_shape=(6, 4))
    patch = LoomWeightPatch.of((adapter,), "bypass.safetensors")
    patch.multiplier = 0.5
    x = torch.randn(3, 5, 4, generator=gen)
    torch.testing.assert_close(patch.h(x, torch.zeros(3, 5, 6)), 0.5 * x @ adapter.delta_weight().T)
    widened = LoomWeightPatch.of((adapter,), "control.safetensors", widened=(6, 8))
    with pytest.raises(NotImplementedError, match="control.safetensors"):
        widened.h(x, torch.zeros(3, 5, 6))
