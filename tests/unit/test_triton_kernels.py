"""Triton kernels == their pure-torch references.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, numpy) in a subprocess, because the
variable must be set before triton is imported; small shapes keep it fast. On a CUDA machine the same comparisons
run compiled, in bf16 and fp32, at sizes where the tile loops and the tile skipping really happen.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_loom.kernels.joint_attention import (
    attention_dense,
    attention_grouped,
    dense_mask,
)
from lora_loom.kernels.multi_lora import AdapterFactors, masked_multi_lora, stack_lora
from lora_loom.kernels.multi_lora_triton import masked_multi_lora_fast, triton_usable

REPO = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON

# Cases: (name, kwargs). Shapes are chosen to cross tile edges (block 64 / 32 / 16) with ragged remainders.
LORA_CASES = {
    "ragged": dict(batch=2, length=37, c_in=40, c_out=72, ranks=[4, 8, 2], slices=None, zero=[]),
    "fused_slices": dict(batch=1, length=70, c_in=32, c_out=48, ranks=[4, 4, 4], slices=[0, 16, 32], zero=[]),
    "inactive_adapter": dict(batch=1, length=20, c_in=24, c_out=36, ranks=[3, 5, 16], slices=None, zero=[1]),
}
ATTENTION_CASES = {
    "isolated_regions": dict(batch=1, heads=2, length=80, dim=16, groups=[0] * 12 + [1] * 30 + [2] * 38,
                             allowed=[[1, 1, 1], [1, 1, 0], [1, 0, 1]]),
    "interleaved_labels": dict(batch=2, heads=1, length=45, dim=24, groups=[i % 3 for i in range(45)],
                               allowed=[[1, 0, 0], [1, 1, 0], [1, 1, 1]]),
    "empty_row_and_absent_group": dict(batch=1, heads=2, length=33, dim=16, groups=[0] * 10 + [2] * 23,
                                       allowed=[[1, 1, 1], [1, 1, 1], [0, 1, 0]]),
}

SCRIPT = r"""
import importlib.util, json, sys
repo = sys.argv[1]
spec = importlib.util.spec_from_file_location("lora_loom", repo + "/__init__.py", submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules["lora_loom"] = pack; spec.loader.exec_module(pack)
sys.path.insert(0, repo + "/tests/unit")
import test_triton_kernels as t
print(json.dumps(t.run_all("cpu", __import__("torch").float32)))
"""


def lora_case(case: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """Adapters, stacked factors, x ``[B, L, C_in]``, token_scale ``[B, L, N]``, base ``[B, L, C_out]``."""
    gen = torch.Generator().manual_seed(seed)
    n = len(case["ranks"])
    width = case["c_out"] // n if case["slices"] else case["c_out"]
    factors = [AdapterFactors(down=torch.randn(r, case["c_in"], generator=gen) / case["c_in"] ** 0.5,
                              up=torch.randn(width, r, generator=gen) / r ** 0.5, scale=0.5 + i,
                              out_offset=case["slices"][i] if case["slices"] else 0)
               for i, r in enumerate(case["ranks"])]
    stacked = stack_lora(factors, case["c_out"]).to(device, dtype)
    x = torch.randn(case["batch"], case["length"], case["c_in"], generator=gen).to(device, dtype)
    scale = torch.rand(case["batch"], case["length"], n, generator=gen)
    scale[scale < 0.3] = 0.0
    scale[..., case["zero"]] = 0.0
    base = torch.randn(case["batch"], case["length"], case["c_out"], generator=gen).to(device, dtype)
    return stacked, x, scale.to(device), base


def attention_case(case: dict, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (case["batch"], case["heads"], case["length"], case["dim"])
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    labels = torch.tensor(case["groups"], dtype=torch.long, device=device)
    return q, k, v, labels, torch.tensor(case["allowed"], dtype=torch.bool)


def run_all(device: str, dtype: torch.dtype) -> dict[str, float]:
    """Max |triton - torch| per case (and fused-epilogue case), run in whatever Triton mode is active."""
    from lora_loom.kernels.joint_attention_triton import attention_grouped_triton
    from lora_loom.kernels.multi_lora_triton import masked_multi_lora_triton

    errors: dict[str, float] = {}
    for name, case in LORA_CASES.items():
        stacked, x, scale, base = lora_case(case, device, dtype)
        want = masked_multi_lora(x, stacked, scale).float()
        errors[f"lora/{name}"] = float((masked_multi_lora_triton(x, stacked, scale).float() - want).abs().max())
        fused = masked_multi_lora_triton(x, stacked, scale, base=base).float()
        errors[f"lora_fused/{name}"] = float((fused - (base.float() + want)).abs().max())
    for name, case in ATTENTION_CASES.items():
        q, k, v, labels, allowed = attention_case(case, device, dtype)
        want = attention_dense(q, k, v, dense_mask(labels, allowed, q.device)).float()
        got = attention_grouped_triton(q, k, v, labels, allowed, block_m=16, block_n=16).float()
        errors[f"attention/{name}"] = float((got - want).abs().max())
        errors[f"attention_vs_grouped/{name}"] = float((got - attention_grouped(q, k, v, labels, allowed).float())
                                                       .abs().max())
    return errors


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO)], check=False, capture_output=True, text=True,
                          env=env, timeout=240, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"{kind}/{name}" for kind in ("lora", "lora_fused") for name in LORA_CASES]
                         + [f"{kind}/{name}" for kind in ("attention", "attention_vs_grouped")
                            for name in ATTENTION_CASES])
def test_interpreted_kernel_matches_torch(interpreted: dict[str, float], case: str) -> None:
    assert interpreted[case] < 1e-5, f"{case}: max error {interpreted[case]}"


def test_dispatch_falls_back_to_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_usable("cpu")
    stacked, x, scale, _ = lora_case(LORA_CASES["ragged"], "cpu", torch.float32)
    torch.testing.assert_close(masked_multi_lora_fast(x, stacked, scale), masked_multi_lora(x, stacked, scale),
                               rtol=0, atol=0)


def test_forced_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LOOM_KERNELS", "torch")
    assert not triton_usable("cpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_cuda_kernels_match_torch(dtype: torch.dtype, tolerance: float) -> None:
    errors = run_all("cuda", dtype)
    bad = {k: v for k, v in errors.items() if not v < tolerance}
    assert not bad, bad


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("length", [1000, 4608])
def test_cuda_flux_sized_attention(length: int) -> None:
    """Flux head size 128 at a 1024² sequence: one Triton launch == the grouped SDPA path."""
    from lora_loom.kernels.joint_attention_triton import attention_grouped_triton

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 24, length, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    labels = (torch.arange(length) * 4 // length).to("cuda")
    allowed = torch.eye(4, dtype=torch.bool)
    allowed[0] = True
    got = attention_grouped_triton(q, k, v, labels, allowed).float()
    want = attention_grouped(q, k, v, labels, allowed).float()
    assert float((got - want).abs().max()) < 3e-2
