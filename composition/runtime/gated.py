"""The gated LoRA stack as a runtime controller: the stack's rows per token on the whole canvas (one group, weight 1
on every token), every row gated, the gates evaluated inside the layers.

A merged LoRA cannot change over sampling without re-patching the weights (what ComfyUI's hook keyframes do); here
nothing is re-patched. Modes (:class:`GatedOptions`):

* ``gated``: each row's strength × its gate schedule at (block, sampling percent); learned gates mixed by
  AutoLoRA's formula. One pass per step.
* ``switch``: LoRA Switch — one row active per step, round robin every ``switch_every`` steps (times its
  schedule). The step is found from ``transformer_options["sample_sigmas"]``. One pass per step.
* ``composite``: LoRA Composite — one model pass per row with only that row on, predictions averaged.
  A baseline to compare against: N passes per step (rows whose schedule is 0 at this percent are left out
  of the average; when all are off, one plain pass).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...bounded_cache import BoundedCache
from ..gates import GateError, LoRASwitch, composite_average, step_of_sigma
from ..stack import StackEntry
from .core import Call, Controller, TokenState

logger = logging.getLogger(__name__)

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
class GatedState(TokenState):
    """A gated pass: the step (switch mode) and the row a composite pass keeps (-1 = all)."""

    step: int | None
    solo: int


class GatedController(Controller):
    """The rows of one stack (gate ``i`` is row ``i``) in ``options.mode``; ``calls`` counts the model passes."""

    name = "Loom LoRA Stack (per token)"
    gate_every_entry = True

    def __init__(self, entries: Sequence[StackEntry], options: GatedOptions = GatedOptions()) -> None:
        if not entries:
            raise GateError("gated LoRA stack: no enabled rows to apply")
        super().__init__([entries])
        self.options = options
        self.calls = 0
        self._ones: BoundedCache[str, dict[str, torch.Tensor]] = BoundedCache("gated ones", max_entries=8)
        self._values: BoundedCache[tuple, tuple[float, ...]] = BoundedCache("gated gate values", max_entries=4096)

    def _weights(self, device: torch.device) -> dict[str, torch.Tensor]:
        """``[1, 1, 1]`` ones (every token, one group) per stream on ``device``."""
        weights = self._ones.get(str(device))
        if weights is None:
            ones = torch.ones(1, 1, 1, device=device)
            weights = self._ones.put(str(device), {"img": ones, "txt": ones, "joint": ones})
        return weights

    def run(self, call: Call, inner: Callable[[Call, TokenState], torch.Tensor]) -> torch.Tensor:
        step = self._step(call) if self.options.mode == "switch" else None
        passes = [-1]
        if self.options.mode == "composite":
            curves = self.book.curves(call.percent)
            passes = [i for i, value in enumerate(curves) if value != 0.0] or [len(curves)]  # none on: plain
        outputs = []
        for solo in passes:
            self.calls += 1
            outputs.append(inner(call, GatedState(self._weights(call.x.device), frozenset({0}), call.percent, step,
                                                  solo)))
        return outputs[0] if len(outputs) == 1 else composite_average(outputs)

    def gate_values(self, state: GatedState, block_type: str, block_index: int) -> tuple[float, ...]:
        """Row gates for a layer of this block in this pass (mode applied; exactly 0.0 = skipped)."""
        key = (block_type, block_index, state.percent, state.step, state.solo)
        values = self._values.get(key)
        if values is None:
            values = self.book.values(block_type, block_index, state.percent)
            keep = state.solo
            if self.options.mode == "switch" and state.step is not None:
                keep = LoRASwitch(len(self.book), self.options.switch_every).active_adapter(state.step)
            if keep >= 0:
                values = tuple(v if i == keep else 0.0 for i, v in enumerate(values))
            self._values.put(key, values)
        return values

    @staticmethod
    def _step(call: Call) -> int:
        sigmas = call.options.get("sample_sigmas")
        if sigmas is None:
            raise GateError("LoRA Switch needs the step, but this call has no transformer_options['sample_sigmas'] "
                            "(sample through a ComfyUI sampler node)")
        values = sigmas.tolist() if isinstance(sigmas, torch.Tensor) else list(sigmas)
        return step_of_sigma(float(call.t.flatten()[0]), values)


__all__ = ["MODES", "GatedController", "GatedOptions", "GatedState"]
