"""LoRA-Composer test-time latent refinement on a composed clone: one gradient step on the latent per sampling step.

:class:`RefineWrapper` is the ``PREDICT_NOISE`` wrapper that ``regional.compose`` adds with the refinement option.
While active it runs the composed prompt's forward through the double blocks only (checkpointed, stopped after the
last one; ``runtime/probes``' gradient machinery), where :class:`RefineProbe` (the controller's ``probe``, called by
the regional attention with the post-RoPE q, k) reads each box region's concept-token maps and its image queries'
self-attention. The losses of ``composition.refine`` (weights from ``ComposeOptions.refine``) give
``z <- z − lr_i·∇z`` and the sampler's prediction at the new latent is shifted as in CLoRA so a first-order step
from z lands where the step from z' lands. Refinement stops at step 25 or when the loss rises after step 5.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from ...kernels.probes import attention_probabilities, text_to_image_maps
from ..gates import step_of_sigma
from ..refine import (
    Box,
    RefineOptions,
    enhancement_loss,
    fill_loss,
    refinement_step_sizes,
    region_loss,
    should_stop,
)
from ..runtime.probes import checkpointed_blocks, gradient_scope, plain_copy, shifted_prediction
from .reinit import token_boxes
from .runtime import call_options, probing_forward

logger = logging.getLogger(__name__)


class RefineProbe:
    """Reads, in every double block, the composed entries' concept maps and region self-attention (with grad)."""

    def __init__(self, controller: Any, options: RefineOptions):
        self.controller = controller
        self.options = options
        self.recording = True
        self.terms: list[torch.Tensor] = []

    def observe(self, q: torch.Tensor, k: torch.Tensor, layout: Any, block_type: str, block_index: int) -> None:
        if block_type != "double":
            return
        entries = [b for b, composed in enumerate(layout.composed) if composed]
        if not entries:
            return
        gh, gw = layout.grid
        start = layout.text_length
        image = torch.arange(start, start + gh * gw, device=q.device)
        index = torch.tensor(entries, device=q.device)
        qs, ks = q.index_select(0, index), k.index_select(0, index)
        boxes = {b.region: Box(b.top, b.left, b.bottom, b.right)
                 for b in token_boxes(self.controller.plan.regions, gh, gw)}
        weights = layout.weights["img"][entries[0], :gh * gw]  # [L_img, N]
        loss = qs.new_zeros((), dtype=torch.float32)
        options = self.options
        for region, positions in sorted(self.controller.prompt.concepts.items()):
            box = boxes.get(region)
            if box is None or not positions:
                continue
            maps = text_to_image_maps(qs, ks, torch.tensor(positions, device=q.device), image, gh, gw)  # [b,T,h,w]
            inside = weights[:, region] > 0.5
            queries = image[inside]
            self_attention = attention_probabilities(qs, ks, queries, image).probabilities.mean(dim=1)  # [b,Lq,L]
            for b in range(maps.shape[0]):
                loss = loss + enhancement_loss(maps[b], box, options) + fill_loss(maps[b], box, options)
                loss = loss + region_loss(self_attention[b], inside.float(), options)
        if self.recording:
            self.terms.append(loss)

    def loss(self) -> torch.Tensor | None:
        return torch.stack(self.terms).mean() if self.terms else None


class RefineWrapper:
    """``WrappersMP.PREDICT_NOISE``: one refinement step per sampling step while active."""

    def __init__(self, controller: Any, runtime: Any):
        self.controller = controller
        self.runtime = runtime
        self.options: RefineOptions = controller.options.refine
        self.losses: list[float] = []
        self.stopped = False

    def __deepcopy__(self, memo: dict) -> RefineWrapper:
        return self

    def __call__(self, executor: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                 seed: Any = None) -> torch.Tensor:
        sigmas = (model_options.get("transformer_options") or {}).get("sample_sigmas")
        if sigmas is None or self.stopped:
            return executor(x, timestep, model_options, seed)
        step = step_of_sigma(float(timestep.flatten()[0]), sigmas)
        if step == 0:
            self.losses, self.stopped = [], False
        if should_stop(step, self.losses, self.options):
            self.stopped = True
            return executor(x, timestep, model_options, seed)
        rates = refinement_step_sizes(min(self.options.max_steps, max(1, len(sigmas) - 1)), self.options)
        rate = rates[min(step, len(rates) - 1)]
        updated = self.refined(executor.class_obj.inner_model, x, timestep, model_options, rate)
        return shifted_prediction(executor, x, updated, timestep, model_options, seed, sigmas, step)

    def refined(self, base_model: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                rate: float) -> torch.Tensor:
        """``z − rate·∇z L`` for the composed prompt at latent x ``[B, C, H, W]``."""
        controller = self.controller
        prompt = controller.prompt
        n_double = len(base_model.diffusion_model.double_blocks)
        options = checkpointed_blocks(call_options(self.runtime, model_options, cond_or_uncond=[0]), n_double,
                                      ("double", n_double - 1))
        probe = RefineProbe(controller, self.options)
        previous_probe = controller.probe
        with gradient_scope(), self.runtime.kept():  # the pass's states stay for the backward's recomputation
            z = plain_copy(x).requires_grad_(True)
            controller.probe = probe
            try:
                probing_forward(base_model, z, timestep, prompt, options)
                loss = probe.loss()
                if loss is None or not loss.requires_grad:
                    logger.warning("refinement: no box region was probed; latent unchanged")
                    return x
                probe.recording = False
                (grad,) = torch.autograd.grad(loss, [z])
            finally:
                controller.probe = previous_probe
            self.losses.append(float(loss.detach()))
            return (z.detach() - rate * grad).detach()
