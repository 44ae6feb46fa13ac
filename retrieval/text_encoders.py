"""Text encoders for semantic search: a protocol, a deterministic offline encoder, and open-clip (lazy).

Every encoder returns L2-normalised float32 rows ``[N, D]``; its ``name`` is stored beside the vectors, so
switching encoders never compares vectors from two different spaces.
"""
from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


@runtime_checkable
class TextEncoder(Protocol):
    """Maps texts to unit vectors. ``name`` identifies the model (and its weights), ``dim`` is D."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor:
        """``texts`` (N strings) → float32 ``[N, D]``, each row of norm 1 (an all-zero text stays zero)."""
        ...


class HashedTextEncoder:
    """Hashed character n-grams + word unigrams into ``dim`` (default 256) signed buckets, L2-normalised.

    Why this exists: tests and the benchmark need a text encoder that is deterministic, offline, fast
    (10k captions/s on one core) and needs no model weights. Word unigrams reward exact term overlap;
    character 3-/4-grams of each word (with boundary marks) make spelling variants meet (``pixelart`` vs
    ``pixel art``, ``watercolour`` vs ``watercolor``). Signed hashing (the sign comes from one hash bit) keeps
    bucket collisions unbiased. It knows nothing of meaning — ``cat`` and ``kitten`` are unrelated to it —
    so it is plumbing for tests, not a substitute for CLIP.
    """

    def __init__(self, dim: int = 256, ngram_sizes: Sequence[int] = (3, 4), ngram_weight: float = 0.5) -> None:
        if dim < 8:
            raise ValueError(f"HashedTextEncoder: dim must be >= 8, got {dim}")
        self.dim = dim
        self.ngram_sizes = tuple(ngram_sizes)
        self.ngram_weight = ngram_weight
        self.name = f"hashed-ngram-v1-d{dim}-n{'-'.join(map(str, self.ngram_sizes))}-w{ngram_weight}"

    def _features(self, text: str) -> dict[str, float]:
        features: dict[str, float] = {}
        for word in _WORD.findall(text.lower()):
            features["w:" + word] = features.get("w:" + word, 0.0) + 1.0
            marked = f"<{word}>"
            for n in self.ngram_sizes:
                for i in range(max(0, len(marked) - n + 1)):
                    key = "c:" + marked[i:i + n]
                    features[key] = features.get(key, 0.0) + self.ngram_weight
        return features

    def encode(self, texts: list[str]) -> torch.Tensor:
        """``texts`` → ``[N, dim]`` float32 unit rows (sub-linear term weights ``1 + log(tf)``)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for key, weight in self._features(text).items():
                h = zlib.crc32(key.encode("utf-8"))
                sign = 1.0 if (h >> 31) & 1 else -1.0
                out[row, h % self.dim] += sign * (1.0 + np.log(weight) if weight > 1.0 else weight)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return torch.from_numpy(out / np.maximum(norms, 1e-12))


class OpenClipTextEncoder:
    """open-clip-torch text tower (``pip install open-clip-torch``; imported on first use, not at import).

    Default ``ViT-L-14`` / ``openai`` is the CLIP-L that Flux itself conditions on. Weights are fetched by
    open_clip on first use into its cache; pass ``pretrained`` as a local file path to stay offline.
    """

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str = "openai", device: str = "cpu") -> None:
        self.model_name, self.pretrained, self.device = model_name, pretrained, device
        self.name = f"open-clip:{model_name}:{pretrained}"
        self.dim = 0
        self._model: torch.nn.Module | None = None
        self._tokenizer: object | None = None

    def _load(self) -> None:
        try:
            import open_clip  # noqa: PLC0415 - optional dependency, imported lazily
        except ImportError as exc:
            raise RuntimeError("OpenClipTextEncoder needs the optional package open-clip-torch "
                               "(pip install open-clip-torch)") from exc
        model, _, _ = open_clip.create_model_and_transforms(self.model_name, pretrained=self.pretrained,
                                                            device=self.device)
        self._model = model.eval()
        self._tokenizer = open_clip.get_tokenizer(self.model_name)
        self.dim = int(model.text_projection.shape[1])

    def encode(self, texts: list[str]) -> torch.Tensor:
        """``texts`` → ``[N, D]`` float32 unit rows (D = 768 for ViT-L-14)."""
        if self._model is None:
            self._load()
        with torch.inference_mode():
            tokens = self._tokenizer(texts).to(self.device)  # type: ignore[operator]
            features = self._model.encode_text(tokens).float()  # type: ignore[union-attr]
        return torch.nn.functional.normalize(features, dim=-1).cpu()


def adapter_caption(fields: Mapping[str, object], max_description: int = 300) -> str:
    """One caption per adapter for text embedding and for training the weight encoder.

    ``fields`` holds ``name``, ``title``, ``trigger_words``, ``tags``, ``tag_frequency`` (dict) and
    ``description``; missing keys are skipped.
    """
    parts = [str(fields.get("name") or ""), str(fields.get("title") or "")]
    triggers = list(fields.get("trigger_words") or ())  # type: ignore[call-overload]
    tags = list(fields.get("tags") or ())  # type: ignore[call-overload]
    frequency = list(dict(fields.get("tag_frequency") or {}))[:12]  # type: ignore[call-overload]
    if triggers:
        parts.append("trigger words: " + ", ".join(triggers))
    if tags:
        parts.append("tags: " + ", ".join(tags))
    if frequency:
        parts.append("dataset tags: " + ", ".join(frequency))
    description = str(fields.get("description") or "")[:max_description]
    if description:
        parts.append(description)
    return ". ".join(p for p in parts if p)
