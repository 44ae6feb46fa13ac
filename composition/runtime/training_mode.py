"""What a gradient pass through ComfyUI's Flux needs, for the scope of the pass: :func:`training_scope`.

Every Loom path that differentiates through Flux blocks (CLoRA's latent update, LoRA-Composer refinement,
learned-gate training) wraps its forward *and* its backward in :func:`training_scope` (and a checkpointed
block's recomputation in it too: pass :func:`recomputation_contexts` as ``context_fn``). It does two things and
undoes both when the scope ends:

* **ComfyUI's training mode.** From 0.33 on, Flux's RoPE (``comfy.ldm.flux.math.apply_rope``) runs through a
  fused comfy-kitchen op without a backward unless ``comfy.model_management.in_training`` is set (ComfyUI's own
  trainer sets it around its loop). The flag is set inside the scope and its previous value restored after;
  releases without it (0.3.75) have nothing to switch.
* **Private copies for normalisation layers.** Flux's blocks add their residuals in place (``img += ...``)
  onto the very tensor their LayerNorm saved for backward. Plain autograd refuses that; under
  ``torch.utils.checkpoint`` nothing complains and the backward silently reads the overwritten values (a wrong
  gradient, on every ComfyUI release). :class:`NormInputCopies` hands ``layer_norm`` (and ``rms_norm``) a
  copy of its input whenever autograd records the op, so what a norm saved stays as it was saved; the values
  computed do not change. (The playground's ``TrainingOps.LayerNorm`` does the same for training.)

A checkpointed block must also copy its inputs: the in-place adds would otherwise leave its outputs where its
inputs were, and the recomputation would start from them.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

FLAG = "in_training"

_NORMS = (torch.nn.functional.layer_norm, torch.nn.functional.rms_norm)


class NormInputCopies(TorchFunctionMode):
    """``layer_norm`` / ``rms_norm`` get a copy of their input when grad is on and the input requires grad."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _NORMS and args and torch.is_grad_enabled() and args[0].requires_grad:
            args = (args[0].clone(), *args[1:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def comfy_training_flag() -> Iterator[None]:
    """Set ``comfy.model_management.in_training`` inside the block (where the release has it), then restore it.

    The runtime imports no ComfyUI module (it is a pure layer); the flag is ComfyUI's loaded module's, when there
    is one: a gradient pass through ComfyUI's Flux always runs with ComfyUI loaded."""
    model_management = sys.modules.get("comfy.model_management")
    if model_management is None or not hasattr(model_management, FLAG):
        yield
        return
    previous = getattr(model_management, FLAG)
    setattr(model_management, FLAG, True)
    try:
        yield
    finally:
        setattr(model_management, FLAG, previous)


@contextlib.contextmanager
def training_scope() -> Iterator[None]:
    """ComfyUI's training mode and private norm inputs for a gradient pass (see the module docstring)."""
    with comfy_training_flag(), NormInputCopies():
        yield


def recomputation_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: the forward and the recomputation of a checkpointed block
    both run in :func:`training_scope` (the backward may run outside the caller's scope, e.g. on autograd's
    device threads)."""
    return training_scope(), training_scope()


__all__ = ["NormInputCopies", "recomputation_contexts", "training_scope"]
