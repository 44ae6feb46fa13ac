"""The per-token runtime without ComfyUI: groups and gates numbered across chained controllers, a call running the
chain (several passes, changed calls) with the states combined for the layers, states kept for a backward, the
attention chain's order, and a wrapped Linear as a view of the live module."""
from __future__ import annotations

import types

import torch
from lora_loom.composition.adapter_gate import AdapterGate
from lora_loom.composition.adapters import AdapterSet, LoRA
from lora_loom.composition.gates import GateSchedule, Keyframe
from lora_loom.composition.runtime.core import Call, Controller, Runtime, RuntimeAttention, TokenState
from lora_loom.composition.runtime.layers import LoomLinear, wrap_linear
from lora_loom.composition.stack import StackEntry, StackRow

MODULE = "double_blocks.0.img_attn.qkv"
WIDTH = 8


def entry(seed: int, strength: float = 1.0, schedule: GateSchedule | None = None) -> StackEntry:
    gen = torch.Generator().manual_seed(seed)
    lora = LoRA(up=torch.randn(3 * WIDTH, 2, generator=gen), down=torch.randn(2, WIDTH, generator=gen),
                target_shape=(3 * WIDTH, WIDTH), alpha=2.0)
    adapters = AdapterSet(source=f"l{seed}", format="test", adapters={MODULE: (lora,)})
    gate = None if schedule is None else AdapterGate(lora=f"l{seed}", schedule=schedule)
    return StackEntry(StackRow(lora=f"l{seed}", strength=strength), adapters, f"l{seed}", gate=gate)


class Painter(Controller):
    """Fixed token weights ``[1, L, groups]`` per stream; ``passes`` passes whose predictions are summed, each seeing
    the call's ``x`` scaled by its pass number + 1."""

    name = "painter"

    def __init__(self, entries, weights: torch.Tensor, passes: int = 1):
        super().__init__(entries)
        self.weights, self.passes = weights, passes

    def state(self, call: Call) -> TokenState:
        return TokenState({"img": self.weights, "txt": self.weights, "joint": self.weights},
                          frozenset(range(self.groups)), call.percent)

    def run(self, call, inner):
        return sum(inner(call.changed(x=call.x * (n + 1)), self.state(call)) for n in range(self.passes))


class Executor:
    """What ComfyUI's wrapper executor is to the runtime: ``class_obj.model_sampling`` and the model call, which
    records what the layers would read."""

    def __init__(self, record: list, runtime: Runtime):
        self.record, self.runtime = record, runtime
        self.class_obj = types.SimpleNamespace(model_sampling=types.SimpleNamespace(percent_to_sigma=lambda p: 1 - p))

    def __call__(self, x, t, c_concat, context, control, options, **kwargs):
        runtime = self.runtime
        self.record.append((x.clone(), runtime.stream_weights("img"), runtime.active_groups(),
                            runtime.adapter_gates("double", 0)))
        return x


def test_groups_and_gates_are_numbered_across_chained_controllers():
    half = GateSchedule("l2", (Keyframe(0.0, 1.0), Keyframe(0.5, 0.0)))
    first = Painter([[entry(1)], [entry(2, 0.5, half)]], torch.ones(1, 1, 2))
    second = Painter([[entry(3, 2.0, GateSchedule.constant("l3", 0.25))]], torch.ones(1, 1, 1))
    runtime = Runtime([first], 1, 1).extended(second, 1, 1)
    assert runtime.controllers == (first, second) and runtime.group_offsets == [0, 2] and runtime.gates == 2
    slots = runtime.slots[MODULE]
    assert [(s.group, s.gate, s.strength) for s in slots] == [(0, -1, 1.0), (1, 0, 0.5), (2, 1, 2.0)]


def test_a_call_runs_the_chain_and_the_layers_read_every_controller():
    half = GateSchedule("l2", (Keyframe(0.0, 1.0), Keyframe(0.5, 0.0)))
    outer = Painter([[entry(1)], [entry(2, 1.0, half)]], torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), passes=2)
    inner = Painter([[entry(3, 1.0, GateSchedule.constant("l3", 0.25))]], torch.full((1, 1, 1), 0.5))
    runtime = Runtime([outer, inner], 1, 1)
    record: list = []
    x = torch.ones(1, 1, 2, 2)
    out = runtime.apply_model(Executor(record, runtime), x, torch.full((1,), 0.75))  # percent 0.25
    assert torch.equal(out, 3 * x) and len(record) == 2  # two outer passes, each through the inner controller
    assert [float(r[0].max()) for r in record] == [1.0, 2.0]
    weights, active, gates = record[0][1:]
    assert torch.equal(weights, torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]]))  # [1, L=2, 2 + 1 groups]
    assert active == {0, 1, 2} and gates == (1.0, 0.25)
    assert runtime.current is None and runtime.stream_weights("img") is None and runtime.adapter_gates("double", 0) \
        is None
    runtime.apply_model(Executor(record, runtime), x, torch.full((1,), 0.25))  # percent 0.75: l2's gate closed
    assert record[-1][3] == (0.0, 0.25)


def test_states_are_kept_for_a_backward_only_inside_kept():
    runtime = Runtime([Painter([[entry(1)]], torch.ones(1, 1, 1))], 1, 1)
    record: list = []
    with runtime.kept():
        runtime.apply_model(Executor(record, runtime), torch.ones(1, 1, 2, 2), torch.full((1,), 0.5))
        assert runtime.current is not None and runtime.active_groups() == {0}
    assert runtime.current is None


def test_attention_runs_outermost_controller_first_then_the_previous_override():
    seen = []

    class Watching(Painter):
        def attend(self, state, downstream, q, k, v, heads, **kwargs):
            seen.append(self.name)
            return downstream.call(q, k, v, heads, **kwargs) + 1

    first, second = Watching([[entry(1)]], torch.ones(1, 1, 1)), Watching([[entry(2)]], torch.ones(1, 1, 1))
    first.name, second.name = "first", "second"
    runtime = Runtime([first, second], 1, 1)

    def previous(func, q, k, v, heads, **kwargs):
        seen.append("previous")
        return func(q, k, v, heads, **kwargs) * 10

    override = RuntimeAttention(runtime, previous)

    def func(q, k, v, heads, **kwargs):
        return q

    q = torch.ones(1)
    assert torch.equal(override(func, q, q, q, 1), q * 10) and seen == ["previous"]  # outside a call
    seen.clear()
    runtime.current = (first.state(Call(q, q, None, None, None, {}, {}, None, 0.0)),) * 2
    assert torch.equal(override(func, q, q, q, 1), q * 10 + 2) and seen == ["first", "second", "previous"]


def test_wrapped_linear_is_a_view_of_the_live_module_and_is_re_viewed_not_nested():
    linear = torch.nn.Linear(WIDTH, 3 * WIDTH)
    gated = entry(2, 0.5, GateSchedule.constant("l2", 0.5))
    runtime = Runtime([Painter([[entry(1)], [gated]], torch.tensor([[[1.0, 0.0], [0.5, 1.0]]]))], 1, 1)
    layer = wrap_linear(linear, MODULE, runtime.slots[MODULE], runtime)
    assert isinstance(layer, LoomLinear) and isinstance(layer, torch.nn.Linear) and layer.__dict__ is linear.__dict__
    x = torch.randn(1, 2, WIDTH, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer(x), linear(x))  # outside a call: the base layer
    runtime.current = (runtime.controllers[0].state(Call(x, x, None, None, None, {}, {}, None, 0.0)),)
    try:
        out = layer(x)
    finally:
        runtime.current = None
    (a,), (b,) = entry(1).adapter_set.adapters[MODULE], gated.adapter_set.adapters[MODULE]
    weights = torch.tensor([[[1.0, 0.0], [0.5, 1.0]]])
    expected = linear(x) + weights[..., :1] * a.bypass_delta(x) + weights[..., 1:] * 0.5 * 0.5 * b.bypass_delta(x)
    assert torch.allclose(out, expected, atol=1e-5)
    again = wrap_linear(layer, MODULE, runtime.slots[MODULE], runtime)
    assert type(again) is type(layer) and again.__dict__ is linear.__dict__
    linear.weight = torch.nn.Parameter(linear.weight.detach() * 2)  # ComfyUI swaps a weight: every view sees it
    assert again.weight is linear.weight and layer.weight is linear.weight
    assert not any(name.startswith("loom_") for name in vars(linear))
