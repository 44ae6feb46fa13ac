"""Regional composition through a real ComfyUI server: two regions, two kohya LoRAs (loaded by Loom LoRA Stack),
Loom Compose feeding KSampler and SamplerCustomAdvanced, and Loom Region Preview."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from loomdev.fixtures import CLIP_FILE, FLUX_FILE, VAE_FILE
from PIL import Image
from safetensors.torch import save_file

HIDDEN, MLP = 3072, 4 * 3072
# kohya module -> (out, in) on the demo Flux (1 double + 1 single block, hidden 3072)
MODULES = {
    "double_blocks_0_img_attn_qkv": (3 * HIDDEN, HIDDEN), "double_blocks_0_img_attn_proj": (HIDDEN, HIDDEN),
    "double_blocks_0_img_mlp_0": (MLP, HIDDEN), "double_blocks_0_img_mlp_2": (HIDDEN, MLP),
    "double_blocks_0_txt_attn_qkv": (3 * HIDDEN, HIDDEN),
    "single_blocks_0_linear1": (3 * HIDDEN + MLP, HIDDEN), "single_blocks_0_linear2": (HIDDEN, HIDDEN + MLP),
}
REGION_NODES = ("LoomRegion", "LoomRegions", "LoomCompose", "LoomRegionPreview")


def write_kohya_lora(folder: Path, name: str, seed: int, rank: int = 4) -> str:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out, inp) in MODULES.items():
        prefix = f"lora_unet_{module}"
        tensors[f"{prefix}.lora_down.weight"] = (torch.randn(rank, inp, generator=gen) / inp ** 0.5).bfloat16()
        tensors[f"{prefix}.lora_up.weight"] = (torch.randn(out, rank, generator=gen) * 0.5).bfloat16()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(folder / name))
    return name


def regional_graph(lora_a: str | None, lora_b: str | None, sampler: str, prefix: str) -> dict:
    """API-format graph: two regions (left/right), each with its own LoRA stack, composed and sampled."""
    graph: dict[str, dict] = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_FILE, "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_FILE, "type": "stable_diffusion"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
    }
    previous = None
    for key, lora, box, prompt in (("a", lora_a, (0.0, 0.0, 0.5, 1.0), "a red fox"),
                                   ("b", lora_b, (0.5, 0.0, 1.0, 1.0), "a blue bird")):
        inputs = {"prompt": prompt, "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3], "isolate": True}
        if lora is not None:
            graph[f"stack_{key}"] = {"class_type": "LoomLoraStack", "inputs": {
                "model": ["unet", 0], "rows": f'[{{"lora": "{lora}", "strength": 1.0}}]'}}
            inputs["adapters"] = [f"stack_{key}", 2]
        if previous is not None:
            inputs["regions"] = [previous, 0]
        graph[f"region_{key}"] = {"class_type": "LoomRegion", "inputs": inputs}
        previous = f"region_{key}"
    graph["regions"] = {"class_type": "LoomRegions", "inputs": {"regions_1": [previous, 0]}}
    graph["compose"] = {"class_type": "LoomCompose", "inputs": {
        "model": ["unet", 0], "clip": ["clip", 0], "global_prompt": "a meadow at noon", "regions": ["regions", 0],
        "background": "global", "base_ratio": 0.2, "injection": True, "isolation": True, "rule_blocks": "all",
        "rules_end_percent": 0.5, "latent_reinit": True, "refinement": False}}
    model, positive = ["compose", 0], ["compose", 1]
    graph["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}}
    if sampler == "KSampler":
        graph["sample"] = {"class_type": "KSampler", "inputs": {
            "model": model, "positive": positive, "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 5, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    else:
        graph.update({
            "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
            "guider": {"class_type": "CFGGuider", "inputs": {"model": model, "positive": positive,
                                                             "negative": ["neg", 0], "cfg": 2.0}},
            "ksampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple",
                                                                  "steps": 2, "denoise": 1.0}},
            "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["ksampler", 0],
                "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
        })
    graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}}
    graph["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    graph["preview"] = {"class_type": "LoomRegionPreview", "inputs": {"regions": ["regions", 0], "width": 128,
                                                                      "height": 96}}
    graph["save_preview"] = {"class_type": "SaveImage", "inputs": {"images": ["preview", 0],
                                                                   "filename_prefix": prefix + "_preview"}}
    return graph


def images_of(server, graph: dict) -> dict[str, np.ndarray]:
    entry = server.wait(server.queue(graph))
    out = {}
    for path in server.output_images(entry):
        with Image.open(path) as img:
            out["preview" if "_preview" in path.name else "image"] = np.asarray(img.convert("RGB"), np.float32)
    return out


def test_region_nodes_are_registered(object_info):
    for node_id in REGION_NODES:
        assert node_id in object_info, node_id
        assert object_info[node_id]["category"] == "loom/regions"
    compose = object_info["LoomCompose"]["input"]["required"]
    assert compose["background"][1]["options"] == ["global", "isolated", "shared"]
    assert object_info["LoomCompose"]["output"] == ["MODEL", "CONDITIONING"]


@pytest.mark.parametrize("sampler", ["KSampler", "SamplerCustomAdvanced"])
def test_two_regions_two_loras_run_to_an_image(comfy_server, loras_dir, sampler):
    lora_a = write_kohya_lora(loras_dir, "e2e_region_a.safetensors", seed=1)
    lora_b = write_kohya_lora(loras_dir, "e2e_region_b.safetensors", seed=2)
    composed = images_of(comfy_server, regional_graph(lora_a, lora_b, sampler, f"regional_{sampler}"))
    assert composed["image"].shape == (128, 128, 3)
    assert composed["preview"].shape == (96, 128, 3)
    assert composed["preview"][60, 20].tolist() != composed["preview"][60, 100].tolist()
    bare = images_of(comfy_server, regional_graph(None, None, sampler, f"regional_bare_{sampler}"))
    assert np.abs(composed["image"] - bare["image"]).max() > 2.0  # the LoRAs change the picture
