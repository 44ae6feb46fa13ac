"""Flux models built the way ComfyUI builds them, for models smaller than the Flux.1 that ComfyUI's detection knows.

A Flux file (a BFL checkpoint: ``img_in.weight``, ``double_blocks.0.img_attn.norm.key_norm.scale``, ...) is the
stable interface; the parameters of ComfyUI's ``Flux`` class are not (0.33 added the required ``txt_ids_dims``
and names the QK-norm gain ``.weight``). So:

* :func:`complete_config`: ComfyUI's own ``model_detection.detect_unet_config`` reads the checkpoint (or, with
  none at hand, the :func:`checkpoint_outline` of the config: the keys detection reads, as meta tensors) and
  yields every field the running release needs; the given config's own values win. It must carry what
  detection assumes of full-size Flux and a small model changes: ``num_heads`` / ``axes_dim`` (detection
  fixes a head width of 128) and ``out_channels`` (fixed at 16).
* :func:`flux_model`: a ``model_base.Flux`` from a ``supported_models.Flux`` config (or a subclass), with
  weights loaded through the config's ``process_unet_state_dict`` (``*_norm.scale`` -> ``*_norm.weight`` on
  0.33), strictly: a missing or extra key is an error naming it.
* :func:`checkpoint_state`: a loaded model's state under checkpoint names again, so files written by one
  release load in the other.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import comfy.model_detection
import comfy.supported_models
import torch

TIMESTEP_FEATURES = 256  # Flux's sinusoidal timestep / guidance embedding width (time_in, guidance_in)


class FluxModelError(ValueError):
    """A Flux config or state dict that ComfyUI cannot build or load; the message names the field or key."""


def checkpoint_outline(config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The keys ComfyUI's Flux detection reads, as meta tensors shaped as in a BFL checkpoint of ``config``
    (``hidden_size``, ``num_heads``, ``depth``, ``depth_single_blocks``, ``in_channels``, ``out_channels``,
    ``context_in_dim``, ``vec_in_dim``, ``guidance_embed``, ``patch_size``)."""
    hidden, patch = int(config["hidden_size"]), int(config.get("patch_size", 2))
    head = hidden // int(config["num_heads"])
    shapes = {
        "img_in.weight": (hidden, int(config["in_channels"]) * patch * patch),
        "txt_in.weight": (hidden, int(config["context_in_dim"])),
        "final_layer.linear.weight": (int(config.get("out_channels", config["in_channels"])) * patch * patch, hidden),
    }
    if config.get("vec_in_dim") is not None:
        shapes["vector_in.in_layer.weight"] = (hidden, int(config["vec_in_dim"]))
    if config.get("guidance_embed", True):
        shapes["guidance_in.in_layer.weight"] = (hidden, TIMESTEP_FEATURES)
    for i in range(int(config["depth"])):
        shapes[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = (head,)
    for i in range(int(config["depth_single_blocks"])):
        shapes[f"single_blocks.{i}.norm.key_norm.scale"] = (head,)
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def complete_config(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None) -> dict:
    """``config`` completed by ComfyUI's Flux detection of ``state_dict`` (checkpoint keys, no prefix) or of
    ``config``'s :func:`checkpoint_outline`; ``config``'s values win."""
    detected = comfy.model_detection.detect_unet_config(
        dict(state_dict) if state_dict is not None else checkpoint_outline(config), "")
    if not detected or detected.get("image_model") != "flux":
        found = None if not detected else detected.get("image_model")
        raise FluxModelError(f"ComfyUI does not detect a Flux.1 in these weights (detected: {found})")
    return {**detected, **config}


def flux_model(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None,
               dtype: torch.dtype = torch.float32,
               model_config_class: type = comfy.supported_models.Flux) -> Any:
    """ComfyUI's ``model_base.Flux`` on the CPU in ``dtype``: ``config`` completed (see :func:`complete_config`),
    built by ``model_config_class`` and, given ``state_dict`` (checkpoint keys without prefix), loaded through
    its ``process_unet_state_dict``. Without weights the parameters are uninitialised."""
    model_config = model_config_class(complete_config(config, state_dict))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device="cpu")
    model.diffusion_model.to(dtype)
    if state_dict is not None:
        loaded = model_config.process_unet_state_dict(dict(state_dict))
        missing, unexpected = model.diffusion_model.load_state_dict(loaded, strict=False)
        if missing or unexpected:
            raise FluxModelError(f"the weights do not fit the Flux config: missing {sorted(missing)[:5]}, "
                                 f"unexpected {sorted(unexpected)[:5]}")
    return model


def model_key(model_config: Any, checkpoint_key: str) -> str:
    """The name a checkpoint parameter (no prefix) has in a model built by ``model_config`` (ComfyUI's
    ``process_unet_state_dict`` renames some at load)."""
    (name,) = model_config.process_unet_state_dict({checkpoint_key: None})
    return name


def checkpoint_state(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Flux ``diffusion_model`` state under BFL checkpoint names: the QK-norm gains are ``*_norm.scale``
    (0.33 loads them as ``*_norm.weight``; 0.3.75 reads only ``.scale``)."""
    out = {}
    for key, value in model_state.items():
        out[key[:-len(".weight")] + ".scale" if key.endswith("_norm.weight") else key] = value
    return out


__all__ = ["FluxModelError", "checkpoint_outline", "checkpoint_state", "complete_config", "flux_model", "model_key"]
