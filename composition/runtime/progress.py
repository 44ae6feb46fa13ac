"""Sampling progress as ComfyUI defines it: the percent whose ``model_sampling.percent_to_sigma`` is the current
sigma. The runtime's, for every controller."""
from __future__ import annotations

from typing import Any

from ...bounded_cache import BoundedCache
from ..gates import sigma_to_percent


class SamplingProgress:
    """``sigma -> percent`` for one model, memoised per sigma (a sampler revisits the same few sigmas)."""

    def __init__(self) -> None:
        self._percents: BoundedCache[float, float] = BoundedCache("sampling percents", max_entries=4096)

    def percent_of(self, sigma: float, model_sampling: Any) -> float:
        percent = self._percents.get(sigma)
        if percent is None:
            percent = self._percents.put(sigma, sigma_to_percent(sigma, model_sampling.percent_to_sigma))
        return percent
