"""Gradients through ComfyUI's Flux blocks are right: CLoRA's latent update, LoRA-Composer refinement and learned-gate
training checkpoint the blocks they differentiate through; the gradient they get must equal plain autograd's (the
same pass without checkpoints) and a central finite difference of the loss.

Three things broke that silently on ComfyUI 0.3.75 (and loudly, as a CheckpointError, on 0.33): ComfyUI's
``original_block`` closes over ``forward_orig``'s loop variable (a recomputation ran the last block reached),
Flux's in-place residual adds overwrote the block's inputs and what its LayerNorms saved for backward
(``composition/runtime/training_mode.py``). Plain autograd refuses the latter outright, so the reference
pass also proves every saved tensor is left untouched."""
from __future__ import annotations

import copy
import sys
from contextlib import ExitStack
from pathlib import Path

import comfy.model_management
import comfy.patcher_extension
import pytest
import torch
import torch.utils.checkpoint
from comfy_models import flux_inputs, tiny_flux

sys.path.insert(0, str(Path(__file__).parent))  # the mechanism tests' helpers
from lora_loom.composition.comfy_bridge.clora import latent_updates
from lora_loom.composition.comfy_bridge.gate_training import GateBatch, fresh_gates, train_learned_gates
from lora_loom.composition.runtime.probes import gradient_scope, plain_copy
from lora_loom.composition.runtime.training_mode import training_scope
from test_clora import composed as clora_composed
from test_refine import composed as refine_composed
from test_regional_mechanism import entry, flux_modules, lora_set

EPS = 1e-3


def without_checkpoints(function, *args, use_reentrant=None, context_fn=None, **kwargs):
    """``torch.utils.checkpoint.checkpoint`` replaced by the plain call (in its forward context)."""
    with ExitStack() as stack:
        if context_fn is not None:
            stack.enter_context(context_fn()[0])
        return function(*args)


@pytest.fixture(scope="module")
def flux():
    with torch.inference_mode():
        return tiny_flux(seed=0)  # inference-tensor weights, as in a ComfyUI node


def transformer_options(clone) -> dict:
    """The clone's transformer options with its wrappers, as ComfyUI hands them to a sampler."""
    options = comfy.patcher_extension.copy_nested_dicts(clone.model_options.get("transformer_options", {}))
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), clone.wrappers, copy_dict1=False)
    return options


def refinement(flux):
    """Loss and latent gradient of one LoRA-Composer refinement step at z (``RefineWrapper.refined``)."""
    clone, _, wrapper = refine_composed(flux, True)
    model_options = {"transformer_options": transformer_options(clone)}
    t = torch.full((1,), 0.8)

    def loss_and_gradient(z: torch.Tensor) -> tuple[float, torch.Tensor]:
        with torch.inference_mode():
            stepped = wrapper.refined(clone.model, z, t, model_options, 1.0)
        return wrapper.losses[-1], z - stepped
    return clone, loss_and_gradient


def clora(flux):
    """Loss and latent gradient of CLoRA's contrastive concept loss at z (``LatentUpdates.loss_at``)."""
    clone, _, _ = clora_composed(flux, 2)
    updates = latent_updates(clone)
    model_options = copy.copy(clone.model_options)
    t = torch.full((1,), 0.9)

    def loss_and_gradient(z: torch.Tensor) -> tuple[float, torch.Tensor]:
        with torch.inference_mode(), gradient_scope(), updates.runtime.kept():  # as update_latent runs it
            latent = plain_copy(z).requires_grad_(True)
            loss = updates.loss_at(clone.model, latent, t, model_options)
            (gradient,) = torch.autograd.grad(loss, [latent])
        return float(loss.detach()), gradient.detach()
    return clone, loss_and_gradient


@pytest.mark.parametrize("method", [refinement, clora], ids=["refinement", "clora"])
def test_checkpointed_latent_gradient_equals_plain_autograd_and_finite_differences(flux, method, monkeypatch):
    clone, loss_and_gradient = method(flux)
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    clone.patch_model()
    try:
        loss, gradient = loss_and_gradient(z)
        with monkeypatch.context() as patched:
            patched.setattr(torch.utils.checkpoint, "checkpoint", without_checkpoints)
            plain_loss, plain = loss_and_gradient(z)
        ahead, _ = loss_and_gradient(z + EPS * direction)
        behind, _ = loss_and_gradient(z - EPS * direction)
    finally:
        clone.unpatch_model()
        comfy.model_management.unload_all_models()
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    torch.testing.assert_close(gradient, plain, rtol=1e-4, atol=1e-7)
    finite_difference = (ahead - behind) / (2 * EPS)
    assert float((gradient * direction).sum()) == pytest.approx(finite_difference, rel=0.05)


def test_learned_gate_training_follows_plain_autograd(monkeypatch):
    """Two Adam steps: checkpointed blocks give the gates exactly the parameters plain autograd gives them."""
    flux = tiny_flux(seed=0)
    adapters = lora_set(flux, flux_modules(flux), seed=1, name="a")
    inputs = flux_inputs(flux, latent_hw=(8, 8))
    gen = torch.Generator().manual_seed(3)
    batch = GateBatch(clean=torch.randn(1, 16, 8, 8, generator=gen), context=inputs["context"], pooled=inputs["y"],
                      mismatched=torch.randn(inputs["context"].shape, generator=gen))
    modules = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.2", "single_blocks.0.linear2"]

    def trained() -> dict[str, torch.Tensor]:
        gates = fresh_gates(flux, modules)
        train_learned_gates(flux, [entry(adapters)], gates, batch, steps=2, lr=5e-2, resample=False)
        return gates.state_dict()

    checkpointed = trained()
    with monkeypatch.context() as patched:
        patched.setattr(torch.utils.checkpoint, "checkpoint", without_checkpoints)
        plain = trained()
    moved = [k for k in plain if not torch.equal(plain[k], fresh_gates(flux, modules).state_dict()[k])]
    assert moved
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)


def test_training_scope_restores_comfyui_training_mode():
    """ComfyUI's own flag (0.33+) is set inside the scope only; a release without it is left alone."""
    flag = getattr(comfy.model_management, "in_training", None)
    with training_scope():
        assert getattr(comfy.model_management, "in_training", None) is (None if flag is None else True)
        with training_scope():
            pass
        assert getattr(comfy.model_management, "in_training", None) is (None if flag is None else True)
    assert getattr(comfy.model_management, "in_training", None) is flag
