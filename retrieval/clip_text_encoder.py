"""The library's default text encoder inside ComfyUI: the CLIP-L the user already has for Flux.

Why CLIP-L: Flux conditions on it, every Flux user has its weights (``clip_l.safetensors`` beside T5), it runs
on CPU in milliseconds per caption, and its pooled output is the text space Flux's own ``vector_in`` reads.
:class:`ComfyClipTextEncoder` wraps a ComfyUI ``CLIP`` object (``DualCLIPLoader``/``CLIPLoader`` output, or a
CLIP-L file loaded by ``comfy_bridge.load_clip_l_file``) and exposes :class:`~.text_encoders.TextEncoder`: the
CLIP-L tower's *unprojected* pooled output (the EOS token's final hidden state, what Flux's ``vector_in`` takes),
L2-normalised.
T5 is never run: it is 20× larger and gives no pooled vector. This module only calls methods of the
object it is given (``tokenizer.clip_l``, ``cond_stage_model.clip_l``, ``load_model``); it imports no ComfyUI.

Where no CLIP is at hand (the web panel before any CLIP is configured, tests), the library falls back to
:class:`~.text_encoders.HashedTextEncoder` (offline, deterministic, no weights); see ``comfy_bridge``.
"""
from __future__ import annotations

import logging
import zlib
from typing import Any

import torch

logger = logging.getLogger(__name__)

CLIP_TOWER = "clip_l"
ENCODE_BATCH = 32


def _fingerprint(tower: torch.nn.Module) -> str:
    """CRC of the tensors that change with any fine-tune (final layer norm, position embedding), as float32."""
    crc = 0
    for key, value in sorted(tower.state_dict().items()):
        if "final_layer_norm" in key or "position_embedding" in key:
            crc = zlib.crc32(key.encode(), crc)
            crc = zlib.crc32(value.detach().float().cpu().contiguous().numpy().tobytes(), crc)
    return f"{crc:08x}"


class ComfyClipTextEncoder:
    """CLIP-L pooled text embeddings from a ComfyUI ``CLIP`` object (Flux's dual CLIP, or CLIP-L alone).

    ``name`` is ``comfy-clip-l:<crc of weights>`` so vectors from other weights are never compared with these;
    ``dim`` is the tower's hidden size (768 for CLIP-L).
    """

    def __init__(self, clip: Any, label: str = "") -> None:
        tower = getattr(getattr(clip, "cond_stage_model", None), CLIP_TOWER, None)
        tokenizer = getattr(getattr(clip, "tokenizer", None), CLIP_TOWER, None)
        if tower is None or tokenizer is None:
            raise ValueError(f"CLIP {label or type(getattr(clip, 'cond_stage_model', clip)).__name__} has no CLIP-L "
                             "text tower (clip_l); connect Flux's DualCLIPLoader / CLIPLoader output or configure "
                             "a CLIP-L file")
        self.clip, self.tower, self.tokenizer = clip, tower, tokenizer
        norm = next((v for k, v in tower.state_dict().items() if k.endswith("final_layer_norm.weight")), None)
        if norm is None:
            raise ValueError(f"CLIP {label}: the clip_l tower has no final_layer_norm.weight; not a CLIP-L model")
        self.dim = int(norm.shape[0])
        self.name = f"comfy-clip-l:d{self.dim}:{_fingerprint(tower)}"
        self.label = label

    def _tokens(self, text: str) -> list[int]:
        """Token ids of the first 77-token section of ``text`` (prompt weights ignored)."""
        sections = self.tokenizer.tokenize_with_weights(text)
        return [int(pair[0]) for pair in sections[0]]

    def encode(self, texts: list[str]) -> torch.Tensor:
        """``texts`` (N strings) → float32 ``[N, dim]`` unit rows (unprojected pooled CLIP-L output)."""
        if not texts:
            return torch.zeros(0, self.dim)
        self.clip.load_model()
        chunks = []
        self.tower.set_clip_options({"projected_pooled": False})
        try:
            with torch.no_grad():
                for start in range(0, len(texts), ENCODE_BATCH):
                    tokens = [self._tokens(t) for t in texts[start:start + ENCODE_BATCH]]
                    pooled = self.tower.encode(tokens)[1]
                    if pooled is None:
                        raise ValueError(f"CLIP {self.label}: the clip_l tower returned no pooled output")
                    chunks.append(pooled.float().cpu())
        finally:
            self.tower.reset_clip_options()
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

