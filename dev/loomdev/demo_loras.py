"""Small deterministic demo LoRAs for the demo Flux (hidden 3072, 1 double + 1 single block), with previews.

The example workflows and the web panel need LoRA files that every machine has: ``prepare_workspace`` copies
these into ``models/loras`` (copies, not links: the library refuses links that leave the loras folders). They are
kohya-format files from fixed seeds with trigger-word metadata, each beside a ``.preview.png`` in its colour.
Built once per cache key (a hash of this file) in ``$LOOM_CACHE/demo-loras-<hash>/``; torch and pillow only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from .paths import CACHE

log = logging.getLogger(__name__)

HIDDEN = 3072
MLP = 4 * HIDDEN
RANK = 4
# kohya module -> (out features, in features) on the demo Flux
MODULES = {
    "double_blocks_0_img_attn_qkv": (3 * HIDDEN, HIDDEN),
    "double_blocks_0_img_mlp_0": (MLP, HIDDEN),
    "single_blocks_0_linear2": (HIDDEN, HIDDEN + MLP),
}


@dataclass(frozen=True)
class DemoLora:
    """One demo LoRA: its file name, trigger phrase, words for the library and the preview's colour."""

    file_name: str
    trigger: str
    title: str
    description: str
    tags: tuple[str, ...]
    rgb: tuple[int, int, int]

    @property
    def preview_name(self) -> str:
        return self.file_name.removesuffix(".safetensors") + ".preview.png"


DEMO_LORAS = (
    DemoLora("loom_demo_red.safetensors", "loomred", "Loom demo: red",
             "paints things red: crimson fox, scarlet poppies, red paint", ("red", "color", "demo"), (214, 40, 40)),
    DemoLora("loom_demo_blue.safetensors", "loomblue", "Loom demo: blue",
             "paints things blue: cobalt bird, azure sea, blue ink", ("blue", "color", "demo"), (40, 80, 214)),
)
DEMO_LORA_FILES = tuple(d.file_name for d in DEMO_LORAS)


def demo_loras_dir() -> Path:
    key = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return CACHE / f"demo-loras-{key}"


def lora_tensors(seed: int) -> dict:
    """kohya tensors: ``lora_down`` ``[rank, in]``, ``lora_up`` ``[out, rank]`` (bf16), ``alpha`` scalar."""
    import torch

    out = {}
    for module, (features_out, features_in) in MODULES.items():
        gen = torch.Generator().manual_seed(seed * 1000 + zlib.crc32(module.encode()) % 1000)
        prefix = f"lora_unet_{module}"
        out[f"{prefix}.lora_down.weight"] = (torch.randn(RANK, features_in, generator=gen)
                                             / features_in ** 0.5).bfloat16()
        out[f"{prefix}.lora_up.weight"] = (torch.randn(features_out, RANK, generator=gen) * 0.3).bfloat16()
        out[f"{prefix}.alpha"] = torch.tensor(float(RANK))
    return out


def metadata(demo: DemoLora) -> dict[str, str]:
    return {"ss_output_name": demo.file_name.removesuffix(".safetensors"), "modelspec.title": demo.title,
            "modelspec.trigger_phrase": demo.trigger, "modelspec.description": demo.description,
            "modelspec.tags": ", ".join(demo.tags), "modelspec.architecture": "flux-1-dev/lora",
            "ss_network_module": "networks.lora_flux", "ss_network_dim": str(RANK),
            "ss_network_alpha": str(RANK), "ss_base_model_version": "flux1"}


DTYPE_NAMES = {"torch.bfloat16": "BF16", "torch.float32": "F32"}


def safetensors_bytes(tensors: dict, meta: dict[str, str]) -> bytes:
    """A safetensors file with a byte-stable header (sorted keys; safetensors' own writer orders the metadata
    differently per process, which would change the file's sha256 that example workflows pin)."""
    import torch

    header: dict = {"__metadata__": dict(sorted(meta.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        raw = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[str(tensor.dtype)], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def build(out_dir: Path) -> None:
    """Write every demo LoRA and its preview into ``out_dir`` (atomic per file)."""
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    for seed, demo in enumerate(DEMO_LORAS, start=1):
        tmp = out_dir / (demo.file_name + ".tmp")
        tmp.write_bytes(safetensors_bytes(lora_tensors(seed), metadata(demo)))
        os.replace(tmp, out_dir / demo.file_name)
        image = Image.new("RGB", (96, 96), (245, 245, 240))
        ImageDraw.Draw(image).ellipse((12, 12, 84, 84), fill=demo.rgb)
        tmp_png = out_dir / (demo.preview_name + ".tmp")
        image.save(tmp_png, format="PNG")
        os.replace(tmp_png, out_dir / demo.preview_name)
        log.info("wrote %s", out_dir / demo.file_name)


def ensure_demo_loras() -> Path:
    """Build the demo LoRAs once per cache key; return their folder."""
    out = demo_loras_dir()
    if not all((out / name).is_file() for d in DEMO_LORAS for name in (d.file_name, d.preview_name)):
        build(out)
    return out


def write_if_different(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically unless the file already holds exactly it (a link is replaced)."""
    if target.is_symlink() or not target.is_file() or target.read_bytes() != data:
        if target.is_symlink():
            target.unlink()
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)


def place_demo_loras(loras_folder: Path) -> list[Path]:
    """Copy the demo LoRAs and previews into ``loras_folder`` where missing or different; the files placed."""
    source = ensure_demo_loras()
    placed = []
    for demo in DEMO_LORAS:
        for name in (demo.file_name, demo.preview_name):
            target = loras_folder / name
            write_if_different(target, (source / name).read_bytes())
            placed.append(target)
    return placed


def demo_sha256(file_name: str) -> str:
    """The sha256 of a demo LoRA (what example workflows pin)."""
    return hashlib.sha256((ensure_demo_loras() / file_name).read_bytes()).hexdigest()
