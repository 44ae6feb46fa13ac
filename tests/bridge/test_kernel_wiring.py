"""The Triton kernels are wired into regional composition: a real model call enters them and agrees with torch.

Runs under Triton's CPU interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set before triton is imported,
see tests/unit/test_triton_kernels.py), which imports ComfyUI in-process with ``--cpu`` as tests/bridge/conftest.py
does. The subprocess builds the tiny Flux of tests/comfy_models.py with the two-region, two-adapter composition of
test_regional_mechanism.py and makes one model call three ways: Triton path, ``LOOM_KERNELS=torch``, and Triton
with a previous attention override installed (which must keep its own path: chain, don't clobber); then a layer and
the override with inputs that need gradients (torch path); last, the same call with both kernel factories raising
as a failed compile would (the call must still succeed on the torch path, with one warning per kernel). Calls into
the two Triton entry points are counted by wrapping the module-level functions inside the subprocess.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import folder_paths
import pytest

TESTS = Path(__file__).resolve().parents[1]
COMFYUI = str(Path(folder_paths.__file__).parent)  # the ComfyUI this process imported (tests/bridge/conftest.py)

# fp32 on both paths (the interpreter runs tl.dot as an IEEE fp32 numpy matmul): the paths differ only in
# summation order (tile-wise K loops, online softmax vs SDPA). One fp32 reduction of K <= 448 terms is off by
# ~sqrt(K)·eps ≈ 3e-6 relative; through 4 blocks and the final layer, on outputs of magnitude ~1-3, 1e-4 leaves
# ~70x headroom over the measured 1.4e-6, while a wrong rule, scale or slice moves outputs by > 1e-2.
TOLERANCE = 1e-4

SCRIPT = r"""
import json, os, sys
tests, comfy, base_directory = sys.argv[1:4]
sys.path.insert(0, tests)
import conftest  # loads the pack as lora_loom and puts tests/ on sys.path
from lora_loom.comfy_env import find_comfyui, import_comfy
import_comfy(find_comfyui(comfy), cpu=True, base_directory=base_directory)
sys.path.insert(0, tests + "/bridge")
import torch
torch.set_num_threads(1)
import test_regional_mechanism as m
from comfy_models import flux_inputs, tiny_flux
from lora_loom.composition.plan import ComposeOptions
from lora_loom.kernels import joint_attention_triton, multi_lora_triton

calls = {"lora": 0, "attention": 0, "previous": 0}

def counting(name, function):
    def counted(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)
    return counted

multi_lora_triton.masked_multi_lora_triton = counting("lora", multi_lora_triton.masked_multi_lora_triton)
joint_attention_triton.attention_grouped_triton = counting("attention", joint_attention_triton.attention_grouped_triton)

def previous(func, *args, **kwargs):
    calls["previous"] += 1
    return func(*args, **kwargs)

flux = tiny_flux(seed=0)
inputs = flux_inputs(flux, latent_hw=(16, 16))  # 64 image + 10 text tokens: two 64-query tiles in attention
options = ComposeOptions(latent_reinit=False, **m.ALWAYS)

def predict(patcher):
    clone, _, encoded = m.two_regions(patcher, options)
    for key in calls:
        calls[key] = 0
    out = m.apply_model(clone, inputs["x"], m.HIGH_SIGMA, encoded.context, inputs["y"])
    return out, dict(calls), encoded

fast, fast_calls, encoded = predict(flux)
os.environ["LOOM_KERNELS"] = "torch"
slow, slow_calls, _ = predict(flux)
del os.environ["LOOM_KERNELS"]
chained_flux = flux.clone()
chained_flux.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = previous
chained, chained_calls, _ = predict(chained_flux)
plain = m.apply_model(flux, inputs["x"], m.HIGH_SIGMA, encoded.context, inputs["y"])

# autograd (latent refinement differentiates through layers and attention): the torch path, gradients flow
import comfy.ldm.modules.attention as attention
from lora_loom.composition.runtime.probes import gradient_scope
clone, composition, _ = m.two_regions(flux, options)
call = m.in_call(clone, composition.layout_for(16, 16, 1, 1, 0, (True,), torch.device("cpu")))
call.__enter__()
layer = clone.object_patches["diffusion_model.double_blocks.0.img_attn.qkv"]
override = clone.model_options["transformer_options"]["optimized_attention_override"]
gen = torch.Generator().manual_seed(4)
x = torch.randn(1, 64, layer.weight.shape[1], generator=gen).requires_grad_(True)
q = torch.randn(1, 2, 74, 32, generator=gen).requires_grad_(True)
for key in calls:
    calls[key] = 0
with gradient_scope():  # as refine.py differentiates: out of inference mode, grad on
    loss = layer(x).square().sum() + override(attention.attention_pytorch, q, q, q, 2, skip_reshape=True, mask=None,
                                              transformer_options={"block_type": "double", "block_index": 0}).sum()
    grads = torch.autograd.grad(loss, [x, q])
call.__exit__(None, None, None)

# a kernel that fails to compile or launch: warned once, torch for the rest of the process, sampling goes on
import logging
warnings = []

class Collect(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())

logging.getLogger("lora_loom.kernels.triton_runtime").addHandler(Collect(logging.WARNING))
factories = {"lora": 0, "attention": 0}

def failing(name):
    def factory():
        factories[name] += 1
        raise RuntimeError("ptxas fatal: " + name)
    return factory

multi_lora_triton._kernels = failing("lora")
joint_attention_triton._kernel = failing("attention")
broken, _, _ = predict(flux)
broken_again, broken_calls, _ = predict(flux)
print(json.dumps({
    "broken_vs_torch": float(max((broken - slow).abs().max(), (broken_again - slow).abs().max())),
    "broken_factories": factories, "broken_warnings": warnings, "broken_calls_after": broken_calls,
    "grad_calls": dict(calls), "grads_ok": all(bool(torch.isfinite(g).all() and g.abs().max() > 0) for g in grads),
    "fast_vs_torch": float((fast - slow).abs().max()),
    "chained_vs_torch": float((chained - slow).abs().max()),
    "composed_vs_plain": float((slow - plain).abs().max()),
    "fast_calls": fast_calls, "torch_calls": slow_calls, "chained_calls": chained_calls,
}))
"""


@pytest.fixture(scope="module")
def wiring(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    base = tmp_path_factory.mktemp("comfy-base")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    env.pop("LOOM_KERNELS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(TESTS), COMFYUI, str(base)], check=False,
                          capture_output=True, text=True, env=env, timeout=300, cwd=str(base))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_triton_path_enters_both_kernels_and_agrees_with_torch(wiring: dict) -> None:
    assert wiring["composed_vs_plain"] > 1e-2  # the adapters and rules change the prediction
    # 4 blocks (2 double + 2 single) x 2 attentions (regional rules + the base-blend pass, both non-trivial);
    # 20 per-token layers (8 img/txt Linears per double block, linear1/linear2 per single block; the
    # modulations run per sample, not through the stacked kernel)
    assert wiring["fast_calls"] == {"lora": 20, "attention": 8, "previous": 0}
    assert wiring["fast_vs_torch"] <= TOLERANCE


def test_forced_torch_path_enters_no_kernel(wiring: dict) -> None:
    assert wiring["torch_calls"] == {"lora": 0, "attention": 0, "previous": 0}


def test_previous_override_keeps_its_path(wiring: dict) -> None:
    """Chain, don't clobber: with a previous override the attention goes through it (never the Triton
    attention); the layers still use the Triton LoRA kernel."""
    calls = wiring["chained_calls"]
    assert calls["attention"] == 0 and calls["previous"] > 0 and calls["lora"] == 20, calls
    assert wiring["chained_vs_torch"] <= TOLERANCE


def test_autograd_takes_the_torch_path(wiring: dict) -> None:
    """The kernels have no backward: a wrapped layer and the override called with inputs that need gradients
    (latent refinement) run torch, and the gradients reach the inputs."""
    assert wiring["grad_calls"] == {"lora": 0, "attention": 0, "previous": 0}
    assert wiring["grads_ok"]


def test_failing_kernels_fall_back_to_torch_for_good(wiring: dict) -> None:
    """Kernels that fail to compile: the model call still returns the torch prediction, each failure is warned
    about once naming the error, and neither kernel is tried again (the next call enters none)."""
    assert wiring["broken_vs_torch"] <= TOLERANCE
    assert wiring["broken_factories"] == {"lora": 1, "attention": 1}
    assert wiring["broken_calls_after"] == {"lora": 0, "attention": 0, "previous": 0}
    warnings = wiring["broken_warnings"]
    assert len(warnings) == 2, warnings
    assert any("masked_multi_lora" in w and "RuntimeError: ptxas fatal: lora" in w for w in warnings), warnings
    assert any("attention_grouped" in w and "RuntimeError: ptxas fatal: attention" in w for w in warnings), warnings
