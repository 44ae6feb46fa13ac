"""The in-process fixtures themselves: a tiny ComfyUI Flux runs and is deterministic."""
import dataclasses

import torch
from comfy_models import flux_inputs, tiny_flux


def test_tiny_flux_forward_is_deterministic_and_finite():
    a, b = tiny_flux(seed=3), tiny_flux(seed=3)
    inputs = flux_inputs(a, latent_hw=(8, 6))
    out_a = a.model.diffusion_model(**inputs)
    out_b = b.model.diffusion_model(**flux_inputs(b, latent_hw=(8, 6)))
    assert out_a.shape == inputs["x"].shape
    assert torch.isfinite(out_a).all()
    assert torch.equal(out_a, out_b)
    other = tiny_flux(seed=4).model.diffusion_model(**inputs)
    assert not torch.allclose(out_a, other)


def test_flux_is_built_from_a_config_comfyui_completes_and_loads_checkpoint_names():
    """The tiny config says the checkpoint's sizes; ComfyUI's detection adds what its release needs (0.33:
    ``txt_ids_dims``), the config's own values win. Saved under BFL checkpoint names (``*_norm.scale``), the
    weights load back strictly through the model config's ``process_unet_state_dict`` into the same model."""
    import comfy.ldm.flux.model
    import pytest
    from comfy_models import TINY_FLUX
    from lora_loom.composition.comfy_bridge.flux_model import (
        FluxModelError,
        checkpoint_state,
        complete_config,
        flux_model,
    )

    config = complete_config(TINY_FLUX)
    required = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert required <= set(config) and {k: config[k] for k in TINY_FLUX} == TINY_FLUX
    source = tiny_flux(seed=3)
    saved = checkpoint_state(source.model.diffusion_model.state_dict())
    norms = [k for k in saved if "_norm." in k]
    assert norms and all(k.endswith("_norm.scale") for k in norms)
    loaded = flux_model(TINY_FLUX, saved)
    inputs = flux_inputs(source, latent_hw=(8, 6))
    assert torch.equal(loaded.diffusion_model(**inputs), source.model.diffusion_model(**inputs))
    with pytest.raises(FluxModelError, match="double_blocks.0.img_attn.qkv.weight"):
        flux_model(TINY_FLUX, {k: v for k, v in saved.items() if k != "double_blocks.0.img_attn.qkv.weight"})
