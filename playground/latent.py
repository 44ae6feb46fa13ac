"""The playground latent: an exact, invertible pixel rearrangement instead of a trained autoencoder.

``encode``: image ``[B, H, W, 3]`` in [0, 1] -> ``2x-1`` -> pixel-unshuffle by 4 -> latent ``[B, 48, H/4, W/4]``.
``decode`` is its exact inverse (clamped to [0, 1]). Why not a small VAE: the playground exists to measure
composition, and a fixed invertible map adds no reconstruction error of its own (``decode(encode(x)) == x`` up to
float rounding), so every miss the detector reports belongs to the diffusion model and its LoRAs; it also costs no
training time. Channel ``c * 16 + i * 4 + j`` holds colour channel ``c`` of pixel ``(i, j)`` of each 4x4 cell.
Pure torch.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

CELL = 4
LATENT_CHANNELS = 3 * CELL * CELL


def encode(images: torch.Tensor) -> torch.Tensor:
    """Images ``[B, H, W, 3]`` (0..1, H and W multiples of 4) -> latents ``[B, 48, H/4, W/4]`` in [-1, 1]."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % CELL or images.shape[2] % CELL:
        raise ValueError(f"playground/latent.py: expected images [B, H, W, 3] with H, W multiples of {CELL}, "
                         f"got {tuple(images.shape)}")
    return torch.nn.functional.pixel_unshuffle(images.movedim(-1, 1) * 2.0 - 1.0, CELL)


def decode(latents: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, 48, h, w]`` -> images ``[B, 4h, 4w, 3]`` clamped to [0, 1] (float32)."""
    if latents.ndim != 4 or latents.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"playground/latent.py: expected latents [B, {LATENT_CHANNELS}, h, w], "
                         f"got {tuple(latents.shape)}")
    pixels = torch.nn.functional.pixel_shuffle(latents.float(), CELL)
    return ((pixels + 1.0) * 0.5).clamp(0.0, 1.0).movedim(1, -1).contiguous()


def empty(batch: int, width: int, height: int) -> torch.Tensor:
    """Zero latents ``[batch, 48, height/4, width/4]`` for a ``width x height`` image."""
    if width % CELL or height % CELL or width <= 0 or height <= 0 or batch <= 0:
        raise ValueError(f"playground/latent.py: size {width}x{height} (batch {batch}) must be positive "
                         f"multiples of {CELL}")
    return torch.zeros(batch, LATENT_CHANNELS, height // CELL, width // CELL)


def preview_factors() -> list[list[float]]:
    """``[48, 3]`` linear factors from latent to a [-1, 1] RGB preview: the mean of each 4x4 cell's pixels."""
    per_pixel = 1.0 / (CELL * CELL)
    return [[per_pixel if channel // (CELL * CELL) == rgb else 0.0 for rgb in range(3)]
            for channel in range(LATENT_CHANNELS)]
