"""AutoLoRA-style weight encoder: embeds a LoRA's weights into a text encoder's space, trained contrastively.

Tokens: one per targeted Flux layer (:class:`FluxLayout` order). For layer ``l`` of kind ``t`` the adapter
is probed with a learned vector ``p_t [d_in]``: ``y = scale · (p_t @ downᵀ) @ upᵀ [d_out]`` (``ΔW p_t``
without materialising ``ΔW``), every response of one adapter is divided by their common RMS (so strength
does not matter, relative layer magnitudes do), then ``Linear_t(d_out → D)``. Layers the LoRA does not touch
give zero tokens. Learned position embeddings are added, 2 transformer layers mix the tokens, LayerNorm,
mean pool → ``[D]``, L2-normalised. Training (:func:`train_weight_encoder`) uses a symmetric InfoNCE loss
of ``cosine / temperature`` against frozen text embeddings of the adapters' metadata captions.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..files.writing import replaced_atomically
from .factors import FluxLayout, LowRankFactors

logger = logging.getLogger(__name__)

TrainingProgress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class WeightEncoderConfig:
    """Architecture: Flux layout (``hidden``, ``mlp_ratio``, block counts), output ``dim`` D (= the text
    encoder's), attention ``heads``, transformer ``depth``; ``text_encoder`` names the space it maps into."""

    hidden: int = 3072
    mlp_ratio: float = 4.0
    double_blocks: int = 19
    single_blocks: int = 38
    dim: int = 256
    heads: int = 4
    depth: int = 2
    text_encoder: str = ""

    @property
    def layout(self) -> FluxLayout:
        """The Flux layout the tokens follow."""
        return FluxLayout(self.hidden, self.mlp_ratio, self.double_blocks, self.single_blocks)


@dataclass(frozen=True)
class PackedKind:
    """A batch's factors on every layer of one kind: ``up [B, n, d_out, R]`` (scale folded in),
    ``down [B, n, R, d_in]`` (zero where absent) and the layers' token ``positions [n]``."""

    up: torch.Tensor
    down: torch.Tensor
    positions: torch.Tensor


def _key(kind: str) -> str:
    return kind.replace(".", "_")


class WeightEncoder(nn.Module):
    """LoRA factors → unit vector ``[D]`` in the text encoder's space (see the module docstring)."""

    def __init__(self, config: WeightEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.layout = config.layout
        self.probes = nn.ParameterDict({_key(kind): nn.Parameter(torch.randn(d_in) / d_in ** 0.5)
                                        for kind, (d_in, _) in self.layout.kinds.items()})
        self.readouts = nn.ModuleDict({_key(kind): nn.Linear(d_out, config.dim)
                                       for kind, (_, d_out) in self.layout.kinds.items()})
        self.positions = nn.Parameter(torch.randn(len(self.layout.layers), config.dim) * 0.02)
        block = nn.TransformerEncoderLayer(config.dim, config.heads, 4 * config.dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.mixer = nn.TransformerEncoder(block, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        self.name = "autolora-untrained"
        self.kind_positions: dict[str, list[int]] = {}
        for position, spec in enumerate(self.layout.layers):
            self.kind_positions.setdefault(spec.kind, []).append(position)

    def pack(self, batch: Sequence[Mapping[str, LowRankFactors]]) -> dict[str, PackedKind]:
        """Group a batch's factors by layer kind, zero-padded to the batch's largest rank (no gradients)."""
        device = self.positions.device
        rank = max((f.rank for item in batch for f in item.values()), default=1)
        packed: dict[str, PackedKind] = {}
        for kind, positions in self.kind_positions.items():
            d_in, d_out = self.layout.kinds[kind]
            ups = torch.zeros(len(batch), len(positions), d_out, rank)
            downs = torch.zeros(len(batch), len(positions), rank, d_in)
            for b, item in enumerate(batch):
                for n, position in enumerate(positions):
                    spec = self.layout.layers[position]
                    factors = item.get(spec.name)
                    if factors is None:
                        continue
                    self.layout.check(spec.name, factors)
                    ups[b, n, :, :factors.rank] = factors.up.float() * factors.scale
                    downs[b, n, :factors.rank] = factors.down.float()
            packed[kind] = PackedKind(up=ups.to(device), down=downs.to(device),
                                      positions=torch.tensor(positions, device=device))
        return packed

    def tokens(self, packed: Mapping[str, PackedKind]) -> torch.Tensor:
        """Layer tokens before mixing: ``[B, L, D]`` (zeros for untouched layers)."""
        responses = {kind: torch.einsum("bnor,bnr->bno", p.up, torch.einsum("bnri,i->bnr", p.down,
                                                                              self.probes[_key(kind)]))
                     for kind, p in packed.items()}
        batch = next(iter(packed.values())).up.shape[0]
        squares = sum(r.pow(2).sum(dim=(1, 2)) for r in responses.values())
        counts = sum(float(r.shape[1] * r.shape[2]) for r in responses.values())
        rms = torch.sqrt(squares / counts).clamp_min(1e-12)[:, None, None]
        tokens = torch.zeros(batch, len(self.layout.layers), self.config.dim, device=self.positions.device)
        for kind, response in responses.items():
            read = self.readouts[_key(kind)](response / rms)
            present = (response.abs().sum(dim=-1, keepdim=True) > 0).to(read.dtype)
            tokens = tokens.index_add(1, packed[kind].positions, read * present)
        return tokens

    def forward(self, batch: Sequence[Mapping[str, LowRankFactors]]) -> torch.Tensor:
        """``B`` adapters (canonical module → factors) → ``[B, D]`` unit rows."""
        tokens = self.tokens(self.pack(batch)) + self.positions
        pooled = self.norm(self.mixer(tokens)).mean(dim=1)
        return nn.functional.normalize(pooled, dim=-1)

    def fingerprint(self) -> str:
        """A name for the vector space of these weights (config + CRC of the parameters)."""
        crc = 0
        for key, value in sorted(self.state_dict().items()):
            crc = zlib.crc32(key.encode(), crc)
            crc = zlib.crc32(value.detach().float().cpu().numpy().tobytes(), crc)
        return f"autolora:{self.config.text_encoder}:d{self.config.dim}:{crc:08x}"


@dataclass(frozen=True)
class TrainingReport:
    """Loss per epoch (mean over its batches) and the number of optimiser steps."""

    epoch_losses: tuple[float, ...]
    steps: int


def info_nce(weight_vectors: torch.Tensor, text_vectors: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch: ``weight_vectors`` [B, D] and ``text_vectors`` [B, D] (unit rows).

    Items whose captions embed identically (same concept) are all positives of each other (soft targets),
    so duplicates in a batch are not pushed apart.
    """
    logits = weight_vectors @ text_vectors.T / temperature
    same = (text_vectors @ text_vectors.T > 0.999).float()
    targets = same / same.sum(dim=1, keepdim=True)
    loss_w = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    loss_t = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (loss_w + loss_t) / 2


def train_weight_encoder(encoder: WeightEncoder, adapters: Sequence[Mapping[str, LowRankFactors]],
                         caption_vectors: torch.Tensor, *, epochs: int = 30, batch_size: int = 32,
                         learning_rate: float = 1e-3, temperature: float = 0.07, seed: int = 0,
                         progress: TrainingProgress | None = None, checkpoint: str | None = None) -> TrainingReport:
    """Train ``encoder`` so that ``encoder([a_i])`` is near ``caption_vectors[i]`` ([N, D], frozen text
    embeddings of the adapters' metadata captions). ``progress(step, total_steps, loss)`` after each step;
    ``checkpoint`` (a path stem) saves the result with :func:`save_weight_encoder`."""
    if caption_vectors.shape != (len(adapters), encoder.config.dim):
        raise ValueError(f"caption_vectors has shape {tuple(caption_vectors.shape)}, expected "
                         f"({len(adapters)}, {encoder.config.dim})")
    text = nn.functional.normalize(caption_vectors.float(), dim=-1)
    optimiser = torch.optim.AdamW(encoder.parameters(), lr=learning_rate, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = (len(adapters) + batch_size - 1) // batch_size
    total, step, losses = epochs * per_epoch, 0, []
    encoder.train()
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(adapters), generator=gen).tolist()
            running = 0.0
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                loss = info_nce(encoder([adapters[i] for i in index]), text[index], temperature)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                step += 1
                running += loss.item()
                if progress is not None:
                    progress(step, total, loss.item())
            losses.append(running / per_epoch)
    encoder.eval()
    encoder.name = encoder.fingerprint()
    if checkpoint is not None:
        save_weight_encoder(encoder, checkpoint)
    return TrainingReport(epoch_losses=tuple(losses), steps=step)


def save_weight_encoder(encoder: WeightEncoder, stem: str | os.PathLike[str]) -> tuple[str, str]:
    """Write ``<stem>.safetensors`` (weights) and ``<stem>.json`` (config); returns both paths."""
    stem = os.fspath(stem)
    weights, config = stem + ".safetensors", stem + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with replaced_atomically(weights) as temporary:
        save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, temporary,
                  metadata={"format": "lora-loom-weight-encoder-v1"})
    with replaced_atomically(config) as temporary, open(temporary, "w", encoding="utf-8") as fh:
        json.dump({"format": "lora-loom-weight-encoder-v1", **asdict(encoder.config)}, fh, indent=1)
    return weights, config


def load_weight_encoder(stem: str | os.PathLike[str]) -> WeightEncoder:
    """Load a checkpoint written by :func:`save_weight_encoder` (``stem`` without suffix)."""
    stem = os.fspath(stem)
    with open(stem + ".json", encoding="utf-8") as fh:
        raw = json.load(fh)
    if raw.pop("format", None) != "lora-loom-weight-encoder-v1":
        raise ValueError(f"{stem}.json: field 'format' is not 'lora-loom-weight-encoder-v1'")
    encoder = WeightEncoder(WeightEncoderConfig(**raw))
    state = load_file(stem + ".safetensors")
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{stem}.safetensors: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    encoder.eval()
    encoder.name = encoder.fingerprint()
    return encoder
