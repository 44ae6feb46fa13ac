"""The merged patch step: ``ModelPatcher.patch_model()`` with LoRAs added by Loom vs by ComfyUI core, in one run.

For each count N (default 1 and 4) the same N kohya-format LoRA files (rank ``rank`` on every double/single block
Linear, factors in ``factor_dtype`` as trainers save them) are added to one model twice: through ``Loom LoRA
Stack``'s merged path (:func:`~..composition.comfy_bridge.stack.load_entries` + ``apply_merged``) and through core's
``comfy.sd.load_lora_for_models`` (once per file, chained). Each ``patch_model()`` is timed and undone with
``unpatch_model()``; Loom and core alternate ``repeats`` times and the median is kept, so load on a shared machine
slows both alike. Peak memory is the extra memory of one ``patch_model()`` (:func:`.memory.measure_peak`).
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.sd
import comfy.utils
import torch
from safetensors.torch import save_file

from ..composition.comfy_bridge.merged import apply_merged
from ..composition.comfy_bridge.stack import load_entries
from ..composition.stack import StackRow
from .memory import measure_peak

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatchRow:
    """N LoRAs: median ms of one ``patch_model()`` through Loom and core, ``ratio`` Loom / core, peaks in MiB."""

    loras: int
    rank: int
    loom_ms: float
    core_ms: float
    loom_peak_mib: float
    core_peak_mib: float
    samples: int

    @property
    def ratio(self) -> float:
        return self.loom_ms / self.core_ms if self.core_ms > 0 else float("nan")


def write_kohya_lora(patcher: Any, path: Path, rank: int, seed: int, factor_dtype: torch.dtype) -> Path:
    """A kohya-format LoRA (``lora_unet_<module>.lora_down/lora_up.weight`` + ``alpha``) on every block Linear."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, value in patcher.model.diffusion_model.state_dict().items():
        if not key.startswith(("double_blocks.", "single_blocks.")) or not key.endswith(".weight") or value.ndim != 2:
            continue
        out, inp = value.shape
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        down = torch.randn(rank, inp, generator=generator) / inp ** 0.5
        tensors[f"{name}.lora_down.weight"] = down.to(factor_dtype)
        tensors[f"{name}.lora_up.weight"] = (torch.randn(out, rank, generator=generator) * 0.01).to(factor_dtype)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def loom_patcher(patcher: Any, paths: Sequence[Path]) -> Any:
    """What ``Loom LoRA Stack`` in merged mode returns for these files."""
    by_name = {p.name: str(p) for p in paths}
    entries = load_entries([StackRow(lora=p.name) for p in paths], lambda name, sha: by_name[name])
    return apply_merged(patcher, None, entries).model


def core_patcher(patcher: Any, paths: Sequence[Path]) -> Any:
    """What chained core LoRA loaders return for these files."""
    model = patcher
    for path in paths:
        model, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path), safe_load=True),
                                                 1.0, 0.0)
    return model


def _patch_ms(patcher: Any, device: torch.device) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    patcher.patch_model()
    synchronize()
    elapsed = (time.perf_counter() - start) * 1000.0
    patcher.unpatch_model()
    return elapsed


def _peak_mib(patcher: Any, device: torch.device) -> float:
    try:
        return measure_peak(patcher.patch_model, device).peak_mib
    finally:
        patcher.unpatch_model()


def run_patch_bench(patcher: Any, folder: Path, counts: Sequence[int] = (1, 4), rank: int = 32, repeats: int = 4,
                    factor_dtype: torch.dtype = torch.bfloat16, memory: bool = True) -> list[PatchRow]:
    """One :class:`PatchRow` per count; the files are written into ``folder``."""
    device = comfy.model_management.get_torch_device()
    rows = []
    for count in counts:
        paths = [write_kohya_lora(patcher, folder / f"patch_{count}_{i}.safetensors", rank, i, factor_dtype)
                 for i in range(count)]
        methods = {"loom": loom_patcher(patcher, paths), "core": core_patcher(patcher, paths)}
        times: dict[str, list[float]] = {name: [] for name in methods}
        for model in methods.values():
            _patch_ms(model, device)  # warm-up
        for _ in range(repeats):
            for name, model in methods.items():
                times[name].append(_patch_ms(model, device))
        peaks = {name: _peak_mib(model, device) if memory else float("nan") for name, model in methods.items()}
        row = PatchRow(count, rank, statistics.median(times["loom"]), statistics.median(times["core"]),
                       peaks["loom"], peaks["core"], repeats)
        logger.info("patch %d LoRAs: Loom %.0f ms, core %.0f ms (x%.2f)", count, row.loom_ms, row.core_ms, row.ratio)
        rows.append(row)
    return rows


def format_patch_table(rows: Sequence[PatchRow], title: str = "") -> str:
    """The patch step as a fixed-width table."""
    head = ["LoRAs", "rank", "Loom ms", "core ms", "Loom/core", "Loom peak MiB", "core peak MiB", "runs"]
    body = [[str(r.loras), str(r.rank), f"{r.loom_ms:.0f}", f"{r.core_ms:.0f}", f"{r.ratio:.3f}",
             f"{r.loom_peak_mib:.1f}", f"{r.core_peak_mib:.1f}", str(r.samples)] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = [title] if title else []
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    return "\n".join(lines)


__all__ = ["PatchRow", "core_patcher", "format_patch_table", "loom_patcher", "run_patch_bench", "write_kohya_lora"]
