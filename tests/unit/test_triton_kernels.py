"""Triton kernels == their pure-torch references, and the dispatch around them.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, numpy) in a subprocess, because the
variable must be set before triton is imported; small shapes keep it fast. On a CUDA machine the same comparisons
run compiled, in bf16 and fp32, at sizes where the tile loops and the tile skipping really happen, plus sizes whose
offsets pass 2**31 (int64 offsets) and, with two GPUs, tensors off the current device.

The dispatch tests run in-process: they set ``TRITON_INTERPRET=1`` only for ``triton_usable`` and replace the
kernel factory, so triton is never imported there.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lora_loom.kernels import joint_attention_triton as jat
from lora_loom.kernels import multi_lora_triton as mlt
from lora_loom.kernels import triton_runtime
from lora_loom.kernels.joint_attention import (
    attention_dense,
    attention_grouped,
    dense_mask,
    grouped_layout,
    resolve_allowed,
)
from lora_loom.kernels.multi_lora import (
    AdapterFactors,
    MultiLoRAError,
    masked_multi_lora,
    stack_lora,
)
from lora_loom.kernels.multi_lora_triton import masked_multi_lora_fast
from lora_loom.kernels.triton_runtime import (
    capability_supports,
    kernel_failed,
    triton_usable,
)

REPO = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON

# Cases: (name, kwargs). Shapes are chosen to cross tile edges (block 64 / 32 / 16) with ragged remainders.
LORA_CASES = {
    "ragged": {"batch": 2, "length": 37, "c_in": 40, "c_out": 72, "ranks": [4, 8, 2], "slices": None, "zero": []},
    "fused_slices": {"batch": 1, "length": 70, "c_in": 32, "c_out": 48, "ranks": [4, 4, 4], "slices": [0, 16, 32],
                     "zero": []},
    "inactive_adapter": {"batch": 1, "length": 20, "c_in": 24, "c_out": 36, "ranks": [3, 5, 16], "slices": None,
                         "zero": [1]},
}
ATTENTION_CASES = {
    "isolated_regions": {"batch": 1, "heads": 2, "length": 80, "dim": 16, "groups": [0] * 12 + [1] * 30 + [2] * 38,
                         "allowed": [[1, 1, 1], [1, 1, 0], [1, 0, 1]]},
    "interleaved_labels": {"batch": 2, "heads": 1, "length": 45, "dim": 24, "groups": [i % 3 for i in range(45)],
                           "allowed": [[1, 0, 0], [1, 1, 0], [1, 1, 1]]},
    "empty_row_and_absent_group": {"batch": 1, "heads": 2, "length": 33, "dim": 16, "groups": [0] * 10 + [2] * 23,
                                   "allowed": [[1, 1, 1], [1, 1, 1], [0, 1, 0]]},
    "wide_head": {"batch": 1, "heads": 1, "length": 40, "dim": 128, "groups": [0] * 18 + [1] * 22,  # 8 warps
                  "allowed": [[1, 0], [1, 1]]},
}

SCRIPT = r"""
import importlib.util, json, sys
repo = sys.argv[1]
spec = importlib.util.spec_from_file_location("lora_loom", repo + "/__init__.py", submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec); sys.modules["lora_loom"] = pack; spec.loader.exec_module(pack)
sys.path.insert(0, repo + "/tests/unit")
import test_triton_kernels as t
print(json.dumps({**t.run_all("cpu", __import__("torch").float32), **t.layout_reuse("cpu")}))
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


def layout_reuse(device: str) -> dict[str, float]:
    """Two :func:`attention_grouped_fast` calls with equal rules (fresh tensors): how often the kernel's sorted layout
    was built (resolved on the host), and the calls' max error against the torch grouped path."""
    case = {"batch": 1, "heads": 2, "length": 60, "dim": 16, "groups": [1] * 20 + [0] * 25 + [2] * 15,
            "allowed": [[1, 1, 0], [0, 1, 0], [1, 0, 1]]}  # rules no other case has (its layout is not cached yet)
    q, k, v, labels, allowed = attention_case(case, device, torch.float32, seed=1)
    builds = 0
    resolve = jat.resolve_allowed

    def counted(*args: object) -> torch.Tensor:
        nonlocal builds
        builds += 1
        return resolve(*args)

    jat.resolve_allowed = counted
    try:
        first = jat.attention_grouped_fast(q, k, v, labels, allowed)
        second = jat.attention_grouped_fast(q, k, v, labels.clone(), allowed.clone())
    finally:
        jat.resolve_allowed = resolve
    want = attention_grouped(q, k, v, labels, allowed).float()
    return {"layout/builds": float(builds),
            "layout/error": float(max((first.float() - want).abs().max(), (second.float() - want).abs().max()))}


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


def test_interpreted_attention_reuses_its_layout(interpreted: dict[str, float]) -> None:
    """The second call with equal rules takes the cached sorted layout: no host-side resolve, sort or copy."""
    assert interpreted["layout/builds"] == 1.0
    assert interpreted["layout/error"] < 1e-5


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


def test_capability_gates_dtypes() -> None:
    """bfloat16 ``tl.dot`` needs sm80+; float16/float32 sm70+; nothing below, and no other dtype."""
    assert capability_supports((8, 0), torch.bfloat16) and capability_supports((9, 0), torch.bfloat16)
    assert not capability_supports((7, 5), torch.bfloat16)
    assert capability_supports((7, 0), torch.float16) and capability_supports((7, 5), torch.float32)
    assert not capability_supports((6, 1), torch.float16) and not capability_supports((6, 1), None)
    assert not capability_supports((9, 0), torch.float64)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(("capability", "usable"), [((7, 5), {torch.float16: True, torch.bfloat16: False}),
                                                    ((8, 6), {torch.float16: True, torch.bfloat16: True}),
                                                    ((6, 1), {torch.float16: False, torch.float32: False})])
def test_triton_usable_asks_the_device_capability(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
                                                  usable: dict[torch.dtype, bool]) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LOOM_KERNELS", raising=False)
    asked: list[int] = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or capability)
    triton_runtime._capability.cache_clear()
    try:
        assert {dtype: triton_usable("cuda:1", dtype) for dtype in usable} == usable
        assert not triton_usable("cuda:1", torch.float64)
    finally:
        triton_runtime._capability.cache_clear()
    assert asked == [1]  # looked up once per device


@pytest.fixture
def interpreter_dispatch(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``triton_usable`` says yes (interpreter), no kernel has failed yet, and both kernel factories are replaced by
    ones that record the call and raise as a compile error would. Yields the list of factory calls."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("LOOM_KERNELS", raising=False)
    monkeypatch.setattr(triton_runtime, "_FAILED", {})
    calls: list[str] = []

    def failing(name: str) -> Callable[[], None]:
        def factory() -> None:
            calls.append(name)
            raise RuntimeError(f"ptxas fatal: {name} does not compile\nsecond line")
        return factory

    monkeypatch.setattr(mlt, "_kernels", failing("lora"))
    monkeypatch.setattr(jat, "_kernel", failing("attention"))
    return calls


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.endswith("triton_runtime") and r.levelno == logging.WARNING]


def test_failing_kernels_fall_back_to_torch_once(interpreter_dispatch: list[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A kernel that fails to compile gives the torch result, one warning naming the error, and is not tried
    again in this process; the other kernel is disabled only by its own failure."""
    stacked, x, scale, _ = lora_case(LORA_CASES["ragged"], "cpu", torch.float32)
    case = ATTENTION_CASES["isolated_regions"]
    q, k, v, labels, allowed = attention_case(case, "cpu", torch.float32)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            torch.testing.assert_close(masked_multi_lora_fast(x, stacked, scale), masked_multi_lora(x, stacked, scale),
                                       rtol=0, atol=0)
        assert interpreter_dispatch == ["lora"] and kernel_failed(jat.KERNEL) is None
        assert jat.attention_triton_eligible(q, k, v)
        for _ in range(2):
            torch.testing.assert_close(jat.attention_grouped_fast(q, k, v, labels, allowed),
                                       attention_grouped(q, k, v, labels, allowed), rtol=0, atol=0)
    assert interpreter_dispatch == ["lora", "attention"]
    assert not jat.attention_triton_eligible(q, k, v)
    assert kernel_failed(mlt.KERNEL) == "RuntimeError: ptxas fatal: lora does not compile"
    warnings = _warnings(caplog)
    assert len(warnings) == 2, warnings
    assert mlt.KERNEL in warnings[0] and "RuntimeError: ptxas fatal: lora does not compile" in warnings[0]
    assert jat.KERNEL in warnings[1] and "attention does not compile" in warnings[1]


def test_input_errors_are_raised_not_swallowed(interpreter_dispatch: list[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A caller's shape error is raised as before and does not disable the kernel."""
    stacked, x, scale, _ = lora_case(LORA_CASES["ragged"], "cpu", torch.float32)
    with caplog.at_level(logging.WARNING), pytest.raises(MultiLoRAError, match="C_in"):
        masked_multi_lora_fast(x[..., :-1], stacked, scale)
    assert kernel_failed(mlt.KERNEL) is None and not _warnings(caplog) and interpreter_dispatch == []


def test_autograd_and_other_dtypes_take_the_torch_path(interpreter_dispatch: list[str]) -> None:
    """The fast entry points themselves keep inputs that need gradients, or that ``tl.dot`` does not take,
    on the torch path: the kernel factory is never reached, and gradients flow."""
    stacked, x, scale, _ = lora_case(LORA_CASES["ragged"], "cpu", torch.float32)
    x = x.requires_grad_(True)
    masked_multi_lora_fast(x, stacked, scale).square().sum().backward()
    assert x.grad is not None and bool(x.grad.abs().max() > 0)
    masked_multi_lora_fast(x.detach().double(), stacked, scale)
    q, k, v, labels, allowed = attention_case(ATTENTION_CASES["isolated_regions"], "cpu", torch.float32)
    assert not jat.attention_triton_eligible(q.requires_grad_(True), k, v)
    jat.attention_grouped_fast(q, k, v, labels, allowed).sum().backward()
    assert q.grad is not None
    q = q.detach()
    assert not jat.attention_triton_eligible(q.double(), k.double(), v.double())
    assert not jat.attention_triton_eligible(q, k, v[..., :8])  # v of another head size
    wide = torch.zeros(1, 1, 4, jat.MAX_HEAD_DIM * 2)
    assert not jat.attention_triton_eligible(wide, wide, wide)
    with torch.no_grad():  # no autograd recording: the kernel may run
        assert jat.attention_triton_eligible(q.requires_grad_(True), k, v)
    assert interpreter_dispatch == []


def test_triton_layout_is_cached_per_rules() -> None:
    """Equal rules at equal length (fresh tensors) share one layout object, found by the torch path's fingerprint
    too; other rules get their own. The layout is the stable sort by group with the resolved rule table."""
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    allowed = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    layout = jat.triton_layout(labels, allowed, "cpu")
    assert jat.triton_layout(labels.clone(), allowed.clone(), "cpu") is layout
    assert jat.triton_layout(labels, allowed, "cpu", grouped_layout(labels, allowed, "cpu").fingerprint) is layout
    other = allowed.clone()
    other[2, 2] = True
    assert jat.triton_layout(labels, other, "cpu") is not layout
    assert layout.order.tolist() == [1, 3, 6, 2, 5, 0, 4]
    assert layout.sorted_labels.tolist() == [0, 0, 0, 1, 1, 2, 2] and layout.sorted_labels.dtype == torch.int32
    assert torch.equal(layout.table, resolve_allowed(labels, allowed).to(torch.int8))


def test_clear_caches_drops_the_triton_layouts_too() -> None:
    from lora_loom.kernels import joint_attention as ja

    labels = torch.tensor([1, 0, 1, 0])
    allowed = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    layout = jat.triton_layout(labels, allowed, "cpu")
    ja.clear_caches()
    assert jat.triton_layout(labels, allowed, "cpu") is not layout


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


def _gpu_memory() -> int:
    return torch.cuda.get_device_properties(0).total_memory if CUDA else 0


@pytest.mark.skipif(_gpu_memory() < 16 * 2**30, reason="needs a CUDA GPU with 16 GB and triton")
def test_cuda_lora_offsets_past_int32() -> None:
    """Flux ``linear1`` width (21504 outputs) over 102400 tokens: the output offset ``m·21504`` passes 2**31 from
    token 99,865 on (int32 offsets would write out of bounds); the last tokens still match torch."""
    from lora_loom.kernels.multi_lora_triton import masked_multi_lora_triton

    gen = torch.Generator().manual_seed(5)
    tokens, c_in, c_out = 102_400, 64, 21_504
    factors = [AdapterFactors(down=torch.randn(8, c_in, generator=gen) / 8,
                              up=torch.randn(c_out, 8, generator=gen) / 3)]
    stacked = stack_lora(factors, c_out).to("cuda", torch.bfloat16)
    x = torch.randn(1, tokens, c_in, generator=gen).to("cuda", torch.bfloat16)
    scale = torch.ones(1, 1, 1, device="cuda")
    got = masked_multi_lora_triton(x, stacked, scale)
    tail = slice(tokens - 4096, tokens)
    want = masked_multi_lora(x[:, tail], stacked, scale)
    assert float((got[:, tail].float() - want.float()).abs().max()) < 6e-2


@pytest.mark.skipif(_gpu_memory() < 64 * 2**30, reason="needs a CUDA GPU with 64 GB and triton")
def test_cuda_attention_offsets_past_int32() -> None:
    """q, k, v of ``16640·1024·128 > 2**31`` elements: head offsets ``h·L·D`` pass 2**31 from head 16384 on; the
    last heads still match the grouped SDPA path."""
    from lora_loom.kernels.joint_attention_triton import attention_grouped_triton

    gen = torch.Generator(device="cuda").manual_seed(6)
    heads, length, dim = 16_640, 1024, 128
    q, k, v = (torch.randn(1, heads, length, dim, generator=gen, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    labels = (torch.arange(length) * 2 // length).to("cuda")
    allowed = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    got = attention_grouped_triton(q, k, v, labels, allowed).view(1, length, heads, dim)[:, :, -64:]
    tail = slice(heads - 64, heads)
    want = attention_grouped(q[:, tail], k[:, tail], v[:, tail], labels, allowed).view(1, length, 64, dim)
    assert float((got.float() - want.float()).abs().max()) < 3e-2


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs and triton")
def test_cuda_kernels_launch_on_the_tensors_device() -> None:
    """Tensors on cuda:1 while cuda:0 is current: the kernels launch on the tensors' device."""
    with torch.cuda.device(0):
        errors = run_all("cuda:1", torch.float32)
    bad = {k: v for k, v in errors.items() if not v < 1e-4}
    assert not bad, bad
