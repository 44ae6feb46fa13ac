"""Train AutoLoRA learned gates on a ComfyUI Flux model with the gated stack in place.

The gates sit inside the wrapped layers of a gated clone (``stack.install_gated``); only their parameters train, the
model and the LoRAs stay frozen. One step is :func:`~..learned_gate.gate_training_step`: rectified-flow
matching plus a hinge that asks the prediction under a mismatched prompt to be worse by a margin. The
velocity comes from ComfyUI's ``BaseModel.apply_model`` (which returns the denoised latent ``x0̂``) as
``v = (x_σ - x0̂) / σ``, so the clone's wrappers and object patches act exactly as in sampling.

ComfyUI's Flux blocks add to their residual streams in place (``img += ...``) after a LayerNorm saved them,
which autograd refuses. During training every block therefore runs through a replace patch that copies its
inputs and runs it under ``torch.utils.checkpoint`` (non-reentrant): nothing inside a block is kept for
backward, the block is recomputed then (about one extra forward per step), and its inputs stay untouched.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import comfy.patcher_extension
import torch
import torch.utils.checkpoint

from ..adapter_gate import AdapterGate
from ..learned_gate import (
    GateTrainingReport,
    LearnedGate,
    LearnedGates,
    gate_training_step,
)
from ..runtime.core import Runtime
from ..runtime.gated import GatedOptions
from ..runtime.training_mode import recomputation_contexts, training_scope
from ..stack import StackEntry
from .stack import install_gated

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateBatch:
    """Training data: clean latents ``[B, 16, H, W]``, text ``[B, T, C]`` and pooled ``y [B, C_y]``, and a
    mismatched text of the same shape (another caption) for the hinge (None = flow loss only)."""

    clean: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor
    mismatched: torch.Tensor | None = None


def fresh_gates(model: object, modules: Sequence[str]) -> LearnedGates:
    """New gates (``g = 0.5``, ``w_out = 2``: plain LoRA sum at start) for ``modules`` of a ComfyUI model."""
    gates = {}
    for module in modules:
        layer = model.get_model_object(f"diffusion_model.{module}")
        gates[module] = LearnedGate(int(layer.weight.shape[0]))
    return LearnedGates(gates)


def _checkpointed_block(runtime: Runtime, module: torch.nn.Module, double: bool) -> Any:
    """A ``patches_replace["dit"]`` block running ``module`` (the block itself: ComfyUI's ``original_block``
    closes over its loop variable, so a later recomputation would run the last block) on copied inputs under
    checkpoint; the recomputation (during backward, after the model call) sees the forward's gate state."""

    def block(args: dict, extra: dict) -> dict:
        state = runtime.current
        options = dict(args.get("transformer_options") or {})

        def run(inputs: dict) -> dict:
            previous, runtime.current = runtime.current, state
            try:
                copy = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                if double:
                    img, txt = module(img=copy["img"], txt=copy["txt"], vec=copy["vec"], pe=copy["pe"],
                                      attn_mask=copy.get("attn_mask"), transformer_options=options)
                    return {"img": img, "txt": txt}
                return {"img": module(copy["img"], vec=copy["vec"], pe=copy["pe"], attn_mask=copy.get("attn_mask"),
                                      transformer_options=options)}
            finally:
                runtime.current = previous

        return torch.utils.checkpoint.checkpoint(run, args, use_reentrant=False, context_fn=recomputation_contexts)

    return block


def train_learned_gates(model: object, entries: Sequence[StackEntry], gates: LearnedGates, batch: GateBatch,
                        steps: int = 20, lr: float = 1e-2, guidance: float = 3.5, seed: int = 0,
                        resample: bool = True) -> list[GateTrainingReport]:
    """Train ``gates`` (in place) for ``entries`` on ``model``; one report per step. Noise and sigmas in
    (0.05, 0.95) are drawn from ``seed``: anew each step, or once (``resample=False``, to overfit one sample)."""
    gated = tuple(replace(e, gate=AdapterGate(lora=e.row.lora, learned=gates, learned_source="training"))
                  for e in entries)
    result = install_gated(model, gated, GatedOptions("gated"))
    clone = result.model
    diffusion = clone.get_model_object("diffusion_model")
    for kind, blocks in (("double_block", diffusion.double_blocks), ("single_block", diffusion.single_blocks)):
        for index, module in enumerate(blocks):
            clone.set_model_patch_replace(_checkpointed_block(result.runtime, module, kind == "double_block"),
                                          "dit", kind, index)
    for parameter in gates.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(gates.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    clone.patch_model()
    try:
        options = comfy.patcher_extension.copy_nested_dicts(clone.model_options.get("transformer_options", {}))
        comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), clone.wrappers,
                                                   copy_dict1=False)
        options["cond_or_uncond"] = [0]
        size = batch.clean.shape[0]
        guide = torch.full((size,), guidance)

        def predict(latent: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            denoised = clone.model.apply_model(latent, sigma, c_crossattn=cond, transformer_options=options,
                                               y=batch.pooled, guidance=guide)
            return (latent - denoised) / sigma.reshape(-1, 1, 1, 1)

        reports = []
        noise = torch.randn(batch.clean.shape, generator=generator)
        sigma = 0.05 + 0.9 * torch.rand(size, generator=generator)
        for number in range(steps):
            if resample and number:
                noise = torch.randn(batch.clean.shape, generator=generator)
                sigma = 0.05 + 0.9 * torch.rand(size, generator=generator)
            with training_scope():  # ComfyUI's differentiable ops for the step's forward and backward
                report = gate_training_step(predict, optimizer, batch.clean, noise, sigma, batch.context,
                                            batch.mismatched)
            logger.debug("gate training step %d: loss %.5f (flow %.5f, hinge %.5f)", number, report.loss,
                         report.flow_loss, report.hinge_loss)
            reports.append(report)
        return reports
    finally:
        clone.unpatch_model()
        for parameter in gates.parameters():
            parameter.requires_grad_(False)


__all__ = ["GateBatch", "fresh_gates", "train_learned_gates"]
