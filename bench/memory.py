"""Peak memory of one call: CUDA's allocator counters on a GPU; on the CPU, a dispatch-mode probe.

torch has no peak counter for CPU memory, and process RSS cannot be reset and hides reuse inside the allocator.
:class:`TensorPeak` watches every op under :class:`torch.utils._python_dispatch.TorchDispatchMode`: each output
whose storage is new is counted when created and uncounted when its last tensor dies, so ``peak`` is the largest
total of tensors allocated *during* the call (weights and inputs made before it are not counted). Buffers that a
fused kernel allocates internally (a flash kernel's tiles) are invisible to it; a materialised ``[B, H, L, L]`` mask
or score tensor is not.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

logger = logging.getLogger(__name__)


class TensorPeak(TorchDispatchMode):
    """Live bytes of tensors created inside the mode; ``peak`` is their maximum, ``live`` the current total."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._owners: dict[int, list[int]] = {}  # storage data_ptr -> [tensor count, bytes]

    def _release(self, key: int) -> None:
        entry = self._owners.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._owners[key]

    def _track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self._owners.get(key)
        if entry is None:
            entry = [0, int(storage.nbytes())]
            self._owners[key] = entry
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in inputs:
                self._track(t)
        return out


@dataclass(frozen=True)
class PeakMemory:
    """``peak_bytes`` above what was allocated before the call; ``probe``: "cuda-allocator" or "cpu-dispatch"."""

    peak_bytes: int
    probe: str

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2 ** 20


def measure_peak(call: Callable[[], Any], device: torch.device | str) -> PeakMemory:
    """Run ``call()`` once and return its peak extra memory on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return PeakMemory(max(0, torch.cuda.max_memory_allocated(device) - before), "cuda-allocator")
    probe = TensorPeak()
    with probe:
        call()
    return PeakMemory(probe.peak, "cpu-dispatch")


__all__ = ["PeakMemory", "TensorPeak", "measure_peak"]
