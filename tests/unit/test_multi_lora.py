"""Masked multi-LoRA: stacked two-matmul path == per-adapter loop, per dtype; zero-scale adapters cost nothing."""
from __future__ import annotations

import pytest
import torch
from lora_loom.kernels.multi_lora import (
    AdapterFactors,
    MultiLoRAError,
    masked_multi_lora,
    masked_multi_lora_reference,
    select_active,
    stack_lora,
)

C_IN, C_OUT = 24, 36

# Tolerances relative to the fp32 reference, in the spirit of LyCORIS' bypass == merged tests.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


def _factors(seed: int, ranks: list[int], offsets: list[tuple[int, int]]) -> list[AdapterFactors]:
    """offsets: (out_offset, C_out_i) per adapter, e.g. a q/k/v slice of a fused qkv layer."""
    generator = torch.Generator().manual_seed(seed)
    return [AdapterFactors(down=torch.randn(r, C_IN, generator=generator) / C_IN ** 0.5,
                           up=torch.randn(width, r, generator=generator) / r ** 0.5,
                           scale=0.5 + i, out_offset=offset)
            for i, (r, (offset, width)) in enumerate(zip(ranks, offsets))]


LAYOUTS = {
    "full_width": ([4, 8, 2], [(0, C_OUT)] * 3),
    "fused_slices": ([4, 4, 6], [(0, 12), (12, 12), (24, 12)]),  # like to_q / to_k / to_v of img_attn.qkv
    "mixed": ([1, 16], [(0, C_OUT), (6, 20)]),
}


def _token_scale(seed: int, batch: int, length: int, n: int, zero: tuple[int, ...] = ()) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(batch, length, n, generator=generator)
    scale[scale < 0.2] = 0.0  # tokens outside a region
    for i in zero:
        scale[..., i] = 0.0
    return scale


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_stacked_equals_reference(layout: str, dtype: torch.dtype) -> None:
    ranks, offsets = LAYOUTS[layout]
    factors = _factors(1, ranks, offsets)
    x = torch.randn(2, 10, C_IN, generator=torch.Generator().manual_seed(2))
    token_scale = _token_scale(3, 2, 10, len(factors))
    reference = masked_multi_lora_reference(x, factors, C_OUT, token_scale)
    stacked = stack_lora(factors, C_OUT).to(dtype=dtype)
    got = masked_multi_lora(x.to(dtype), stacked, token_scale)
    assert got.dtype == dtype and got.shape == (2, 10, C_OUT)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), reference, atol=atol, rtol=rtol)


def test_reference_matches_dense_weight_definition() -> None:
    """The reference itself: delta = scale · token_scale · x @ (up @ down)ᵀ placed at the offset rows."""
    factors = _factors(4, [3], [(10, 8)])
    x = torch.randn(1, 5, C_IN)
    token_scale = torch.rand(1, 5, 1)
    expected = torch.zeros(1, 5, C_OUT)
    expected[..., 10:18] = x @ (factors[0].up @ factors[0].down).t() * factors[0].scale * token_scale
    torch.testing.assert_close(masked_multi_lora_reference(x, factors, C_OUT, token_scale), expected)


@pytest.mark.parametrize("zero, expected_rank", [((), 14), ((1,), 6), ((0, 2), 8), ((0, 1, 2), 0)])
def test_zero_scale_adapters_are_skipped(zero: tuple[int, ...], expected_rank: int) -> None:
    ranks, offsets = LAYOUTS["full_width"]
    factors = _factors(5, ranks, offsets)
    token_scale = _token_scale(6, 2, 7, 3, zero=zero)
    stacked = stack_lora(factors, C_OUT)
    active = select_active(stacked, token_scale)
    assert active.rank == expected_rank
    assert active.adapter_index == tuple(i for i in range(3) if i not in zero)
    # Poison the skipped adapters: if they were multiplied at all, NaN·0 would leak into the output.
    poisoned = [AdapterFactors(torch.full_like(f.down, float("nan")), f.up, f.scale, f.out_offset)
                if i in zero else f for i, f in enumerate(factors)]
    x = torch.randn(2, 7, C_IN)
    got = masked_multi_lora(x, stack_lora(poisoned, C_OUT), token_scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, masked_multi_lora_reference(x, factors, C_OUT, token_scale), atol=1e-5, rtol=1e-5)


def test_explicit_active_set_and_broadcast_token_scale() -> None:
    ranks, offsets = LAYOUTS["fused_slices"]
    factors = _factors(7, ranks, offsets)
    stacked = stack_lora(factors, C_OUT)
    x = torch.randn(3, 6, C_IN)
    token_scale = _token_scale(8, 1, 6, 3, zero=(0,))  # [1, L, N]: shared over the batch
    active = select_active(stacked, adapter_index=[2, 1])
    assert active.adapter_index == (1, 2) and active.rank == 10
    got = masked_multi_lora(x, stacked, token_scale, active=active)
    expected = masked_multi_lora_reference(x, factors, C_OUT, token_scale.expand(3, 6, 3))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_stack_layout() -> None:
    factors = _factors(9, [2, 3], [(0, 12), (20, 16)])
    stacked = stack_lora(factors, C_OUT)
    assert stacked.down.shape == (5, C_IN) and stacked.up.shape == (C_OUT, 5)
    assert stacked.rank_owner.tolist() == [0, 0, 1, 1, 1]
    assert stacked.rank_scale.tolist() == [0.5, 0.5, 1.5, 1.5, 1.5]
    assert stacked.up[12:, :2].abs().sum() == 0 and stacked.up[:20, 2:].abs().sum() == 0
    slices = [(s.rank_start, s.rank_end, s.out_start, s.out_end) for s in stacked.slices]
    assert slices == [(0, 2, 0, 12), (2, 5, 20, 36)]


@pytest.mark.parametrize("factors, message", [
    ([], "no adapters"),
    ([AdapterFactors(torch.zeros(2, C_IN), torch.zeros(C_OUT, 3))], "adapters\\[0\\].up: rank 3"),
    ([AdapterFactors(torch.zeros(2, C_IN), torch.zeros(C_OUT, 2)),
      AdapterFactors(torch.zeros(2, C_IN + 1), torch.zeros(C_OUT, 2))], "adapters\\[1\\].down: C_in"),
    ([AdapterFactors(torch.zeros(2, C_IN), torch.zeros(20, 2), out_offset=20)], "adapters\\[0\\].out_offset"),
    ([AdapterFactors(torch.zeros(2, C_IN, 1), torch.zeros(20, 2))], "adapters\\[0\\].down/up: expected 2-D"),
])
def test_stack_errors(factors: list[AdapterFactors], message: str) -> None:
    with pytest.raises(MultiLoRAError, match=message):
        stack_lora(factors, C_OUT)


def test_input_errors() -> None:
    stacked = stack_lora(_factors(10, [2], [(0, C_OUT)]), C_OUT)
    with pytest.raises(MultiLoRAError, match="x: last dim"):
        masked_multi_lora(torch.zeros(1, 2, C_IN + 1), stacked, torch.ones(1, 2, 1))
    with pytest.raises(MultiLoRAError, match="token_scale: last dim 2"):
        masked_multi_lora(torch.zeros(1, 2, C_IN), stacked, torch.ones(1, 2, 2))
    with pytest.raises(MultiLoRAError, match="outside \\[0, 1\\)"):
        select_active(stacked, adapter_index=[1])
