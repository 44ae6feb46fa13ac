"""The playground text encoder: a word-level tokenizer over the world's words and a frozen embedding table.

A prompt becomes ``[<start>, word..., <pad>...]`` of fixed length :data:`TEXT_LENGTH`; each token is its word's
row of a frozen random table ``[V, C]`` plus a frozen sinusoidal position row. Frozen random rows in 64
dimensions are nearly orthogonal, so every word, trigger words included, is distinct from the start, the way
a large pretrained text encoder knows words the diffusion model never saw; the Flux model learns what words
mean through ``txt_in`` and its text stream. Nothing in the encoder is trained, so concept LoRAs need no
text-encoder part (like most Flux LoRAs) and the table is stored beside the model for exact reloading.
Pure torch.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

from .world import ALL_SHAPES, ALL_TEXTURES, CLASS_WORDS, COLOURS, STYLE_TEXTURES

logger = logging.getLogger(__name__)

TEXT_LENGTH = 16
TEXT_WIDTH = 64
PAD, START = "<pad>", "<start>"
# New words go at the end: the frozen table's rows are drawn in order, so earlier words keep their rows.
VOCABULARY: tuple[str, ...] = (PAD, START, "a", "and", "on", "in", "the", "left", "right", "center",
                                *COLOURS, *ALL_SHAPES, *(t for t in ALL_TEXTURES if t not in STYLE_TEXTURES),
                                *CLASS_WORDS)


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt: ``ids`` of length :data:`TEXT_LENGTH` and the ``words`` it holds (no start/pad)."""

    ids: tuple[int, ...]
    words: tuple[str, ...]


def tokenize(prompt: str) -> PromptTokens:
    """Split ``prompt`` into known words (case and punctuation ignored); raise naming any unknown word."""
    words = tuple(re.findall(r"[a-z]+", prompt.lower()))
    unknown = sorted({w for w in words if w not in VOCABULARY})
    if unknown:
        raise ValueError(f"playground/text.py: unknown word(s) {unknown} in prompt {prompt!r}; the playground "
                         f"knows {[w for w in VOCABULARY if not w.startswith('<')]}")
    if len(words) > TEXT_LENGTH - 1:
        raise ValueError(f"playground/text.py: prompt {prompt!r} has {len(words)} words; at most "
                         f"{TEXT_LENGTH - 1} fit")
    ids = [VOCABULARY.index(START)] + [VOCABULARY.index(w) for w in words]
    ids += [VOCABULARY.index(PAD)] * (TEXT_LENGTH - len(ids))
    return PromptTokens(ids=tuple(ids), words=words)


def text_tables(seed: int = 0) -> dict[str, torch.Tensor]:
    """The frozen tables: ``embedding`` ``[V, C]`` ~ N(0, 1) from ``seed`` and sinusoidal ``position`` ``[T, C]``."""
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(len(VOCABULARY), TEXT_WIDTH, generator=generator)
    steps = torch.arange(TEXT_LENGTH, dtype=torch.float32)[:, None]
    rates = torch.exp(-math.log(100.0) * torch.arange(0, TEXT_WIDTH, 2, dtype=torch.float32) / TEXT_WIDTH)
    position = torch.zeros(TEXT_LENGTH, TEXT_WIDTH)
    position[:, 0::2], position[:, 1::2] = torch.sin(steps * rates), torch.cos(steps * rates)
    return {"embedding": embedding, "position": position}


class PlaygroundTextEncoder(torch.nn.Module):
    """Frozen tables as buffers; ``forward(ids [B, T], weights [B, T] | None)`` -> (cond ``[B, T, C]``,
    pooled ``[B, C]``). Pooled is the mean embedding of the prompt's words (the start token when empty)."""

    def __init__(self, tables: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        tables = tables if tables is not None else text_tables()
        expected = {"embedding": (len(VOCABULARY), TEXT_WIDTH), "position": (TEXT_LENGTH, TEXT_WIDTH)}
        for name, shape in expected.items():
            if name not in tables or tuple(tables[name].shape) != shape:
                got = tuple(tables[name].shape) if name in tables else "missing"
                raise ValueError(f"playground/text.py: table {name!r} should be {shape}, got {got}")
        self.register_buffer("embedding", tables["embedding"].float().clone())
        self.register_buffer("position", tables["position"].float().clone())

    def forward(self, ids: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        words = self.embedding[ids]
        if weights is not None:
            words = words * weights[..., None].to(words.dtype)
        cond = words + self.position[None, : ids.shape[1]]
        real = (ids != VOCABULARY.index(PAD)) & (ids != VOCABULARY.index(START))
        real = torch.where(real.any(1, keepdim=True), real, ids == VOCABULARY.index(START))
        pooled = (words * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        return cond, pooled

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (cond ``[B, T, C]``, pooled ``[B, C]``)."""
        ids = torch.tensor([tokenize(p).ids for p in prompts], dtype=torch.long, device=self.embedding.device)
        return self.forward(ids)
