"""The FLOP model against torch's own FLOP counter on real Linears/matmuls, and its limits against their definition."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from lora_loom.bench.flops import (
    DEMO_FLUX,
    FLUX_DEV,
    SMALL_FLUX,
    FlopModelError,
    FluxShape,
    Workload,
    adapter_flops,
    attention_flops,
    base_flops,
    double_block_linears,
    lora_flops,
    method_flops,
    single_block_linears,
    workload_for,
)
from torch.utils.flop_counter import FlopCounterMode

TINY = FluxShape(hidden=32, heads=2, depth=2, depth_single=3, context_dim=24, vec_dim=16)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _run_blocks(shape: FluxShape, work: Workload, rank: int | None = None) -> None:
    """Every block Linear of ``shape`` on its tokens (and a rank-``rank`` LoRA beside it when given)."""
    for depth, layers in ((shape.depth, double_block_linears(shape)),
                          (shape.depth_single, single_block_linears(shape))):
        for _ in range(depth):
            for layer in layers:
                tokens = 1 if layer.per_sample else work.tokens(layer.stream)
                x = torch.randn(work.batch, tokens, layer.c_in)
                if rank is None:
                    torch.nn.functional.linear(x, torch.randn(layer.c_out, layer.c_in))
                else:
                    (x @ torch.randn(layer.c_in, rank)) @ torch.randn(rank, layer.c_out)


@pytest.mark.parametrize("work", [Workload(16, 5), Workload(9, 3, batch=2)])
def test_block_linears_match_torch_counter(work: Workload) -> None:
    counted = _counted(lambda: _run_blocks(TINY, work))
    d, patch_in = TINY.hidden, TINY.in_channels * TINY.patch_size ** 2
    embed = (2 * work.image_tokens * patch_in * d + 2 * work.text_tokens * TINY.context_dim * d
             + 2 * work.image_tokens * d * patch_in + 2 * d * 2 * d + 2 * (2 * 256 * d + 2 * d * d)
             + 2 * TINY.vec_dim * d + 2 * d * d) * work.batch
    assert base_flops(TINY, work).linear == pytest.approx(counted + embed)


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("work", [Workload(16, 5), Workload(4, 7, batch=3)])
def test_adapter_flops_match_torch_counter(rank: int, work: Workload) -> None:
    assert adapter_flops(TINY, work, adapters=1, rank=rank) == pytest.approx(_counted(lambda: _run_blocks(TINY, work,
                                                                                                          rank)))
    assert adapter_flops(TINY, work, adapters=3, rank=rank) == pytest.approx(3 * adapter_flops(TINY, work, 1, rank))


@pytest.mark.parametrize(("lq", "lk"), [(10, 10), (12, 5)])
def test_attention_flops_match_matmul_attention(lq: int, lk: int) -> None:
    q, k = torch.randn(1, TINY.heads, lq, 16), torch.randn(1, TINY.heads, lk, 16)
    shape = FluxShape(hidden=TINY.heads * 16, heads=TINY.heads, depth=1, depth_single=0)
    counted = _counted(lambda: torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ k)
    assert attention_flops(shape, lq * lk) == pytest.approx(counted)


def test_lora_flops_definition() -> None:
    x, down, up = torch.randn(7, 20), torch.randn(20, 3), torch.randn(3, 11)
    assert lora_flops(7, 20, 11, 3) == _counted(lambda: (x @ down) @ up)


def test_flux_dev_parameter_count() -> None:
    """Per-token FLOPs of the blocks / 2 = the block Linears' weights: Flux-dev has ~11.8 B of them."""
    weights = sum(FLUX_DEV.depth * layer.c_in * layer.c_out for layer in double_block_linears(FLUX_DEV)) \
        + sum(FLUX_DEV.depth_single * layer.c_in * layer.c_out for layer in single_block_linears(FLUX_DEV))
    assert weights == 1254 * 3072 ** 2
    assert 11.5e9 < weights < 12.0e9


@pytest.mark.parametrize(("method", "adapters", "regions", "limit"), [
    ("base", 4, 4, 1.0), ("merged", 8, 2, 1.0), ("hooks", 4, 3, 3.0), ("composite", 8, 4, 8.0)])
def test_pass_counting_limits(method: str, adapters: int, regions: int, limit: float) -> None:
    work = method_flops(method, FLUX_DEV, 4096, 256, adapters, regions, rank=16)
    assert work.limit == pytest.approx(limit)
    assert work.passes == max(1, round(limit))


def test_regional_limit_flux_dev_1024() -> None:
    """4 rank-16 adapters on every token at 1024² (256 text tokens) cost ~2.1 % over the base step (by hand:
    1.43 TFLOP of LoRA over 69.5 TFLOP); the extra region prompts and a second (base-blend) attention come on top."""
    tokens = workload_for(1024, FLUX_DEV, 256).image_tokens
    assert tokens == 4096
    plain = Workload(tokens, 256)
    ratio = adapter_flops(FLUX_DEV, plain, 4, 16) / base_flops(FLUX_DEV, plain).total
    assert ratio == pytest.approx(0.0206, abs=0.0005)
    lean = method_flops("regional", FLUX_DEV, tokens, 0, 4, 4, 16, base_blend=False)
    assert lean.limit == pytest.approx(1.0 + adapter_flops(FLUX_DEV, Workload(tokens, 0), 4, 16)
                                       / base_flops(FLUX_DEV, Workload(tokens, 0)).total)
    full = method_flops("regional", FLUX_DEV, tokens, 256, 4, 4, 16)
    grouped = method_flops("regional", FLUX_DEV, tokens, 256, 4, 4, 16, regional_pairs=0.5 * (4096 + 1280) ** 2,
                           base_pairs=0.5 * (4096 + 1280) ** 2)
    assert full.limit > grouped.limit > lean.limit > 1.0
    dense = method_flops("dense_per_head", FLUX_DEV, tokens, 256, 4, 4, 16, regional_pairs=1.0, base_pairs=1.0)
    assert dense.limit == pytest.approx(full.limit)


def test_region_tokens_set_the_text_of_the_regional_pass() -> None:
    """Global prompt 10 tokens, 4 region prompts of 3 (trimmed): the pass reads 10 + 4·3 = 22 text tokens, not 50.
    By hand for TINY (D 32, M 128, 2 double + 3 single blocks, context 24): one text token costs
    2·2·(32·96 + 32·32 + 32·128 + 128·32) + 3·2·(32·224 + 160·32) + 2·24·32 = 124416 FLOPs of Linears and, per
    rank-2 adapter, 2·2·2·(128 + 64 + 160 + 160) + 3·2·2·(256 + 192) = 9472; attention (dense, base blend on)
    is 5 blocks · 4·32 · 2·L² with L = 16 + 22 = 38."""
    trimmed = method_flops("regional", TINY, 16, 10, 3, 4, 2, region_tokens=3)
    assert trimmed.flops.attention == 5 * 4 * 32 * 2 * 38 ** 2 == 1848320
    longer = method_flops("regional", TINY, 16, 10, 3, 4, 2, region_tokens=4)
    assert longer.flops.linear - trimmed.flops.linear == 4 * 124416
    assert longer.flops.adapters - trimmed.flops.adapters == 4 * 3 * 9472
    merged = base_flops(TINY, Workload(16, 10)).total
    assert trimmed.limit == pytest.approx(trimmed.flops.total / merged)
    assert trimmed.flops.total == pytest.approx(base_flops(TINY, Workload(16, 22), 2 * 38 ** 2).total
                                                + adapter_flops(TINY, Workload(16, 22), 3, 2))
    untrimmed = method_flops("regional", TINY, 16, 10, 3, 4, 2)
    assert untrimmed == method_flops("regional", TINY, 16, 10, 3, 4, 2, region_tokens=10)
    assert untrimmed.flops.attention == 5 * 4 * 32 * 2 * (16 + 50) ** 2
    assert 1.0 < trimmed.limit < untrimmed.limit


def test_peers_read_full_length_prompts_whatever_region_tokens() -> None:
    """Only Loom regional trims. dense_per_head (a peer's layout) composes 10 + 4·10 = 50 text tokens: Linears
    3452928 (merged, 10 tokens) + 40·124416 = 8429568, attention 5 · 4·32 · 2·(16 + 50)² = 5575680, the untrimmed
    regional pass exactly. Hooks: 3 passes of merged's 10-token prompt, limit 3; CLoRA, composite unchanged."""
    assert base_flops(TINY, Workload(16, 10)).linear == 3452928
    dense = method_flops("dense_per_head", TINY, 16, 10, 3, 4, 2, region_tokens=3)
    assert dense.flops.linear == 3452928 + 40 * 124416 == 8429568
    assert dense.flops.attention == 5 * 4 * 32 * 2 * 66 ** 2 == 5575680
    assert dense == replace(method_flops("regional", TINY, 16, 10, 3, 4, 2), method="dense_per_head")
    hooks = method_flops("hooks", TINY, 16, 10, 3, 3, 2, region_tokens=4)
    assert (hooks.passes, hooks.limit) == (3, 3.0)
    assert hooks == method_flops("hooks", TINY, 16, 10, 3, 3, 2)
    for method in ("clora", "composite", "gates", "merged"):
        untrimmed = method_flops(method, TINY, 16, 10, 3, 3, 2)
        assert method_flops(method, TINY, 16, 10, 3, 3, 2, region_tokens=4) == untrimmed


@pytest.mark.parametrize("shape", [FLUX_DEV, DEMO_FLUX, SMALL_FLUX])
def test_gates_and_clora_bounds(shape: FluxShape) -> None:
    gates = method_flops("gates", shape, 1024, 77, 4, 1, 16)
    clora = method_flops("clora", shape, 1024, 77, 4, 1, 16)
    assert 1.0 < gates.limit < 1.5
    assert clora.passes == 5 and clora.limit > 5.0


@pytest.mark.parametrize(("call", "field"), [
    (lambda: method_flops("nope", SMALL_FLUX, 16, 4, 1, 1, 4), "method"),
    (lambda: method_flops("regional", SMALL_FLUX, 16, 4, 0, 1, 4), "adapters"),
    (lambda: method_flops("regional", SMALL_FLUX, 16, 4, 1, 1, 4, region_tokens=0), "region_tokens"),
    (lambda: adapter_flops(SMALL_FLUX, Workload(4, 4), 1, 4, token_fraction=2.0), "token_fraction"),
    (lambda: base_flops(FluxShape(hidden=30, heads=4, depth=1, depth_single=1), Workload(4, 4)), "heads"),
    (lambda: workload_for(500, FLUX_DEV, 77), "resolution"),
])
def test_errors_name_the_field(call, field: str) -> None:
    with pytest.raises(FlopModelError, match=field):
        call()
