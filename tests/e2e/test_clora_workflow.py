"""CLoRA through a real ComfyUI server: two kohya LoRAs as concepts, Loom CLoRA feeding KSampler, Loom CLoRA Masks
after it (mask, preview, regions) and those regions driving Loom Compose in a second sampler."""
from __future__ import annotations

import numpy as np
from loomdev.fixtures import CLIP_FILE, FLUX_FILE, VAE_FILE
from PIL import Image
from test_regional_workflow import write_kohya_lora

CLORA_NODES = ("LoomCLoraConcept", "LoomCLora", "LoomCLoraMasks")
BASE = "a cat and a dog on a lawn"
CONCEPTS = (("a sks cat and a dog on a lawn", "cat"), ("a cat and a zwx dog on a lawn", "dog"))


def clora_graph(loras: tuple[str, str], prefix: str, steps: int = 3, iterations: int = 1) -> dict:
    """API-format graph: two concepts, CLoRA sampling, its masks, and the masks as regions for Loom Compose."""
    graph: dict[str, dict] = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_FILE, "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_FILE, "type": "stable_diffusion"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}},
    }
    previous = None
    for i, (lora, (prompt, concept)) in enumerate(zip(loras, CONCEPTS)):
        graph[f"stack_{i}"] = {"class_type": "LoomLoraStack", "inputs": {
            "model": ["unet", 0], "rows": f'[{{"lora": "{lora}", "strength": 1.0}}]'}}
        inputs = {"adapters": [f"stack_{i}", 2], "prompt": prompt, "concept": concept}
        if previous is not None:
            inputs["concepts"] = [previous, 0]
        graph[f"concept_{i}"] = {"class_type": "LoomCLoraConcept", "inputs": inputs}
        previous = f"concept_{i}"
    graph["clora"] = {"class_type": "LoomCLora", "inputs": {
        "model": ["unet", 0], "clip": ["clip", 0], "base_prompt": BASE, "concepts": [previous, 0],
        "step_size": 20.0, "update_end_percent": 0.5, "iterations": iterations, "temperature": 0.5, "alpha": 0.35,
        "morphology": "close", "kernel": 3, "fuse_start_percent": 0.0, "map_size": 32, "map_blocks": "all-double"}}
    graph["sample"] = {"class_type": "KSampler", "inputs": {
        "model": ["clora", 0], "positive": ["clora", 1], "negative": ["neg", 0], "latent_image": ["latent", 0],
        "seed": 5, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}}
    graph["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    graph["masks"] = {"class_type": "LoomCLoraMasks", "inputs": {"clora": ["clora", 2], "samples": ["sample", 0],
                                                                 "batch_index": 0}}
    graph["save_preview"] = {"class_type": "SaveImage", "inputs": {"images": ["masks", 1],
                                                                   "filename_prefix": prefix + "_preview"}}
    graph["mask_image"] = {"class_type": "MaskToImage", "inputs": {"mask": ["masks", 0]}}
    graph["save_mask"] = {"class_type": "SaveImage", "inputs": {"images": ["mask_image", 0],
                                                                "filename_prefix": prefix + "_mask"}}
    graph["compose"] = {"class_type": "LoomCompose", "inputs": {
        "model": ["unet", 0], "clip": ["clip", 0], "global_prompt": BASE, "regions": ["masks", 2],
        "background": "global", "base_ratio": 0.2, "injection": True, "isolation": True, "rule_blocks": "all",
        "rules_end_percent": 0.5, "latent_reinit": False, "refinement": False}}
    graph["sample_regions"] = {"class_type": "KSampler", "inputs": {
        "model": ["compose", 0], "positive": ["compose", 1], "negative": ["neg", 0], "latent_image": ["latent", 0],
        "seed": 5, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    graph["decode_regions"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample_regions", 0],
                                                                     "vae": ["vae", 0]}}
    graph["save_regions"] = {"class_type": "SaveImage", "inputs": {"images": ["decode_regions", 0],
                                                                   "filename_prefix": prefix + "_regions"}}
    return graph


def test_clora_nodes_are_registered(object_info):
    for node_id in CLORA_NODES:
        assert node_id in object_info, node_id
        assert object_info[node_id]["category"] == "loom/clora"
    assert object_info["LoomCLora"]["output"] == ["MODEL", "CONDITIONING", "LOOM_CLORA"]
    assert object_info["LoomCLoraMasks"]["output"] == ["MASK", "IMAGE", "LOOM_REGIONS"]


def test_clora_workflow_runs_to_an_image_masks_and_regions(comfy_server, loras_dir):
    loras = (write_kohya_lora(loras_dir, "loom_demo_cat.safetensors", seed=11),
             write_kohya_lora(loras_dir, "loom_demo_dog.safetensors", seed=12))
    entry = comfy_server.wait(comfy_server.queue(clora_graph(loras, "clora")))
    images: dict[str, list[np.ndarray]] = {}
    for path in comfy_server.output_images(entry):
        with Image.open(path) as img:
            kind = next((k for k in ("preview", "mask", "regions") if f"_{k}" in path.name), "image")
            images.setdefault(kind, []).append(np.asarray(img.convert("RGB"), np.float32))
    assert sorted((k, len(v)) for k, v in images.items()) == [("image", 1), ("mask", 2), ("preview", 1),
                                                               ("regions", 1)]  # one mask per LoRA
    images = {k: v[0] if k != "mask" else np.stack(v) for k, v in images.items()}
    assert images["image"].shape == images["regions"].shape == (128, 128, 3)
    assert images["preview"].shape == (128, 128, 3)
    assert images["mask"].shape == (2, 128, 128, 3)
    assert all(m.max() == 255 for m in images["mask"])  # every mask holds at least its concept's peak
    assert set(np.unique(images["mask"]).tolist()) <= {0.0, 255.0}  # binary masks (alpha threshold, closing)
