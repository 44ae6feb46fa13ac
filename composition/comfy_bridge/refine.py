"""LoRA-Composer test-time latent refinement on a composed clone: one gradient step on the latent per sampling step.

:class:`RefineWrapper` is a ``PREDICT_NOISE`` wrapper added to the clone that ``regional.compose`` returns
(:func:`compose_refined` does both). While active it runs the composed prompt's forward through the double blocks
only (checkpointed, stopped after the last one; ``clora_probe``'s gradient machinery), where :class:`RefineProbe`
(the composition's ``probe``, called by the regional attention override with the post-RoPE q, k) reads each box
region's concept-token maps and its image queries' self-attention. The losses of ``composition.refine`` give
``z <- z − lr_i·∇z`` and the sampler's prediction at the new latent is shifted as in CLoRA so a first-order step
from z lands where the step from z' lands. Refinement stops at step 25 or when the loss rises after step 5.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Any

import comfy.patcher_extension
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
from .clora_probe import StopForward, checkpointed_blocks, gradient_scope, plain_copy
from .regional import CallState, ComposedRegion, ComposeOptions, ComposeResult, compose
from .reinit import token_boxes

logger = logging.getLogger(__name__)

WRAPPER_KEY = "lora_loom.refine"


class RefineProbe:
    """Reads, in every double block, the composed entries' concept maps and region self-attention (with grad)."""

    def __init__(self, composition: Any):
        self.composition = composition
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
                 for b in token_boxes(self.composition.plan.regions, gh, gw)}
        weights = layout.weights["img"][entries[0], :gh * gw]  # [L_img, N]
        loss = qs.new_zeros((), dtype=torch.float32)
        options = self.composition.refine_options
        for region, positions in enumerate(self.composition.prompts.concept_positions):
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

    def __init__(self, composition: Any, options: RefineOptions = RefineOptions()):
        self.composition = composition
        composition.refine_options = options
        self.options = options
        self.losses: list[float] = []
        self.stopped = False

    def __deepcopy__(self, memo: dict) -> RefineWrapper:
        return self

    def __call__(self, executor: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                 seed: Any = None) -> torch.Tensor:
        sigmas = (model_options.get("transformer_options") or {}).get("sample_sigmas")
        sigma = float(timestep.flatten()[0])
        if sigmas is None or self.stopped:
            return executor(x, timestep, model_options, seed)
        step = step_of_sigma(sigma, sigmas)
        if step == 0:
            self.losses, self.stopped = [], False
        if should_stop(step, self.losses, self.options):
            self.stopped = True
            return executor(x, timestep, model_options, seed)
        rates = refinement_step_sizes(min(self.options.max_steps, max(1, len(sigmas) - 1)), self.options)
        updated = self.refined(executor.class_obj.inner_model, x, timestep, model_options, rates[min(step,
                                                                                                    len(rates) - 1)])
        sigma_next = float(sigmas[step + 1]) if step + 1 < len(sigmas) else 0.0
        out = executor(updated, timestep, model_options, seed)
        if sigma - sigma_next <= 0:
            return out
        return out + (updated - x).to(out) * (sigma_next / (sigma - sigma_next))

    def refined(self, base_model: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                rate: float) -> torch.Tensor:
        """``z − rate·∇z L`` for the composed prompt at latent x ``[B, C, H, W]``."""
        composition = self.composition
        prompts = composition.prompts
        diffusion = base_model.diffusion_model
        n_double = len(diffusion.double_blocks)
        options = comfy.patcher_extension.copy_nested_dicts(model_options.get("transformer_options") or {})
        options = checkpointed_blocks({**options, "cond_or_uncond": [0]}, n_double, ("double", n_double - 1))
        b = x.shape[0]
        probe = RefineProbe(composition)
        previous_probe, previous_state = composition.probe, composition.current
        with gradient_scope():
            z = plain_copy(x).requires_grad_(True)
            context = plain_copy(prompts.context).to(x.device).expand(b, -1, -1)
            kwargs = {"guidance": torch.full((b,), 3.5, device=x.device)}
            pooled = prompts.extra.get("pooled_output")
            if pooled is not None:
                kwargs["y"] = plain_copy(pooled).to(x.device).expand(b, -1)
            layout = composition.layout_for(int(x.shape[-2]), int(x.shape[-1]), b, 1, 0, (True,) * b, x.device)
            percent = composition.percent_of(float(timestep.flatten()[0]), base_model.model_sampling)
            composition.probe = probe
            composition.current = CallState(layout, percent)  # kept through the backward's recomputation
            try:
                with contextlib.suppress(StopForward):
                    base_model.apply_model(z, plain_copy(timestep), c_crossattn=context, transformer_options=options,
                                           **kwargs)
                loss = probe.loss()
                if loss is None or not loss.requires_grad:
                    logger.warning("refinement: no box region was probed; latent unchanged")
                    return x
                probe.recording = False
                (grad,) = torch.autograd.grad(loss, [z])
            finally:
                composition.probe, composition.current = previous_probe, previous_state
            self.losses.append(float(loss.detach()))
            return (z.detach() - rate * grad).detach()


def compose_refined(model: Any, clip: Any, global_prompt: str, regions: list[ComposedRegion],
                    options: ComposeOptions = ComposeOptions(),
                    refine_options: RefineOptions = RefineOptions()) -> ComposeResult:
    """``regional.compose`` with LoRA-Composer's latent refinement added to the returned clone."""
    result = compose(model, clip, global_prompt, regions, replace(options, refinement=False))  # own options
    if options.refinement:
        result.model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY,
                                          RefineWrapper(result.composition, refine_options))
    return result
