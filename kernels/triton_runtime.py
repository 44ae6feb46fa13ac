"""When the Triton kernels of this package may run, on which device, and what happens when one cannot.

* :func:`triton_usable` — per call: triton installed, not forced off (``LOOM_KERNELS=torch``), and either Triton's
  CPU interpreter (``TRITON_INTERPRET=1``, what the tests use) or a CUDA device whose compute capability takes the
  dtype (:func:`capability_supports`: bfloat16 ``tl.dot`` needs sm80+, float16/float32 sm70+).
* :func:`needs_grad` — the kernels are forward-only; inputs that need gradients take the torch path.
* :func:`launch_device` — kernels launch on the *current* CUDA device, so every launch runs inside the tensors'
  device scope (a no-op off CUDA).
* :func:`run_guarded` — a kernel that fails to compile or launch is reported once (a warning naming the error)
  and replaced by its torch path for the rest of the process; sampling never crashes on it.

``triton`` itself is never imported here, so this module imports anywhere.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
MIN_CAPABILITY = (7, 0)
BF16_CAPABILITY = (8, 0)

# kernel name -> "ErrorType: first line" of the failure that disabled it (process-wide)
_FAILED: dict[str, str] = {}


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    """Whether ``import triton`` would succeed (looked up once, nothing imported)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def capability_supports(capability: tuple[int, int], dtype: torch.dtype | None) -> bool:
    """Whether a CUDA device of compute ``capability`` compiles the kernels' ``tl.dot`` for ``dtype``
    (None: the least any dtype needs)."""
    if dtype is not None and dtype not in TRITON_DTYPES:
        return False
    return tuple(capability) >= (BF16_CAPABILITY if dtype == torch.bfloat16 else MIN_CAPABILITY)


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def triton_usable(device: torch.device | str, dtype: torch.dtype | None = None) -> bool:
    """Cheap check run per call: the Triton kernels can run on ``device`` for inputs of ``dtype``."""
    if os.environ.get("LOOM_KERNELS", "").lower() == "torch" or not triton_installed():
        return False
    if dtype is not None and dtype not in TRITON_DTYPES:
        return False
    if interpreting():
        return True
    device = torch.device(device)
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return capability_supports(_capability(index), dtype)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd would record an op on these tensors (the kernels have no backward)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The scope to launch a kernel for tensors on ``device``: that CUDA device, else nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def kernel_failed(name: str) -> str | None:
    """Why kernel ``name`` was disabled in this process (``"Type: message"``), or None while it is enabled."""
    return _FAILED.get(name)


def run_guarded(name: str, fast: Callable[[], T], fallback: Callable[[], T],
                passthrough: tuple[type[BaseException], ...] = ()) -> T:
    """``fast()`` — unless kernel ``name`` failed before, then ``fallback()``. The first failure of ``fast``
    (compile or launch; not out-of-memory and not the ``passthrough`` errors, which are raised) is logged once as
    a warning naming the error, disables ``name`` for the rest of the process, and is answered by ``fallback()``."""
    if name in _FAILED:
        return fallback()
    try:
        return fast()
    except (torch.cuda.OutOfMemoryError, *passthrough):
        raise
    except Exception as error:  # any compiler or driver error: the torch path still works
        lines = str(error).strip().splitlines()
        _FAILED[name] = f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
        logger.warning("Triton kernel %s failed (%s); using the torch path for the rest of this process",
                       name, _FAILED[name])
        logger.debug("Triton kernel %s failure", name, exc_info=True)
        return fallback()


__all__ = ["TRITON_DTYPES", "capability_supports", "interpreting", "kernel_failed", "launch_device", "needs_grad",
           "run_guarded", "triton_installed", "triton_usable"]
