"""In-process ComfyUI model objects for bridge tests: tiny Flux models built from ComfyUI's own classes.

``TINY_FLUX`` describes the checkpoint (sizes, heads); ComfyUI's detection completes it into the config its
release needs (``flux_model.complete_config``).

Importing this module requires ComfyUI to be importable (tests/bridge/conftest.py arranges that).
"""
from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch
from lora_loom.composition.comfy_bridge.flux_model import flux_model

TINY_FLUX = dict(
    image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=64,
    mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2,
    qkv_bias=True, guidance_embed=True,
)


def seeded_weights(module: torch.nn.Module, seed: int = 0, std_scale: float = 1.0) -> None:
    """Fill every parameter from a generator seeded by (seed, name): weights ~ N(0, 1/fan_in), norms 1, bias small."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "scale" or ("norm" in name and p.ndim == 1 and leaf == "weight"):
                p.copy_(torch.ones_like(p))
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * std_scale * fan_in ** -0.5)


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI Flux ``BaseModel`` with tiny dimensions wrapped in a real ``ModelPatcher`` on the CPU."""
    model = flux_model({**TINY_FLUX, **overrides}, dtype=dtype)
    seeded_weights(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def flux_inputs(patcher: comfy.model_patcher.ModelPatcher, batch: int = 1, latent_hw: tuple[int, int] = (8, 8),
                txt_len: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """Deterministic inputs for ``diffusion_model.forward``: x [B,16,H,W], timestep [B], context, y, guidance."""
    cfg = patcher.model.model_config.unet_config
    gen = torch.Generator().manual_seed(seed)
    dtype = next(patcher.model.diffusion_model.parameters()).dtype
    return dict(
        x=torch.randn(batch, cfg["in_channels"], *latent_hw, generator=gen).to(dtype),
        timestep=torch.full((batch,), 0.7, dtype=dtype),
        context=torch.randn(batch, txt_len, cfg["context_in_dim"], generator=gen).to(dtype),
        y=torch.randn(batch, cfg["vec_in_dim"], generator=gen).to(dtype),
        guidance=torch.full((batch,), 3.5, dtype=dtype),
    )


def empty_loras_folder() -> Path:
    """ComfyUI's (bridge-tier) loras folder, emptied: tests that write LoRA files start from a clean folder."""
    folder = Path(folder_paths.get_folder_paths("loras")[0])
    folder.mkdir(parents=True, exist_ok=True)
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    return folder
