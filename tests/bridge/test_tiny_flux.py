"""The in-process fixtures themselves: a tiny ComfyUI Flux runs and is deterministic."""
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
