"""Installs the per-token runtime (``composition/runtime``) on a cloned ModelPatcher: the one place where Loom's
per-token methods — Loom Compose, the gated stack, Loom CLoRA — touch ComfyUI.

:func:`install` clones the MODEL and gives the clone a runtime that runs the new controller after the controllers
of the runtime the MODEL already carries (its attachment), so Loom nodes chain instead of refusing each other:

- every Linear that carries an adapter of any of its controllers: ``add_object_patch`` with a view of the live
  module (``runtime/layers.py``; an upstream Loom wrapper is re-viewed, never wrapped twice);
- ``WrappersMP.APPLY_MODEL``: :meth:`Runtime.apply_model` (in place of the upstream runtime's, on this clone);
- ``transformer_options["optimized_attention_override"]``: :class:`RuntimeAttention` chained onto the override
  that was there before any Loom runtime (an override another pack added later stays outermost);
- every controller's other wrappers (latent re-initialisation, refinement, CLoRA's latent updates), bound to the
  new runtime;
- the runtime as the clone's attachment ``lora_loom.runtime``.

The input MODEL is untouched; everything lives on the clone and disappears with it.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import comfy.patcher_extension
import torch

from ..prompts import EncodedPrompt
from ..runtime.core import Controller, Runtime, RuntimeAttention
from ..runtime.layers import LayerError, unsupported_modules, wrap_linear
from ..runtime.probes import StopForward, plain_copy

logger = logging.getLogger(__name__)

ATTACHMENT = "lora_loom.runtime"
WRAPPER_KEY = "lora_loom.runtime"


@dataclass(frozen=True)
class Installed:
    """The clone, its runtime and the adapter parts of the new controller that cannot act per token (not applied)."""

    model: Any
    runtime: Runtime
    skipped: tuple[str, ...] = ()


def runtime_of(model: Any) -> Runtime | None:
    """The runtime a MODEL carries (None: no Loom per-token method on it)."""
    return model.get_attachment(ATTACHMENT)


def install(model: Any, controller: Controller) -> Installed:
    """Clone ``model`` and run ``controller`` on it per token, after the controllers it already carries."""
    clone = model.clone()
    diffusion = clone.get_model_object("diffusion_model")
    depth, depth_single = len(diffusion.double_blocks), len(diffusion.single_blocks)
    parent = runtime_of(clone)
    upstream = () if parent is None else parent.controllers
    if controller.changes_batch and any(c.batched for c in upstream):
        batched = ", ".join(c.name for c in upstream if c.batched)
        raise LayerError(f"{controller.name}: this MODEL carries {batched} upstream, whose per-entry token weights "
                         f"cannot follow the passes {controller.name} batches; connect {controller.name} first and "
                         f"{batched} after it")
    runtime = Runtime((*upstream, controller), depth, depth_single)
    for module, slots in sorted(runtime.slots.items()):
        key = f"diffusion_model.{module}"
        try:
            original = clone.get_model_object(key)
        except AttributeError as exc:
            owner = next(e.path for c in runtime.controllers for g in c.entries for e in g
                         if module in e.adapter_set.adapters)
            raise LayerError(f"{owner}: adapter module {module} does not exist in this model (a LoRA for a "
                             "different Flux?)") from exc
        clone.add_object_patch(key, wrap_linear(original, module, slots, runtime))
    _register(clone, parent, runtime)
    skipped = unsupported_modules([e.adapter_set for group in controller.entries for e in group])
    if skipped:
        logger.warning("%s: %d adapter parts run once per sample and cannot act per token; they are not applied "
                       "(e.g. %s)", controller.name, len(skipped), skipped[0])
    return Installed(clone, runtime, tuple(skipped))


def call_options(runtime: Runtime, model_options: dict, **changes: Any) -> dict:
    """A copy of the sampler's transformer options for a model call of Loom's own (a latent update's probing
    forward) that runs through ``runtime`` even when the options lack the patcher's wrappers; ``changes`` added."""
    options = comfy.patcher_extension.copy_nested_dicts(model_options.get("transformer_options") or {})
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    if WRAPPER_KEY not in options.get("wrappers", {}).get(apply_model, {}):
        comfy.patcher_extension.add_wrapper_with_key(apply_model, WRAPPER_KEY, runtime.apply_model, options)
    options.update(changes)
    return options


def probing_forward(base_model: Any, z: torch.Tensor, timestep: torch.Tensor, prompt: EncodedPrompt, options: dict,
                    guidance: float = 3.5) -> None:
    """A forward of ``prompt`` (context and pooled output for every entry, Flux ``guidance``) at latent
    ``z [B, C, H, W]`` whose probes feed a latent update; the prediction is not wanted (a forward stopped after the
    last probed block ends here)."""
    b = z.shape[0]
    kwargs = {"guidance": torch.full((b,), guidance, device=z.device)}
    if prompt.pooled is not None:
        kwargs["y"] = plain_copy(prompt.pooled).to(z.device).expand(b, -1)
    context = plain_copy(prompt.context).to(z.device).expand(b, -1, -1)
    with contextlib.suppress(StopForward):
        base_model.apply_model(z, plain_copy(timestep), c_crossattn=context, transformer_options=options, **kwargs)


def _register(clone: Any, parent: Runtime | None, runtime: Runtime) -> None:
    """The runtime's wrappers, attention override and attachment on ``clone``, in place of ``parent``'s."""
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    clone.remove_wrappers_with_key(apply_model, WRAPPER_KEY)
    clone.add_wrapper_with_key(apply_model, WRAPPER_KEY, runtime.apply_model)
    if parent is not None:
        for index, controller in enumerate(parent.controllers):
            for kind in controller.wrappers(parent):
                clone.remove_wrappers_with_key(kind, f"{WRAPPER_KEY}.{index}")
    for index, controller in enumerate(runtime.controllers):
        for kind, wrapper in controller.wrappers(runtime).items():
            clone.add_wrapper_with_key(kind, f"{WRAPPER_KEY}.{index}", wrapper)
    options = clone.model_options.setdefault("transformer_options", {})
    previous = options.get("optimized_attention_override")
    if isinstance(previous, RuntimeAttention) and previous.runtime is parent:
        previous = previous.previous
    if any(c.attend is not None for c in runtime.controllers):
        options["optimized_attention_override"] = RuntimeAttention(runtime, previous)
    clone.set_attachments(ATTACHMENT, runtime)


__all__ = ["ATTACHMENT", "WRAPPER_KEY", "Installed", "call_options", "install", "probing_forward", "runtime_of"]
