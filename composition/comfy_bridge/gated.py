"""Gated LoRA stack: the stack's rows applied per token on the whole canvas, with gates evaluated in the layers.

A merged LoRA cannot change over sampling without re-patching the weights (what ComfyUI's hook keyframes do).
Here each row's adapters go into the same wrapped Linear layers as regional composition
(``regional_layers.py``) — one implicit full-canvas region, no attention rules — and a :class:`GatedStack`
tells every layer its gates for the current call. Modes:

* ``gated``: each row's strength × its gate schedule at (block, sampling percent); learned gates mixed by
  AutoLoRA's formula. One pass per step.
* ``switch``: LoRA Switch — one row active per step, round robin every ``switch_every`` steps (times its
  schedule). The step is found from ``transformer_options["sample_sigmas"]``. One pass per step.
* ``composite``: LoRA Composite — one model pass per row with only that row on, predictions averaged.
  A baseline to compare against: N passes per step (rows whose schedule is 0 at this percent are left out
  of the average; when all are off, one plain pass).

Every wrapper and object patch lives on a clone; the input MODEL is untouched and no weight is written.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import comfy.patcher_extension
import torch

from .progress import SamplingProgress
from ..adapter_gate import GateBook
from ..block_weights import BlockWeights, block_of_module, parse_block_weights
from ..gates import (
    GateError,
    LoRASwitch,
    composite_average,
    step_of_sigma,
)
from ..stack import StackEntry
from .regional_layers import SlotGate, layer_slots, unsupported_modules, wrap_linear

logger = logging.getLogger(__name__)

WRAPPER_KEY = "lora_loom.gated"
MODES = ("gated", "switch", "composite")


@dataclass(frozen=True)
class GatedOptions:
    """``mode`` in :data:`MODES`; ``switch_every``: steps between LoRA Switch changes."""

    mode: str = "gated"
    switch_every: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise GateError(f"gated stack mode {self.mode!r} is not one of {MODES}")
        if self.switch_every < 1:
            raise GateError(f"switch_every must be at least 1, got {self.switch_every}")


@dataclass(frozen=True)
class GatedCall:
    """One model call: sampling percent, step (switch mode), the row a composite pass keeps (-1 = all)."""

    percent: float
    step: int | None
    solo: int
    device: torch.device


class GatedStack:
    """The live gates of one gated clone: a :class:`TokenWeights` + ``adapter_gates`` source for its layers.

    Gate ``i`` is row ``i`` of the stack. Holds no ComfyUI object; ``current`` is set only inside a call.
    """

    def __init__(self, book: GateBook, options: GatedOptions) -> None:
        self.book = book
        self.options = options
        self.current: GatedCall | None = None
        self._ones: dict[str, torch.Tensor] = {}
        self._progress = SamplingProgress()
        self._values: dict[tuple, tuple[float, ...]] = {}
        self.calls = 0

    def __deepcopy__(self, memo: dict) -> GatedStack:
        return self  # model_options are deep-copied on clone; the gates are shared, not copied

    # --- what wrapped layers read ---------------------------------------------------------------------------
    def stream_weights(self, stream: str) -> torch.Tensor | None:
        """``[1, 1, 1]`` ones (every token, one region) during a call; None outside one."""
        if self.current is None:
            return None
        key = str(self.current.device)
        ones = self._ones.get(key)
        if ones is None:
            ones = torch.ones(1, 1, 1, device=self.current.device)
            self._ones[key] = ones
        return ones

    def active_regions(self) -> frozenset[int]:
        return frozenset() if self.current is None else frozenset({0})

    def adapter_gates(self, block_type: str, block_index: int) -> tuple[float, ...] | None:
        """Row gates for a layer of this block in the current call (mode applied; exactly 0.0 = skipped)."""
        call = self.current
        if call is None:
            return None
        key = (block_type, block_index, call.percent, call.step, call.solo)
        values = self._values.get(key)
        if values is None:
            values = self.book.values(block_type, block_index, call.percent)
            keep = call.solo
            if self.options.mode == "switch" and call.step is not None:
                keep = LoRASwitch(len(self.book), self.options.switch_every).active_adapter(call.step)
            if keep >= 0:
                values = tuple(v if i == keep else 0.0 for i, v in enumerate(values))
            if len(self._values) > 4096:
                self._values.clear()
            self._values[key] = values
        return values

    # --- per call -------------------------------------------------------------------------------------------
    def percent_of(self, sigma: float, model_sampling: Any) -> float:
        return self._progress.percent_of(sigma, model_sampling)

    def _step(self, sigma: float, transformer_options: dict) -> int:
        sigmas = transformer_options.get("sample_sigmas")
        if sigmas is None:
            raise GateError("LoRA Switch needs the step, but this call has no transformer_options['sample_sigmas'] "
                            "(sample through a ComfyUI sampler node)")
        values = sigmas.tolist() if isinstance(sigmas, torch.Tensor) else list(sigmas)
        return step_of_sigma(sigma, values)

    def apply_model_wrapper(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                            c_crossattn: torch.Tensor | None = None, control: Any = None,
                            transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
        """``WrappersMP.APPLY_MODEL``: x ``[B, C, H, W]``, t = sigma ``[B]`` -> the (averaged) prediction."""
        transformer_options = transformer_options if transformer_options is not None else {}
        sigma = float(t.flatten()[0])
        percent = self.percent_of(sigma, executor.class_obj.model_sampling)
        step = self._step(sigma, transformer_options) if self.options.mode == "switch" else None
        passes = [-1]
        if self.options.mode == "composite":
            curves = self.book.curves(percent)
            passes = [i for i, value in enumerate(curves) if value != 0.0] or [len(curves)]  # none on: plain
        previous = self.current
        outputs = []
        try:
            for solo in passes:
                self.current = GatedCall(percent, step, solo, x.device)
                self.calls += 1
                outputs.append(executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs))
        finally:
            self.current = previous
        return outputs[0] if len(outputs) == 1 else composite_average(outputs)


@dataclass(frozen=True)
class GatedResult:
    """The gated clone, its gate source and the adapter parts that cannot run per token (not applied)."""

    model: Any
    gates: GatedStack
    skipped: tuple[str, ...] = field(default_factory=tuple)


def _blocks(entry: StackEntry, depth: int, depth_single: int) -> BlockWeights:
    text = entry.row.blocks.strip()
    return parse_block_weights(text, depth, depth_single) if text else BlockWeights.uniform(1.0, depth, depth_single)


def install_gated(model: Any, entries: Sequence[StackEntry], options: GatedOptions = GatedOptions()) -> GatedResult:
    """Clone ``model`` and apply ``entries`` per token with their gates (``StackEntry.gate``) in ``options.mode``."""
    if not entries:
        raise GateError("gated LoRA stack: no enabled rows to apply")
    clone = model.clone()
    diffusion = clone.get_model_object("diffusion_model")
    depth, depth_single = len(diffusion.double_blocks), len(diffusion.single_blocks)
    items, gates = [], []
    for number, entry in enumerate(entries):
        blocks = _blocks(entry, depth, depth_single)
        items.append((entry.row.strength, lambda module, b=blocks: b.weight_for(
            block_of_module(module).block_type, block_of_module(module).index), entry.adapter_set))
        gates.append(SlotGate(number, None if entry.gate is None else entry.gate.learned))
    book = GateBook(tuple(None if e.gate is None else e.gate.schedule for e in entries))
    source = GatedStack(book, options)
    for module, slots in sorted(layer_slots([items], [gates]).items()):
        key = f"diffusion_model.{module}"
        try:
            original = clone.get_model_object(key)
        except AttributeError as exc:
            owner = next(e for e in entries if module in e.adapter_set.adapters)
            raise GateError(f"{owner.path}: adapter module {module} does not exist in this model "
                            f"(a LoRA for a different Flux?)") from exc
        clone.add_object_patch(key, wrap_linear(original, module, tuple(slots), source))
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                               source.apply_model_wrapper)
    skipped = unsupported_modules([e.adapter_set for e in entries])
    if skipped:
        logger.warning("gated LoRA stack: %d adapter parts run once per sample and are not applied per token "
                       "(e.g. %s)", len(skipped), skipped[0])
    logger.info("gated LoRA stack: %d rows, mode %s", len(entries), options.mode)
    return GatedResult(clone, source, tuple(skipped))


__all__ = ["MODES", "WRAPPER_KEY", "GatedCall", "GatedOptions", "GatedResult", "GatedStack", "install_gated"]
