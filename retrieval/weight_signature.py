"""Training-free weight signatures: one fixed-length vector per LoRA, computed from its low-rank factors.

Per targeted layer (fixed order of :class:`FluxLayout`, zero fill for layers the LoRA does not touch):

* **spectrum** — the top ``k`` singular values of ``ΔW = scale · up @ down``, from the ``r × r`` core
  ``R_up @ R_downᵀ`` of the QR factorisations ``up = Q_up R_up`` and ``downᵀ = Q_down R_down``
  (``ΔW = Q_up (R_up R_downᵀ) Q_downᵀ`` with orthonormal ``Q``), never materialising ``ΔW [out, in]``;
* **sketch** — ``S = G_out @ ΔW @ G_in`` with fixed seeded Gaussian matrices ``G_out [m, out]`` and
  ``G_in [in, q]`` (computed as ``(G_out @ up) @ (down @ G_in)``). ``⟨S₁, S₂⟩`` is an unbiased estimate of
  ``⟨ΔW₁, ΔW₂⟩_F`` (Johnson–Lindenstrauss), so sketch cosines estimate how much two LoRAs write the same
  directions into the same layers — independent of how each file splits ``ΔW`` into factors.

The two parts are each L2-normalised over all layers and concatenated with weights ``√w`` and ``√(1-w)``, so
the cosine of two signatures is ``w·cos(spectra) + (1-w)·cos(sketches)``.

What it finds: near-duplicates (re-saves, other formats, other ranks or precisions of the same LoRA),
versions and strength variants of one LoRA (the cosine ignores overall scale), families from one trainer
setup (same layers targeted, similar spectra), and files that share a concept through similar weights
(a subject or style written along the same directions). What it cannot do: read meaning from weights. It
cannot match a prompt on its own — a text query needs captions (text search) or the trained AutoLoRA
weight encoder, which learns the map from weights to text.
"""
from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..bounded_cache import BoundedCache, tensor_bytes
from .factors import FluxLayout, LowRankFactors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignatureConfig:
    """Signature shape: ``top_singular`` values and an ``sketch_rows × sketch_cols`` sketch per layer;
    ``spectrum_weight`` is ``w`` above; ``seed`` fixes the Gaussian sketch matrices (part of the model name)."""

    top_singular: int = 4
    sketch_rows: int = 4
    sketch_cols: int = 2
    spectrum_weight: float = 0.3
    seed: int = 0

    @property
    def per_layer(self) -> int:
        """Numbers per layer: ``k + m·q``."""
        return self.top_singular + self.sketch_rows * self.sketch_cols

    def model_name(self, layout: FluxLayout) -> str:
        """Identifies the vector space (layout + config) for storage beside the vectors."""
        return (f"weight-signature-v1:h{layout.hidden}:m{layout.mlp_ratio}:d{layout.double_blocks}:"
                f"s{layout.single_blocks}:k{self.top_singular}:{self.sketch_rows}x{self.sketch_cols}:"
                f"w{self.spectrum_weight}:seed{self.seed}")


_GAUSSIANS: BoundedCache[tuple[str, int, int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = BoundedCache(
    "weight-signature projections", max_bytes=256 << 20, weigh=tensor_bytes)


def _gaussians(name: str, d_in: int, d_out: int, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``G_out [rows, d_out]`` and ``G_in [d_in, cols]`` for one layer (same on every machine; cached)."""
    def make() -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        g_out = torch.randn(rows, d_out, generator=gen) / rows ** 0.5
        g_in = torch.randn(d_in, cols, generator=gen) / cols ** 0.5
        return g_out, g_in

    return _GAUSSIANS.get_or_put((name, d_in, d_out, rows, cols, seed), make)


def singular_values(factors: LowRankFactors, k: int) -> torch.Tensor:
    """Top ``k`` singular values of ``ΔW`` (zero-padded to ``k``) via the ``r × r`` QR core: ``[k]``."""
    up, down = factors.up.float(), factors.down.float()
    _, r_up = torch.linalg.qr(up)
    _, r_down = torch.linalg.qr(down.T)
    core = (r_up @ r_down.T) * abs(factors.scale)
    values = torch.linalg.svdvals(core)[:k]
    return torch.nn.functional.pad(values, (0, k - values.shape[0]))


def sketch(name: str, factors: LowRankFactors, config: SignatureConfig) -> torch.Tensor:
    """``G_out @ ΔW @ G_in`` flattened: ``[m·q]`` (``ΔW`` never materialised)."""
    up, down = factors.up.float(), factors.down.float()
    g_out, g_in = _gaussians(name, down.shape[1], up.shape[0], config.sketch_rows, config.sketch_cols, config.seed)
    return ((g_out @ up) @ (down @ g_in) * factors.scale).flatten()


def weight_signature(factors: Mapping[str, LowRankFactors], layout: FluxLayout,
                     config: SignatureConfig = SignatureConfig()) -> np.ndarray:
    """Signature of one LoRA: float32 ``[L · (k + m·q)]`` (L = ``len(layout.layers)``), unit norm, or all
    zeros when the LoRA touches none of the layout's layers. Raises ValueError on factors of the wrong shape."""
    k = config.top_singular
    spectra = torch.zeros(len(layout.layers), k)
    sketches = torch.zeros(len(layout.layers), config.sketch_rows * config.sketch_cols)
    for name, item in factors.items():
        position = layout.index.get(name)
        if position is None:
            continue
        layout.check(name, item)
        spectra[position] = singular_values(item, k)
        sketches[position] = sketch(name, item, config)
    parts = []
    for part, weight in ((spectra, config.spectrum_weight), (sketches, 1.0 - config.spectrum_weight)):
        norm = torch.linalg.vector_norm(part)
        parts.append(part.flatten() * (weight ** 0.5) / norm if norm > 0 else part.flatten())
    out = torch.cat(parts)
    norm = torch.linalg.vector_norm(out)
    return (out / norm if norm > 0 else out).numpy().astype(np.float32)
