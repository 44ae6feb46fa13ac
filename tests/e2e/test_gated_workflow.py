"""Gated LoRAs through a real ComfyUI server: Loom Prompt Schedule and Loom Gate Schedule feeding Loom LoRA Stack's
``gates`` (per-token gated mode), sampled by KSampler; a gate of 0 gives the LoRA-free image bit for bit."""
from __future__ import annotations

import numpy as np
from loomdev.fixtures import CLIP_FILE, FLUX_FILE, VAE_FILE
from test_regional_workflow import images_of, write_kohya_lora

GATE_NODES = ("LoomGateSchedule", "LoomLearnedGate", "LoomPromptSchedule")


def gated_graph(lora: str | None, gate: str, prefix: str) -> dict:
    """``gate``: "prompt" (a prompt schedule turning the LoRA off at 50 %), "zero" (a constant 0 gate) or "none"."""
    graph: dict[str, dict] = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_FILE, "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_FILE, "type": "stable_diffusion"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "a red fox"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}},
    }
    model, positive = ["unet", 0], ["pos", 0]
    if lora is not None:
        stack = {"model": ["unet", 0], "rows": f'[{{"lora": "{lora}", "strength": 1.0}}]', "mode": "auto"}
        if gate == "prompt":
            graph["schedule"] = {"class_type": "LoomPromptSchedule", "inputs": {
                "prompt": f"a red fox [<lora:{lora.removesuffix('.safetensors')}:1>::0.5]", "steps": 0,
                "blocks": "", "clip": ["clip", 0]}}
            stack["gates"] = ["schedule", 0]
            positive = ["schedule", 1]
        elif gate == "zero":
            graph["gate"] = {"class_type": "LoomGateSchedule", "inputs": {
                "lora": lora, "keyframes": "0", "interpolation": "hold", "blocks": "", "preview_steps": 8}}
            stack["gates"] = ["gate", 0]
            graph["save_plot"] = {"class_type": "SaveImage", "inputs": {"images": ["gate", 1],
                                                                       "filename_prefix": prefix + "_preview"}}
        graph["stack"] = {"class_type": "LoomLoraStack", "inputs": stack}
        model = ["stack", 0]
    graph["sample"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": positive, "negative": ["neg", 0], "latent_image": ["latent", 0], "seed": 5,
        "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}}
    graph["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    return graph


def test_gate_nodes_are_registered(object_info):
    for node_id in GATE_NODES:
        assert node_id in object_info, node_id
        assert object_info[node_id]["category"] == "loom/gates"
    assert object_info["LoomGateSchedule"]["output"] == ["LOOM_GATE", "IMAGE"]
    optional = object_info["LoomLoraStack"]["input"]["optional"]
    assert "gates" in optional and optional["mode"][1]["options"][:2] == ["auto", "merged"]


def test_gated_stack_workflow_runs_and_gate_zero_is_the_bare_image(comfy_server, loras_dir):
    lora = write_kohya_lora(loras_dir, "e2e_gated.safetensors", seed=3)
    bare = images_of(comfy_server, gated_graph(None, "none", "gated_bare"))
    scheduled = images_of(comfy_server, gated_graph(lora, "prompt", "gated_prompt"))
    zero = images_of(comfy_server, gated_graph(lora, "zero", "gated_zero"))
    assert scheduled["image"].shape == (128, 128, 3)
    assert np.abs(scheduled["image"] - bare["image"]).max() > 2.0  # the LoRA acts in the first half
    assert np.array_equal(zero["image"], bare["image"])  # gate 0: no LoRA, bit for bit
    assert zero["preview"].shape[2] == 3 and zero["preview"].std() > 0  # the strength plot was drawn
