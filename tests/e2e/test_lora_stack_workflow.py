"""``Loom LoRA Stack`` in a real ComfyUI server: three LoRAs of different formats (one disabled, one with block
weights) change the demo Flux's image; a workflow naming a missing LoRA fails with a message naming it."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from loomdev.fixtures import CLIP_FILE, FLUX_FILE, VAE_FILE
from lora_factory import FluxDims, LoraCase, build_lora
from PIL import Image
from safetensors.torch import save_file

# The demo model (dev/loomdev/fixtures.py): hidden 3072 / 24 heads, 1 double + 1 single block, CLIP-L-sized
# txt_in / vector_in (768), 16 latent channels · patch 2² = 64 features into img_in.
# The factory's fixtures name blocks 0 and 1, so files are built for two blocks of each kind and then renamed.
DEMO = FluxDims(hidden=3072, num_heads=24, double_blocks=2, single_blocks=2, in_channels=64, context_dim=768,
                vec_dim=768, time_dim=256, clip_dim=768, t5_dim=64)
logger = logging.getLogger(__name__)
_SECOND_BLOCK = re.compile(r"((?:double|single)_blocks|transformer_blocks)([._])1([._])")


def demo_lora(fmt: str, kind: str, seed: int, text_encoders: bool = False) -> LoraCase:
    """A rank-2 factory LoRA moved onto the demo model's only blocks (the factory also writes block 1)."""
    case = build_lora(fmt, kind, DEMO, seed=seed, rank=2, alpha=1.0, include_text_encoders=text_encoders)
    state = {_SECOND_BLOCK.sub(r"\g<1>\g<2>0\g<3>", k): v for k, v in case.state_dict.items()}
    assert len(state) == len(case.state_dict), "renaming block 1 -> 0 collided"
    return LoraCase(format=fmt, kind=kind, dims=DEMO, state_dict=state, expected={}, expected_te={}, base={},
                    metadata=case.metadata)


def save(case: LoraCase, folder: Path, name: str, metadata: dict | None = None) -> str:
    tensors = {k: v.to(dtype=torch.bfloat16).contiguous() for k, v in case.state_dict.items()}
    save_file(tensors, str(folder / name), metadata={**case.metadata, **(metadata or {})})
    return name


def workflow(rows: list[dict] | None, prefix: str) -> dict:
    """API-format text-to-image graph on the demo models, with a Loom LoRA Stack when ``rows`` is given."""
    graph: dict[str, dict] = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_FILE, "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_FILE, "type": "stable_diffusion"}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}},
    }
    model, clip = ["unet", 0], ["clip", 0]
    if rows is not None:
        graph["stack"] = {"class_type": "LoomLoraStack", "inputs": {"model": model, "clip": clip,
                                                                    "rows": json.dumps(rows)}}
        model, clip = ["stack", 0], ["stack", 1]
    graph.update({
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a red circle on a white table"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 11, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    })
    return graph


def run_to_image(server, graph: dict) -> np.ndarray:
    entry = server.wait(server.queue(graph))
    images = server.output_images(entry)
    assert images, f"no image in {entry.get('outputs')}"
    with Image.open(images[0]) as img:
        assert img.size == (128, 128)
        return np.asarray(img.convert("RGB"), dtype=np.float32)


def test_stack_of_three_formats_changes_the_image(comfy_server, loras_dir):
    kohya = save(demo_lora("kohya", "lora", seed=1, text_encoders=True), loras_dir, "e2e_kohya.safetensors",
                 {"modelspec.trigger_phrase": "l00m"})
    diffusers = save(demo_lora("diffusers", "loha", seed=2), loras_dir, "e2e_diffusers_loha.safetensors")
    (loras_dir / "e2e_disabled_corrupt.safetensors").write_bytes(b"\xff" * 64)  # never opened while off
    onetrainer = save(demo_lora("onetrainer", "lora", seed=3), loras_dir, "e2e_onetrainer.safetensors")
    rows = [{"lora": kohya, "strength": 0.4, "clip_strength": 0.5},
            {"lora": diffusers, "strength": 0.6, "blocks": "double1=0.5,single1=0"},
            {"lora": onetrainer, "on": False, "strength": 1.0},
            {"lora": "e2e_disabled_corrupt.safetensors", "on": False}]
    with_stack = run_to_image(comfy_server, workflow(rows, "loom_e2e_stack"))
    plain = run_to_image(comfy_server, workflow(None, "loom_e2e_plain"))
    assert np.isfinite(with_stack).all() and with_stack.std() > 0
    difference = float(np.abs(with_stack - plain).mean())
    logger.info("mean absolute pixel difference with / without the stack: %.2f / 255", difference)
    assert difference > 0.5, f"the LoRAs changed the image by only {difference:.3f} / 255 on average"
    # The disabled row must not count: the same stack without it gives the same image.
    again = run_to_image(comfy_server, workflow(rows[:2], "loom_e2e_stack_again"))
    assert float(np.abs(again - with_stack).max()) <= 1.0


def test_missing_lora_fails_with_its_name(comfy_server, loras_dir):
    rows = [{"lora": "no_such_lora_in_the_folder.safetensors", "strength": 1.0}]
    with pytest.raises(RuntimeError, match=r"no_such_lora_in_the_folder\.safetensors"):
        comfy_server.wait(comfy_server.queue(workflow(rows, "loom_e2e_missing")))
