"""Loom CLoRA installed on a cloned ModelPatcher: prompts encoded, the CLoRA controller (``runtime/clora.py``: N+1
passes per step, concept maps, masked fusion) installed with the runtime, and its latent updates.

Latent updates (:class:`LatentUpdates`, a ``PREDICT_NOISE`` wrapper): while sampling percent <
``update_end_percent``, ``iterations`` gradient steps ``z <- z − step_t·∇z L`` on the latent with the contrastive
loss of the cond passes' maps (the forward stopped after the last probed block, blocks checkpointed, see
``runtime/probes``), then the sampler's prediction at the new latent, shifted (``probes.shifted_prediction``).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import comfy.patcher_extension
import torch

from ..clora import CLoraError, CLoraOptions, contrastive_loss, step_sizes
from ..gates import step_of_sigma
from ..prompts import EncodedPrompt
from ..runtime.clora import GRADIENT_MARK, CLoraConcept, CLoraController, GradientRequest
from ..runtime.core import Runtime
from ..runtime.probes import ConceptProbe, gradient_scope, plain_copy, shifted_prediction
from .runtime import call_options, install, probing_forward
from .tokens import context_key, encode, find_concept

logger = logging.getLogger(__name__)


def encode_clora_prompts(clip: Any, base_prompt: str, concepts: Sequence[CLoraConcept]) -> tuple[EncodedPrompt, ...]:
    """Encode the base prompt and each LoRA's prompt; find every concept's tokens (base: all concepts, each
    LoRA prompt: its own concept required, the others where present)."""
    if clip is None:
        raise CLoraError("Loom CLoRA: a CLIP is required to encode the prompts")
    out = []
    for index, text in enumerate([base_prompt] + [c.prompt for c in concepts]):
        prompt, tokens, _ = encode(clip, text)
        key = context_key(tokens, prompt.length)
        positions = {}
        for i, concept in enumerate(concepts):
            own = index == i + 1
            override = concept.base_tokens if index == 0 else concept.prompt_tokens if own else ""
            try:
                positions[i] = find_concept(clip.tokenizer, key, text, concept.concept, override, tokens)
            except ValueError as exc:
                if index == 0 or own:
                    where = "base prompt" if index == 0 else f"prompt of LoRA {i + 1}"
                    raise CLoraError(f"Loom CLoRA, {where}: {exc}") from exc
        out.append(replace(prompt, concepts=positions))
    return tuple(out)


class LatentUpdates:
    """``WrappersMP.PREDICT_NOISE``: CLoRA's latent updates in the first steps, then the sampler's prediction.
    ``probe``: the probe of the latest update's forward."""

    def __init__(self, controller: CLoraController, runtime: Runtime) -> None:
        self.controller = controller
        self.runtime = runtime
        self.probe: ConceptProbe | None = None

    def __deepcopy__(self, memo: dict) -> LatentUpdates:
        return self

    def __call__(self, executor: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                 seed: Any = None) -> torch.Tensor:
        options = self.controller.options
        guider = executor.class_obj
        sigmas = (model_options.get("transformer_options") or {}).get("sample_sigmas")
        sigma = float(timestep.flatten()[0])
        percent = self.runtime.percent_of(sigma, guider.inner_model.model_sampling)
        if options.iterations == 0 or percent >= options.update_end_percent or sigmas is None:
            return executor(x, timestep, model_options, seed)
        step = step_of_sigma(sigma, sigmas)
        size = step_sizes(options.step_size, max(1, len(sigmas) - 1))[min(step, max(0, len(sigmas) - 2))]
        updated = self.update_latent(guider.inner_model, x, timestep, model_options, size, step, guider)
        return shifted_prediction(executor, x, updated, timestep, model_options, seed, sigmas, step)

    def update_latent(self, base_model: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                      size: float, step: int = 0, guider: Any = None) -> torch.Tensor:
        """``iterations`` steps ``z <- z − size·∇z L`` (L: contrastive loss of the concept maps); returns z'."""
        guidance = _guidance_of(guider)
        with gradient_scope(), self.runtime.kept():  # each forward's states stay for its backward's recomputation
            z = plain_copy(x)
            for iteration in range(self.controller.options.iterations):
                z.requires_grad_(True)
                loss = self.loss_at(base_model, z, timestep, model_options, guidance)
                if not loss.requires_grad:
                    logger.warning("CLoRA: fewer than two concepts seen; no latent update")
                    return x
                self.controller.losses.append((step, iteration, float(loss.detach())))
                (grad,) = torch.autograd.grad(loss, [z])
                z = (z.detach() - size * grad).detach()
        return z

    def loss_at(self, base_model: Any, z: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                guidance: float = 3.5) -> torch.Tensor:
        """Contrastive loss of the cond passes' concept maps at latent ``z [B, C, H, W]`` (with grad)."""
        request = GradientRequest()
        options = call_options(self.runtime, model_options, **{GRADIENT_MARK: request, "cond_or_uncond": [0]})
        probing_forward(base_model, z, timestep, self.controller.prompts[0], options, guidance)
        if request.probe is None:
            raise CLoraError("CLoRA latent update: the model call did not reach the CLoRA controller")
        request.probe.recording = False  # a checkpoint recomputation repeats the probe's ops; keep nothing twice
        self.probe = request.probe
        b = z.shape[0]
        maps = self.controller.concept_maps(request.probe, request.rows, b)
        stacked, labels = [], []
        for (r, concept), value in sorted(maps.items()):
            stacked.append(value)
            labels.append(concept)
        if len(set(labels)) < 2:
            return torch.zeros(())
        maps_t = torch.stack(stacked, dim=1)  # [B, M, qh, qw]
        label_t = torch.tensor(labels)
        temperature = self.controller.options.temperature
        return torch.stack([contrastive_loss(maps_t[i], label_t, temperature) for i in range(b)]).mean()


def _guidance_of(guider: Any, default: float = 3.5) -> float:
    """Flux guidance of the sampler's positive conditioning (FluxGuidance), else ``default``."""
    try:
        cond = guider.conds["positive"][0]["model_conds"]["guidance"].cond
        return float(cond.flatten()[0])
    except (AttributeError, KeyError, IndexError, TypeError):
        return default


def _wrappers(controller: CLoraController, runtime: Runtime) -> dict:
    return {comfy.patcher_extension.WrappersMP.PREDICT_NOISE: LatentUpdates(controller, runtime)}


def clora_controller(concepts: Sequence[CLoraConcept], prompts: Sequence[EncodedPrompt],
                     options: CLoraOptions = CLoraOptions(), patch_size: int = 2) -> CLoraController:
    """The controller of ``concepts`` over their encoded ``prompts``, with its latent updates."""
    return CLoraController(concepts, prompts, options, patch_size, _wrappers)


def latent_updates(model: Any) -> LatentUpdates:
    """The latent-update wrapper of a Loom CLoRA MODEL."""
    found = [w for group in model.wrappers.get(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, {}).values()
             for w in group if isinstance(w, LatentUpdates)]
    if not found:
        raise CLoraError("this MODEL carries no Loom CLoRA")
    return found[-1]


@dataclass(frozen=True)
class CLoraResult:
    """The patched clone, the base prompt's CONDITIONING, the controller (mask handle), what was skipped."""

    model: Any
    conditioning: list
    composition: CLoraController
    skipped: tuple[str, ...] = ()


def clora(model: Any, clip: Any, base_prompt: str, concepts: Sequence[CLoraConcept],
          options: CLoraOptions = CLoraOptions()) -> CLoraResult:
    """Loom CLoRA's one function: MODEL, CLIP, base prompt and per-LoRA concepts -> clone + CONDITIONING."""
    if not concepts:
        raise CLoraError("Loom CLoRA: no LoRA concepts given (connect a Loom CLoRA Concept)")
    prompts = encode_clora_prompts(clip, base_prompt, concepts)
    patch = int(getattr(model.get_model_object("diffusion_model"), "patch_size", 2))
    controller = clora_controller(concepts, prompts, options, patch)
    installed = install(model, controller)
    return CLoraResult(installed.model, [[prompts[0].context, dict(prompts[0].extra)]], controller,
                       installed.skipped)


__all__ = ["CLoraConcept", "CLoraResult", "LatentUpdates", "clora", "clora_controller", "encode_clora_prompts",
           "latent_updates"]
