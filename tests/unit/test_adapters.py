"""Adapter kinds: per-token bypass equals the merged weight, per kind and dtype; offsets, swaps, low rank."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from lora_loom.composition.adapters import (
    BIAS,
    DoRA,
    LoHa,
    LoKr,
    LoRA,
    Offset,
    SetWeight,
    WeightDiff,
    adapter_tensors,
    bypass_output,
    merged_delta,
    with_tensors,
)

OUT, IN, R = 12, 8, 3
# LyCORIS tolerances, applied to the relative mean squared error ||a - b||² / ||b||².
TOL = {torch.float32: 5e-6, torch.float16: 5e-5, torch.bfloat16: 5e-4}


def _rnd(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5


def _lora(shape: tuple[int, int] = (OUT, IN), offset: Offset | None = None) -> LoRA:
    rows = offset.length if offset else shape[0]
    return LoRA(up=_rnd(rows, R, seed=1), down=_rnd(R, shape[1], seed=2), alpha=2.0, target_shape=shape, offset=offset)


KINDS: dict[str, Callable[[], object]] = {
    "lora": _lora,
    "lora_mid": lambda: LoRA(up=_rnd(OUT, R, seed=1), down=_rnd(R, IN, seed=2), mid=_rnd(R, R, 1, 1, seed=3),
                             alpha=1.5, target_shape=(OUT, IN)),
    "loha": lambda: LoHa(w1_a=_rnd(OUT, R, seed=1), w1_b=_rnd(R, IN, seed=2), w2_a=_rnd(OUT, R, seed=3),
                         w2_b=_rnd(R, IN, seed=4), alpha=2.0, target_shape=(OUT, IN)),
    "loha_tucker": lambda: LoHa(w1_a=_rnd(R, OUT, seed=1), w1_b=_rnd(R, IN, seed=2), w2_a=_rnd(R, OUT, seed=3),
                                w2_b=_rnd(R, IN, seed=4), t1=_rnd(R, R, seed=5), t2=_rnd(R, R, seed=6), alpha=2.0,
                                target_shape=(OUT, IN)),
    "lokr_full": lambda: LoKr(w1=_rnd(3, 2, seed=1), w2=_rnd(4, 4, seed=2), alpha=7.0, target_shape=(OUT, IN)),
    "lokr_factored": lambda: LoKr(w1_a=_rnd(3, 1, seed=1), w1_b=_rnd(1, 2, seed=2), w2_a=_rnd(4, 2, seed=3),
                                  w2_b=_rnd(2, 4, seed=4), alpha=8.0, target_shape=(OUT, IN)),
    "lokr_tucker": lambda: LoKr(w1=_rnd(3, 2, seed=1), w2_a=_rnd(2, 4, seed=3), w2_b=_rnd(2, 4, seed=4),
                                t2=_rnd(2, 2, seed=5), alpha=3.0, target_shape=(OUT, IN)),
    "dora_out": lambda: DoRA(inner=_lora(), magnitude=_rnd(OUT, 1, seed=7).abs() + 1),
    "dora_in": lambda: DoRA(inner=_lora(), magnitude=_rnd(1, IN, seed=7).abs() + 1),
    "dora_loha": lambda: DoRA(inner=KINDS["loha"](), magnitude=_rnd(OUT, seed=8).abs() + 1),
    "dora_comfy_norm": lambda: DoRA(inner=_lora(), magnitude=_rnd(OUT, 1, seed=7).abs() + 1, norm_source="base"),
    "diff": lambda: WeightDiff(delta=_rnd(OUT, IN, seed=9), target_shape=(OUT, IN)),
    "set_weight": lambda: SetWeight(value=_rnd(OUT, IN, seed=10), target_shape=(OUT, IN)),
    "lora_slice": lambda: _lora((3 * OUT, IN), Offset(0, OUT, OUT)),
}
BASE = _rnd(OUT, IN, seed=11)


def _base_for(adapter: object) -> torch.Tensor:
    return _rnd(*adapter.target_shape, seed=11)


def _rel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bypass_equals_x_times_delta_fp32(kind: str) -> None:
    adapter = KINDS[kind]()
    base = _base_for(adapter)
    x = _rnd(2, 5, IN, seed=12)
    delta = adapter.delta_weight(base)
    assert tuple(delta.shape) == adapter.delta_shape
    assert float(delta.norm()) > 1e-2
    assert _rel_mse(adapter.bypass_delta(x, base), x @ delta.T) < 1e-10


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bypass_matches_merged_weight_per_dtype(kind: str, dtype: torch.dtype) -> None:
    adapter = KINDS[kind]().to(dtype=dtype)
    base = _base_for(adapter).to(dtype)
    x = _rnd(4, IN, seed=13).to(dtype)
    merged = base + merged_delta([adapter], adapter.target_shape, base, dtype=dtype)
    reference = x @ merged.T
    bypass = x @ base.T + bypass_output([adapter], x, adapter.target_shape[0], base)
    assert bypass.dtype == dtype
    assert _rel_mse(bypass, reference) < TOL[dtype]


def test_scales_follow_the_file_conventions() -> None:
    up, down = _rnd(OUT, R, seed=1), _rnd(R, IN, seed=2)
    assert torch.allclose(LoRA(up=up, down=down, alpha=6.0, target_shape=(OUT, IN)).delta_weight(), up @ down * 2)
    assert torch.allclose(LoRA(up=up, down=down, target_shape=(OUT, IN)).delta_weight(), up @ down)
    full = KINDS["lokr_full"]()
    assert full.scale == 1.0 and torch.allclose(full.delta_weight(), torch.kron(full.w1, full.w2))
    factored = KINDS["lokr_factored"]()
    assert factored.scale == pytest.approx(8.0 / 2)


def test_dora_follows_the_weight_decomposition_formula() -> None:
    for kind, dim in (("dora_out", 1), ("dora_in", 0)):
        dora = KINDS[kind]()
        merged = BASE + dora.inner.delta_weight()
        m = dora.magnitude
        expected = merged * m / (merged.norm(dim=dim, keepdim=True) + torch.finfo(torch.float32).eps) - BASE
        assert torch.allclose(dora.delta_weight(BASE), expected, atol=1e-6)
    comfy = KINDS["dora_comfy_norm"]()
    merged = BASE + comfy.inner.delta_weight()
    expected = merged * comfy.magnitude / (BASE.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps) - BASE
    assert torch.allclose(comfy.delta_weight(BASE), expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["dora_out", "set_weight"])
def test_base_dependent_kinds_require_the_base(kind: str) -> None:
    with pytest.raises(ValueError, match="base_weight"):
        KINDS[kind]().delta_weight()


def test_offset_places_rows_in_the_fused_target() -> None:
    q = _lora((3 * OUT, IN), Offset(0, 0, OUT))
    v = _lora((3 * OUT, IN), Offset(0, 2 * OUT, OUT))
    total = merged_delta([q, v], (3 * OUT, IN))
    assert torch.equal(total[OUT:2 * OUT], torch.zeros(OUT, IN))
    assert torch.allclose(total[:OUT], q.delta_weight()) and torch.allclose(total[2 * OUT:], v.delta_weight())
    x = _rnd(3, IN, seed=4)
    assert torch.allclose(bypass_output([q, v], x, 3 * OUT), x @ total.T, atol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "loha", "loha_tucker", "lokr_full", "lokr_tucker", "dora_out", "diff"])
def test_swap_output_halves_swaps_delta_rows(kind: str) -> None:
    adapter = KINDS[kind]()
    base = _base_for(adapter)
    swapped_base = torch.cat(base.chunk(2)[::-1])
    delta = adapter.delta_weight(base)
    assert torch.allclose(adapter.swap_output_halves().delta_weight(swapped_base), torch.cat(delta.chunk(2)[::-1]),
                          atol=1e-5)


@pytest.mark.parametrize("kind", ["loha", "lokr_full", "dora_out", "diff", "set_weight"])
def test_low_rank_approximation_is_the_svd_truncation(kind: str) -> None:
    adapter = KINDS[kind]()
    base = _base_for(adapter)
    delta = adapter.delta_weight(base)
    s = torch.linalg.svdvals(delta)
    lora, err = adapter.low_rank_approximation(2, base_weight=base)
    assert isinstance(lora, LoRA) and lora.rank == 2
    assert err == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)
    assert float((lora.delta_weight() - delta).norm() / delta.norm()) == pytest.approx(err, rel=1e-4)
    exact, zero = adapter.low_rank_approximation(min(OUT, IN), base_weight=base)
    assert zero < 1e-5 and torch.allclose(exact.delta_weight(), delta, atol=1e-5)


def test_bias_and_scale_deltas_act_per_token() -> None:
    bias = WeightDiff(delta=_rnd(OUT, seed=1), target_shape=(OUT,), parameter=BIAS)
    x = _rnd(2, 3, IN, seed=2)
    assert torch.equal(bias.bypass_delta(x), bias.delta.expand(2, 3, OUT))
    gain = SetWeight(value=_rnd(IN, seed=3), target_shape=(IN,), parameter="scale")
    base = _rnd(IN, seed=4)
    assert torch.allclose(gain.bypass_delta(x, base), x * (gain.value - base))


@pytest.mark.parametrize("build, message", [
    (lambda: LoRA(up=_rnd(OUT, 2, seed=1), down=_rnd(3, IN, seed=2), target_shape=(OUT, IN)), "ranks differ"),
    (lambda: LoRA(up=_rnd(OUT, 2, seed=1), down=_rnd(2, IN, seed=2), target_shape=(OUT + 1, IN)), "target rows"),
    (lambda: LoKr(w1=_rnd(3, 2, seed=1), target_shape=(OUT, IN)), "lokr_w2"),
    (lambda: DoRA(inner=_lora(), magnitude=_rnd(5, seed=1)), "dora_scale"),
    (lambda: Offset(1, 0, 4), "dim 0"),
])
def test_malformed_adapters_raise(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fp8_factors_are_held_exactly_in_bf16_and_compute_like_fp32(kind: str, dtype: torch.dtype) -> None:
    """8-bit float factors (fp8 files) are widened to bfloat16 on construction, exactly, so the merged delta and
    the per-token output are the fp32 computation on the very same values (no fp8 arithmetic anywhere)."""
    adapter = KINDS[kind]().to(dtype=dtype)
    held = [adapter, *([adapter.inner] if isinstance(adapter, DoRA) else [])]
    tensors = [v for a in held for v in vars(a).values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors)
    reference = adapter.to(dtype=torch.float32)
    base = _base_for(adapter)
    delta = adapter.delta_weight(base)
    assert _rel_mse(delta, reference.delta_weight(base)) < TOL[torch.bfloat16]
    x = _rnd(2, IN, seed=14)
    assert _rel_mse(adapter.bypass_delta(x, base), x @ reference.delta_weight(base).T) < TOL[torch.bfloat16]


def test_an_fp8_value_survives_the_widening_bit_for_bit() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    for dtype in FP8:
        values = codes.view(dtype).reshape(16, 16)
        diff = WeightDiff(delta=values, target_shape=(16, 16))
        assert diff.delta.dtype == torch.bfloat16
        assert torch.equal(diff.delta.float().nan_to_num(7.0), values.float().nan_to_num(7.0))


def test_a_one_dimensional_weight_delta_is_a_gain() -> None:
    """A LayerNorm's weight is a 1-D gain (CLIP-L ``layer_norm1.diff``): per token it scales the normalised x."""
    gain = WeightDiff(delta=_rnd(IN, seed=5), target_shape=(IN,))
    x = _rnd(2, 3, IN, seed=6)
    assert gain.parameter == "weight" and torch.allclose(gain.bypass_delta(x), x * gain.delta)


def _held_tensors(adapter: object) -> list[torch.Tensor]:
    """Every tensor among an adapter's attributes (nested adapters included)."""
    out = []
    for value in vars(adapter).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif dataclasses.is_dataclass(value):
            out.extend(_held_tensors(value))
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tensors_travel_out_and_back_in(kind):
    """What a ComfyUI weight patch lists as its ``weights`` (and dynamic VRAM copies into a device buffer): every
    tensor of the adapter, a DoRA's inner ones included; rebuilt around copies, the adapter holds exactly them and
    computes the same delta."""
    adapter = KINDS[kind]()
    tensors = adapter_tensors(adapter)
    held = _held_tensors(adapter)
    assert len(tensors) == len(held) and {id(t) for t in tensors} == {id(t) for t in held}
    copies = [t.clone() for t in tensors]
    rebuilt = with_tensors(adapter, iter(copies))
    assert type(rebuilt) is type(adapter) and rebuilt.target_shape == adapter.target_shape
    assert [t.data_ptr() for t in adapter_tensors(rebuilt)] == [t.data_ptr() for t in copies]
    base = _base_for(adapter)
    torch.testing.assert_close(rebuilt.delta_weight(base), adapter.delta_weight(base), rtol=0, atol=0)


def test_merged_delta_lands_on_the_requested_device_and_dtype():
    adapters = [KINDS["lora_slice"](), KINDS["lora_slice"]()]
    total = merged_delta(adapters, (3 * OUT, IN), dtype=torch.float64, device="meta")
    assert total.device.type == "meta" and total.dtype == torch.float64 and tuple(total.shape) == (3 * OUT, IN)
