"""Gates: how strongly each adapter acts, per block and per moment of sampling.

A :class:`GateSchedule` is a plain, frozen, JSON-serialisable description of one adapter's gate as a
function of (block type, block index, sampling progress in [0, 1]): keyframes ``(progress, value)``
interpolated by "hold", "linear" or "cosine", multiplied by a per-block vector (:class:`BlockWeights`).
Patched layers call :func:`gate_values` once per forward to get one Python float per adapter; a gate that
is 0 is returned as exactly ``0.0`` so the layer can skip that adapter's matmuls.

Progress is ComfyUI's "percent" of sampling. ComfyUI schedules in sigma space: a keyframe (or a
conditioning ``start_percent``) at percent ``q`` is active while the current sigma is ``<=
model_sampling.percent_to_sigma(q)`` (comfy/hooks.py ``HookKeyframeGroup.prepare_current_keyframe``,
comfy/samplers.py ``timestep_start``). :func:`sigma_to_percent` inverts that monotone map, so
``progress >= q`` here exactly when ComfyUI would have switched. Closed forms cover Flux
(``ModelSamplingFlux``: ``sigma = e^shift / (e^shift + 1/t - 1)``, ``t = 1 - percent``) and the shifted
flow schedule of ``ModelSamplingDiscreteFlow`` (``sigma = a t / (1 + (a - 1) t)``).

Also here: LoRA Switch (one adapter active at a time, round robin every ``every`` steps) and LoRA
Composite (one model pass per adapter, predictions averaged), from Zhong et al. 2024, Multi-LoRA
Composition for Image Generation.
"""
from __future__ import annotations

import bisect
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .block_weights import BlockWeights
from .numbers import STRENGTH_LIMIT

logger = logging.getLogger(__name__)

INTERPOLATIONS = ("hold", "linear", "cosine")
# Progress values closer than this to a keyframe count as reaching it (absorbs float error of inversion).
PROGRESS_TOLERANCE = 1e-9


class GateError(ValueError):
    """An invalid gate schedule, keyframe, switch or composite description."""


@dataclass(frozen=True)
class Keyframe:
    """The gate value at one moment of sampling (``progress`` 0 = first step, 1 = end)."""

    progress: float
    value: float


@dataclass(frozen=True)
class GateSchedule:
    """One adapter's gate: ``curve(progress) * blocks.weight_for(block_type, index)``.

    Before the first keyframe the first value holds (as ComfyUI's first hook keyframe does); after the
    last keyframe the last value holds. Two keyframes at the same progress make a jump. ``blocks=None``
    means weight 1 in every block of any model.
    """

    adapter: str
    keyframes: tuple[Keyframe, ...] = (Keyframe(0.0, 1.0),)
    interpolation: str = "hold"
    blocks: BlockWeights | None = None
    _progresses: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.keyframes:
            raise GateError(f"gate schedule for adapter {self.adapter!r} has no keyframes")
        if self.interpolation not in INTERPOLATIONS:
            raise GateError(f"gate schedule for adapter {self.adapter!r}: interpolation "
                            f"{self.interpolation!r} is not one of {INTERPOLATIONS}")
        previous = -math.inf
        for number, keyframe in enumerate(self.keyframes):
            if (not (0.0 <= keyframe.progress <= 1.0) or not math.isfinite(keyframe.value)
                    or abs(keyframe.value) > STRENGTH_LIMIT):
                raise GateError(f"gate schedule for adapter {self.adapter!r}: keyframe {number} {keyframe} needs "
                                f"progress in [0, 1] and a finite value within +-{STRENGTH_LIMIT:g}")
            if keyframe.progress < previous:
                raise GateError(f"gate schedule for adapter {self.adapter!r}: keyframe {number} {keyframe} "
                                "comes before the previous one; sort keyframes by progress")
            previous = keyframe.progress
        object.__setattr__(self, "_progresses", tuple(k.progress for k in self.keyframes))

    @classmethod
    def constant(cls, adapter: str, value: float, blocks: BlockWeights | None = None) -> GateSchedule:
        """The same strength for the whole of sampling."""
        return cls(adapter, (Keyframe(0.0, float(value)),), "hold", blocks)

    @classmethod
    def window(cls, adapter: str, value: float, start: float = 0.0, end: float = 1.0,
               blocks: BlockWeights | None = None) -> GateSchedule:
        """``value`` from ``start`` (inclusive) to ``end`` (exclusive), 0 elsewhere (like Fluxtapoz's start/end)."""
        if not 0.0 <= start <= end <= 1.0:
            raise GateError(f"gate window for adapter {adapter!r} needs 0 <= start <= end <= 1, got {start}, {end}")
        frames = [Keyframe(0.0, 0.0), Keyframe(start, float(value))]
        if end < 1.0:
            frames.append(Keyframe(end, 0.0))
        return cls(adapter, tuple(frames), "hold", blocks)

    def curve(self, progress: float) -> float:
        """The keyframed strength at ``progress`` (no block weight)."""
        if not math.isfinite(progress):
            raise GateError(f"gate schedule for adapter {self.adapter!r}: progress {progress!r} is not finite")
        frames = self.keyframes
        index = bisect.bisect_right(self._progresses, progress + PROGRESS_TOLERANCE) - 1
        if index < 0:
            return frames[0].value
        here = frames[index]
        if index == len(frames) - 1 or self.interpolation == "hold":
            return here.value
        after = frames[index + 1]
        span = after.progress - here.progress
        fraction = min(max((progress - here.progress) / span, 0.0), 1.0) if span > 0 else 1.0
        if self.interpolation == "cosine":
            fraction = (1.0 - math.cos(math.pi * fraction)) / 2.0
        return here.value + (after.value - here.value) * fraction

    def value(self, block_type: str, block_index: int, progress: float) -> float:
        """The gate of this adapter in one block at ``progress``; exactly 0.0 when it is off."""
        strength = self.curve(progress)
        if strength == 0.0:
            return 0.0
        if self.blocks is not None:
            strength *= self.blocks.weight_for(block_type, block_index)
        return strength if strength != 0.0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"adapter": self.adapter, "interpolation": self.interpolation,
                "keyframes": [{"progress": k.progress, "value": k.value} for k in self.keyframes],
                "blocks": None if self.blocks is None else self.blocks.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateSchedule:
        """Inverse of :meth:`to_dict`; names the missing field on error."""
        for name in ("adapter", "keyframes"):
            if name not in data:
                raise GateError(f"gate schedule dict lacks the field {name!r}: {data!r}")
        try:
            frames = tuple(Keyframe(float(k["progress"]), float(k["value"])) for k in data["keyframes"])
        except (KeyError, TypeError) as error:
            raise GateError(f"gate schedule for adapter {data['adapter']!r}: each keyframe needs 'progress' and "
                            f"'value' ({error})") from error
        blocks = data.get("blocks")
        return cls(str(data["adapter"]), frames, str(data.get("interpolation", "hold")),
                   None if blocks is None else BlockWeights.from_dict(blocks))

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GateSchedule:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def gate_values(schedules: Sequence[GateSchedule], block_type: str, block_index: int, progress: float) -> list[float]:
    """One gate per adapter, in the order of ``schedules``, for a layer of the given block at ``progress``."""
    return [schedule.value(block_type, block_index, progress) for schedule in schedules]


def sigma_to_percent(sigma: float, percent_to_sigma: Callable[[float], float], iterations: int = 64) -> float:
    """Invert a monotone decreasing ``percent_to_sigma`` (e.g. ComfyUI's ``model_sampling.percent_to_sigma``).

    Returns the largest percent ``p`` with ``percent_to_sigma(p) >= sigma`` (bisection, ``iterations``
    halvings), so a keyframe at ``q`` is reached (``p >= q``) exactly when ComfyUI's test ``sigma <=
    percent_to_sigma(q)`` holds. Sigmas above the schedule give 0; ``sigma <= percent_to_sigma(1)`` gives 1.
    """
    sigma = float(sigma)
    if not math.isfinite(sigma):
        raise GateError(f"sigma {sigma!r} is not finite")
    if percent_to_sigma(1.0) >= sigma:
        return 1.0
    low, high = 0.0, 1.0
    if percent_to_sigma(low) < sigma:
        return 0.0
    for _ in range(iterations):
        middle = (low + high) / 2.0
        if middle in (low, high):
            break
        if percent_to_sigma(middle) >= sigma:
            low = middle
        else:
            high = middle
    return low


def flux_percent_to_sigma(percent: float, shift: float = 1.15) -> float:
    """Flux's sigma at ``percent`` (ComfyUI ``ModelSamplingFlux.percent_to_sigma``; shift is used as mu)."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    t = 1.0 - percent
    return math.exp(shift) / (math.exp(shift) + (1.0 / t - 1.0))


def flux_sigma_to_percent(sigma: float, shift: float = 1.15) -> float:
    """Closed-form inverse of :func:`flux_percent_to_sigma`: ``t = s / (s + e^shift (1 - s))``, percent = 1 - t."""
    if sigma >= 1.0:
        return 0.0
    if sigma <= 0.0:
        return 1.0
    return 1.0 - sigma / (sigma + math.exp(shift) * (1.0 - sigma))


def flow_sigma_to_percent(sigma: float, shift: float = 1.0) -> float:
    """Closed-form inverse of ``ModelSamplingDiscreteFlow`` (``time_snr_shift``): ``t = s / (a - (a - 1) s)``."""
    if sigma >= 1.0:
        return 0.0
    if sigma <= 0.0:
        return 1.0
    return 1.0 - sigma / (shift - (shift - 1.0) * sigma)


def step_of_sigma(sigma: float, sample_sigmas: Sequence[float]) -> int:
    """The step whose sigma is nearest ``sigma`` in the sampler's schedule
    (``transformer_options["sample_sigmas"]``)."""
    if len(sample_sigmas) == 0:
        raise GateError("sample_sigmas is empty; cannot tell the step")
    return min(range(len(sample_sigmas)), key=lambda i: abs(float(sample_sigmas[i]) - float(sigma)))


@dataclass(frozen=True)
class LoRASwitch:
    """LoRA Switch: exactly one adapter active per step, moving to the next every ``every`` steps."""

    adapters: int
    every: int = 5

    def __post_init__(self) -> None:
        if self.adapters < 1 or self.every < 1:
            raise GateError(f"LoRA switch needs adapters >= 1 and every >= 1, got {self.adapters}, {self.every}")

    def active_adapter(self, step: int) -> int:
        """Index of the adapter active at ``step`` (0-based): ``(step // every) % adapters``."""
        if step < 0:
            raise GateError(f"LoRA switch: step {step} is negative")
        return (step // self.every) % self.adapters

    def gates_at(self, step: int) -> list[float]:
        """1.0 for the active adapter, exactly 0.0 for the others."""
        active = self.active_adapter(step)
        return [1.0 if index == active else 0.0 for index in range(self.adapters)]


@dataclass(frozen=True)
class LoRAComposite:
    """LoRA Composite: each step runs one model pass per adapter (only that adapter on) and averages.

    The paper averages the classifier-free-guided scores; on guidance-distilled Flux (cfg 1) that is the
    average of the passes' predictions, :func:`composite_average`. Cost: ``adapters`` passes per step.
    """

    adapters: int

    def __post_init__(self) -> None:
        if self.adapters < 1:
            raise GateError(f"LoRA composite needs at least one adapter, got {self.adapters}")

    def pass_gates(self) -> list[list[float]]:
        """The gates of each pass: pass ``i`` has adapter ``i`` at 1.0 and every other at 0.0."""
        return [[1.0 if index == run else 0.0 for index in range(self.adapters)] for run in range(self.adapters)]


def composite_average(predictions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average the per-adapter predictions ``[B, C, H, W]`` (any equal shapes) of a LoRA Composite step."""
    if len(predictions) == 0:
        raise GateError("composite_average needs at least one prediction")
    shape = predictions[0].shape
    for index, prediction in enumerate(predictions):
        if prediction.shape != shape:
            raise GateError(f"composite_average: prediction {index} has shape {tuple(prediction.shape)}, "
                            f"prediction 0 has {tuple(shape)}")
    return torch.stack(list(predictions)).mean(dim=0)
