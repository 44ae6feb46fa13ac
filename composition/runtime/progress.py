"""Sampling progress as ComfyUI defines it: the percent whose ``model_sampling.percent_to_sigma`` is the current
sigma. Shared by every engine that gates or schedules by progress (regional, gated stack, CLoRA)."""
from __future__ import annotations

from typing import Any

from ..gates import sigma_to_percent


class SamplingProgress:
    """``sigma -> percent`` for one model, memoised per sigma (a sampler revisits the same few sigmas)."""

    def __init__(self) -> None:
        self._percents: dict[float, float] = {}

    def percent_of(self, sigma: float, model_sampling: Any) -> float:
        percent = self._percents.get(sigma)
        if percent is None:
            percent = sigma_to_percent(sigma, model_sampling.percent_to_sigma)
            self._percents[sigma] = percent
        return percent
