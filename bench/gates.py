"""``loom bench gates``: per-step cost of gated LoRAs against ungated per-token and merged LoRAs.

The same random LoRAs (``compose.random_adapters``) are applied to one Flux model in several ways and
one ``BaseModel.apply_model`` call ("step") is timed ``repeats`` times after a warm-up (median kept):

* ``merged``: ComfyUI's weight patches (no time variation possible without re-patching);
* ``per-token``: the gated stack's layers with constant gates of 1 (the ungated per-token cost);
* ``gated``: a keyframed schedule with block weights on every row (gate evaluated in every layer);
* ``half-off``: every other row gated to 0 (its matmuls skipped);
* ``switch``: LoRA Switch (one row per step);
* ``composite``: LoRA Composite (one pass per row, averaged);
* ``learned``: AutoLoRA's learned gate on every targeted layer (a fresh gate per layer; Δ_i one by one).

All rows come from one run in one process, so the ratios compare like with like.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..composition.adapter_gate import AdapterGate
from ..composition.block_weights import parse_block_weights
from ..composition.comfy_bridge.gate_training import fresh_gates
from ..composition.comfy_bridge.merged import apply_merged
from ..composition.comfy_bridge.stack import install_gated
from ..composition.gates import GateSchedule, Keyframe
from ..composition.runtime.gated import GatedOptions
from .compose import bench_model, random_adapters, step_ms

logger = logging.getLogger(__name__)

VARIANTS = ("merged", "per-token", "gated", "half-off", "switch", "composite", "learned")


@dataclass(frozen=True)
class GateBenchRow:
    """Milliseconds per step (median) of one variant with ``adapters`` rows, and its ratio to merged."""

    variant: str
    adapters: int
    step_ms: float
    merged_ms: float

    @property
    def ratio(self) -> float:
        return self.step_ms / self.merged_ms if self.merged_ms > 0 else float("inf")


def _schedule(name: str, value: float | None = None) -> GateSchedule:
    if value is not None:
        return GateSchedule.constant(name, value)
    return GateSchedule(name, (Keyframe(0.0, 1.0), Keyframe(0.5, 0.6), Keyframe(1.0, 0.2)), "linear",
                        parse_block_weights("default=1,double=0.8"))


def _variant(patcher: Any, entries: list, variant: str) -> Any:
    if variant == "merged":
        return apply_merged(patcher, None, entries).model
    if variant == "learned":
        modules = sorted({m for e in entries for m in e.adapter_set.adapters})
        gates = fresh_gates(patcher, modules)
        for parameter in gates.parameters():
            parameter.requires_grad_(False)
        gated = [replace(e, gate=AdapterGate(lora=e.row.lora, learned=gates)) for e in entries]
        return install_gated(patcher, gated).model
    mode = variant if variant in ("switch", "composite") else "gated"
    value = {"per-token": 1.0, "switch": 1.0, "composite": 1.0}.get(variant)
    gated = []
    for number, e in enumerate(entries):
        off = variant == "half-off" and number % 2 == 1
        schedule = _schedule(e.row.lora, 0.0 if off else value)
        gated.append(replace(e, gate=AdapterGate(lora=e.row.lora, schedule=schedule)))
    model = install_gated(patcher, gated, GatedOptions(mode)).model
    if mode == "switch":  # apply_model outside a sampler: give the switch its schedule
        model.model_options["transformer_options"]["sample_sigmas"] = torch.linspace(1.0, 0.0, 21)
    return model


def run_gates_bench(model: Any = None, adapter_counts: Sequence[int] = (1, 2, 4), latent_hw: tuple[int, int] = (32, 32),
                    prompt_tokens: int = 32, rank: int = 16, repeats: int = 3,
                    variants: Sequence[str] = VARIANTS) -> list[GateBenchRow]:
    """Time every variant in :data:`VARIANTS` for each adapter count; ``model`` defaults to ``bench_model()``."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"bench gates: unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    patcher = model if model is not None else bench_model()
    config = patcher.model.model_config.unet_config
    device, dtype = patcher.load_device, patcher.model_dtype()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, *latent_hw, generator=gen).to(device, dtype)
    y = torch.randn(1, config["vec_in_dim"], generator=gen).to(device, dtype)
    context = torch.randn(1, prompt_tokens, config["context_in_dim"], generator=gen).to(device, dtype)
    rows = []
    for count in adapter_counts:
        entries = random_adapters(patcher, count, rank)
        merged_ms = step_ms(_variant(patcher, entries, "merged"), x, context, y, repeats)
        for variant in variants:
            ms = merged_ms if variant == "merged" else step_ms(_variant(patcher, entries, variant), x, context, y,
                                                               repeats)
            row = GateBenchRow(variant, count, ms, merged_ms)
            logger.info("bench gates: %d adapters, %s: %.1f ms (x%.2f of merged)", count, variant, ms, row.ratio)
            rows.append(row)
    return rows


__all__ = ["VARIANTS", "GateBenchRow", "run_gates_bench"]
