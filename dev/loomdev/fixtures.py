"""Deterministic model fixtures that ComfyUI's own loaders accept, cached by a hash of this file.

Random weights from fixed seeds, built with ComfyUI's own classes so the key names are right by construction
(the Flux from a config ComfyUI's detection completes, written with BFL checkpoint names, which every supported
ComfyUI release loads):

* ``loom_demo_flux.safetensors``: Flux with hidden 3072 / 24 heads (what ComfyUI's detection fixes), 1 double +
  1 single block, ``txt_in`` and ``vector_in`` taking 768 features so CLIP-L-only conditioning drives it; bf16.
* ``loom_demo_clip_l.safetensors``: a CLIP-L text encoder for ``CLIPLoader`` (type ``stable_diffusion``).
* ``loom_demo_vae.safetensors``: a 16-channel Flux-style VAE for ``VAELoader``.

Run as ``python -m loomdev.fixtures`` (with ComfyUI importable) to build; ``ensure_fixtures()`` is idempotent.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path

from .paths import CACHE, comfyui_path, comfyui_version

log = logging.getLogger(__name__)

FLUX_FILE = "loom_demo_flux.safetensors"
CLIP_FILE = "loom_demo_clip_l.safetensors"
VAE_FILE = "loom_demo_vae.safetensors"
FILES = (FLUX_FILE, CLIP_FILE, VAE_FILE)

# The checkpoint's sizes; ComfyUI's detection supplies the rest (heads, axes, ... of Flux.1).
DEMO_FLUX_PARAMS = dict(in_channels=16, vec_in_dim=768, context_in_dim=768, hidden_size=3072, num_heads=24, depth=1,
                        depth_single_blocks=1)


def fixtures_dir() -> Path:
    key = hashlib.sha256(Path(__file__).read_bytes() + comfyui_version().encode()).hexdigest()[:16]
    return CACHE / f"fixtures-{key}"


def deterministic_state(named_shapes: dict[str, tuple[int, ...]], dtype) -> dict:
    """One seeded tensor per parameter name: weights ~ N(0, 1/fan_in), norm scales 1, biases 0."""
    import torch

    out = {}
    for name, shape in named_shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        is_norm = any(part in name for part in ("norm", "ln_", "layer_norm")) and len(shape) == 1
        if leaf in ("scale",) or (is_norm and leaf == "weight"):
            t = torch.ones(shape)
        elif leaf == "bias" or len(shape) == 1:
            t = torch.zeros(shape)
        else:
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            t = torch.randn(shape, generator=gen) * (fan_in ** -0.5)
        out[name] = t.to(dtype).contiguous()
    return out


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def build(out_dir: Path) -> None:
    """Write the three files into ``out_dir`` (ComfyUI must be importable)."""
    import comfy.ldm.flux.model
    import comfy.ops
    import comfy.sd1_clip
    import torch
    from comfy.ldm.models.autoencoder import AutoencodingEngine
    from lora_loom.composition.comfy_bridge.flux_model import checkpoint_state, complete_config
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        flux = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, dtype=torch.bfloat16,
                                         **complete_config(DEMO_FLUX_PARAMS))
        clip = comfy.sd1_clip.SDClipModel(device="meta")
        ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3,
                    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                    "dropout": 0.0}
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    parts = {
        FLUX_FILE: (checkpoint_state(_shapes(flux)), torch.bfloat16),
        CLIP_FILE: ({k: v for k, v in _shapes(clip.transformer).items()}, torch.float16),
        VAE_FILE: ({k: v for k, v in _shapes(vae).items() if not k.startswith("regularization")}, torch.float16),
    }
    for name, (shapes, dtype) in parts.items():
        state = deterministic_state(shapes, dtype)
        if name == CLIP_FILE:  # position ids are an index, not a weight
            for k in list(state):
                if k.endswith("position_ids"):
                    state[k] = torch.arange(77).unsqueeze(0)
        tmp = out_dir / (name + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "generator": "lora-loom dev fixtures"})
        os.replace(tmp, out_dir / name)
        log.info("wrote %s (%d tensors)", out_dir / name, len(state))


def ensure_fixtures() -> Path:
    """Build the fixtures once per cache key (in a subprocess with ComfyUI importable); return their folder."""
    out = fixtures_dir()
    if all((out / f).is_file() for f in FILES):
        return out
    log.info("generating demo model fixtures in %s (once)", out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), str(comfyui_path())]))
    subprocess.run([sys.executable, "-m", "loomdev.fixtures", str(out)], check=True, env=env,
                   cwd=str(comfyui_path()))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[loom fixtures] %(message)s")
    from lora_loom.comfy_env import import_comfy

    import_comfy(comfyui_path())
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else fixtures_dir())
