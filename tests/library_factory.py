"""Fake-but-real LoRA files for library tests: real safetensors (header metadata + small tensors), sidecars
of every kind, and a concept library whose weights carry known concepts.

Loaded by tests with ``load_factory()`` (tests are not a package and the repo root is never on sys.path).
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# smallest valid PNG (1x1, grey)
PNG_BYTES = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
                          "0000000a49444154789c63600000000200015e2b2b7c0000000049454e44ae426082")


def save_lora(path: Path, tensors: Mapping[str, torch.Tensor] | None = None,
              metadata: Mapping[str, str] | None = None) -> Path:
    """Write a real safetensors file; default tensors are a rank-2 kohya LoRA on one Flux module."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        gen = torch.Generator().manual_seed(zlib.crc32(str(path).encode()))
        tensors = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 8, generator=gen),
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(24, 2, generator=gen),
                   "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))
    return path


def write_json(path: Path, content: object) -> Path:
    """Write ``content`` as JSON."""
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def civitai_info(model_name: str, words: Sequence[str], base_model: str, tags: Sequence[str], description: str,
                 sha256: str) -> dict:
    """A civitai model-version object as civitai helpers save it to ``<name>.civitai.info``."""
    return {"id": 1, "name": "v1.0", "baseModel": base_model, "trainedWords": list(words),
            "description": None, "model": {"name": model_name, "type": "LORA", "tags": list(tags),
                                            "description": description},
            "files": [{"name": "training.zip", "type": "Training Data", "hashes": {"SHA256": "0" * 64}},
                      {"name": "x.safetensors", "type": "Model", "primary": True,
                       "hashes": {"AutoV2": sha256[:10].upper(), "SHA256": sha256.upper()}}]}


def lora_manager_info(model_name: str, base_model: str, tags: Sequence[str], notes: str, sha256: str,
                      civitai: dict | None = None) -> dict:
    """A LoRA Manager ``<name>.metadata.json``."""
    return {"file_name": "x", "model_name": model_name, "base_model": base_model, "tags": list(tags),
            "notes": notes, "sha256": sha256, "modelDescription": "<p>Manager &amp; description</p>",
            "civitai": civitai or {}}


def rgthree_info(name: str, base_model: str, words: Sequence[str], note: str, sha256: str) -> dict:
    """An rgthree ``<name>.rgthree-info.json`` (trained words as ``{"word": ...}`` objects)."""
    return {"file": "x.safetensors", "name": name, "type": "loras", "baseModel": base_model, "sha256": sha256,
            "trainedWords": [{"word": w, "civitai": True} for w in words], "userNote": note,
            "raw": {"civitai": {"model": {"name": name, "tags": ["from-rgthree-raw"]}}}}


def flux_kohya_key(module: str, part: str) -> str:
    """Kohya spelling of a canonical Flux module: ``double_blocks.0.img_attn.qkv`` → ``lora_unet_double_blocks_0_
    img_attn_qkv.<part>``."""
    return f"lora_unet_{module.replace('.', '_')}.{part}"


@dataclass(frozen=True)
class ConceptAdapter:
    """A generated adapter whose weights carry ``concept`` (an index) in the layers the concept owns."""

    path: Path
    relpath: str
    concept: int
    caption: str


CONCEPT_WORDS = ("watercolor", "cyberpunk", "origami", "noir", "ukiyoe", "claymation", "pixelart", "baroque",
                 "vaporwave", "charcoal", "stainedglass", "lowpoly")


def concept_library(folder: Path, layers: Sequence[tuple[str, int, int]], concepts: int, per_concept: int,
                    rank: int = 4, seed: int = 0, noise: float = 1.0, style: str = "kohya") -> list[ConceptAdapter]:
    """Write ``concepts × per_concept`` LoRAs. ``layers`` lists ``(module, d_in, d_out)``.

    Concept c owns a fixed subset (about half) of ``layers`` and, in each, a fixed random rank-1 direction
    ``u_c v_cᵀ``. An adapter of concept c stores ``ΔW = u_c v_cᵀ + noise·(random rank-(r-1) part)`` in the
    concept's layers, expressed through factors rotated by a random invertible r×r matrix (so no two files
    share factor values), plus weak noise-only updates in two other layers. Names carry no concept word.
    """
    gen = torch.Generator().manual_seed(seed)
    owned = [sorted(torch.randperm(len(layers), generator=gen)[: max(1, len(layers) // 2)].tolist())
             for _ in range(concepts)]
    directions = [{i: (torch.randn(layers[i][2], generator=gen), torch.randn(layers[i][1], generator=gen))
                   for i in owned[c]} for c in range(concepts)]
    made = []
    for c in range(concepts):
        for k in range(per_concept):
            tensors: dict[str, torch.Tensor] = {}
            extra = torch.randperm(len(layers), generator=gen)[:2].tolist()
            for i in sorted(set(owned[c]) | set(extra)):
                module, d_in, d_out = layers[i]
                up = noise * torch.randn(d_out, rank, generator=gen) / rank ** 0.5
                down = torch.randn(rank, d_in, generator=gen) / rank ** 0.5
                if i in directions[c]:
                    u, v = directions[c][i]
                    up[:, 0], down[0] = u, v
                mix = torch.randn(rank, rank, generator=gen) + 2.0 * torch.eye(rank)
                up, down = up @ mix, torch.linalg.solve(mix, down)
                names = ((flux_kohya_key(module, "lora_up.weight"), flux_kohya_key(module, "lora_down.weight"),
                          flux_kohya_key(module, "alpha")) if style == "kohya" else
                         (f"diffusion_model.{module}.lora_B.weight", f"diffusion_model.{module}.lora_A.weight",
                          f"diffusion_model.{module}.alpha"))
                tensors[names[0]], tensors[names[1]] = up, down
                tensors[names[2]] = torch.tensor(float(rank))
            relpath = f"concepts/c{c:02d}_{k:02d}.safetensors"
            caption = f"a {CONCEPT_WORDS[c % len(CONCEPT_WORDS)]} style lora"
            made.append(ConceptAdapter(path=save_lora(folder / relpath, tensors, {"ss_output_name": f"item {c}-{k}"}),
                                       relpath=relpath, concept=c, caption=caption))
    return made
