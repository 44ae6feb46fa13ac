"""Gate schedules, sigma -> percent, LoRA Switch and LoRA Composite (composition/gates.py)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from lora_loom.composition.block_weights import parse_block_weights
from lora_loom.composition.gates import (
    GateError,
    GateSchedule,
    Keyframe,
    LoRAComposite,
    LoRASwitch,
    composite_average,
    flow_sigma_to_percent,
    flux_percent_to_sigma,
    flux_sigma_to_percent,
    gate_values,
    sigma_to_percent,
    step_of_sigma,
)


def comfy_flux_percent_to_sigma(shift: float):
    """ComfyUI's ModelSamplingFlux.percent_to_sigma, written out here independently of the module."""
    def percent_to_sigma(percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        t = 1.0 - percent
        return math.exp(shift) / (math.exp(shift) + (1 / t - 1) ** 1.0)
    return percent_to_sigma


def comfy_flow_percent_to_sigma(shift: float):
    """ComfyUI's ModelSamplingDiscreteFlow.percent_to_sigma (time_snr_shift)."""
    def percent_to_sigma(percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        t = 1.0 - percent
        return shift * t / (1 + (shift - 1) * t)
    return percent_to_sigma


def comfy_edm_percent_to_sigma(percent: float, sigma_min: float = 0.002, sigma_max: float = 120.0) -> float:
    """ComfyUI's ModelSamplingContinuousEDM.percent_to_sigma (log-linear, sentinel at 0)."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    percent = 1.0 - percent
    return math.exp((math.log(sigma_max) - math.log(sigma_min)) * percent + math.log(sigma_min))


# (percent, sigma at Flux shift 1.15, at Flux shift 0.5, at discrete-flow shift 3.0), computed with 40-digit
# decimal arithmetic from ComfyUI's forward formulas.
REFERENCE = [
    (0.05, 0.983608079752217, 0.969064865669533, 0.982758620689655),
    (0.10, 0.966013833401798, 0.936862673820813, 0.964285714285714),
    (0.25, 0.904530766738640, 0.831824343963580, 0.900000000000000),
    (0.30, 0.880513078598525, 0.793687510324513, 0.875000000000000),
    (0.50, 0.759510916949111, 0.622459331201855, 0.750000000000000),
    (0.70, 0.575102944049881, 0.414037835902632, 0.562500000000000),
    (0.90, 0.259758414194331, 0.154828098960255, 0.250000000000000),
    (0.99, 0.030914729594734, 0.016380946025790, 0.029411764705882),
]


@pytest.mark.parametrize("percent,flux115,flux05,flow3", REFERENCE)
def test_sigma_to_percent_matches_reference_table(percent, flux115, flux05, flow3):
    assert flux_percent_to_sigma(percent, 1.15) == pytest.approx(flux115, abs=1e-13)
    assert flux_sigma_to_percent(flux115, 1.15) == pytest.approx(percent, abs=1e-9)
    assert flux_sigma_to_percent(flux05, 0.5) == pytest.approx(percent, abs=1e-9)
    assert flow_sigma_to_percent(flow3, 3.0) == pytest.approx(percent, abs=1e-9)
    assert sigma_to_percent(flux115, comfy_flux_percent_to_sigma(1.15)) == pytest.approx(percent, abs=1e-9)
    assert sigma_to_percent(flux05, comfy_flux_percent_to_sigma(0.5)) == pytest.approx(percent, abs=1e-9)
    assert sigma_to_percent(flow3, comfy_flow_percent_to_sigma(3.0)) == pytest.approx(percent, abs=1e-9)


@pytest.mark.parametrize("percent", [0.001, 0.2, 0.5, 0.77, 0.999])
def test_bisection_inverts_log_linear_schedule_with_sentinel(percent):
    assert sigma_to_percent(comfy_edm_percent_to_sigma(percent), comfy_edm_percent_to_sigma) == pytest.approx(
        percent, abs=1e-9)


@pytest.mark.parametrize("sigma,expected", [(1.5, 0.0), (1.0, 0.0), (0.0, 1.0), (-0.1, 1.0)])
def test_sigma_outside_schedule_clamps(sigma, expected):
    assert sigma_to_percent(sigma, comfy_flux_percent_to_sigma(1.15)) == pytest.approx(expected, abs=1e-12)
    assert flux_sigma_to_percent(sigma, 1.15) == expected


# Keyframes (0, 0), (0.3, 1), (0.7, 0.25) at the reference sigmas (Flux shift 1.15): expected curve values.
GATE_TABLE = [
    (0.983608079752217, 0.166666666667, 0.066987298108, 0.0),
    (0.966013833401798, 0.333333333333, 0.250000000000, 0.0),
    (0.904530766738640, 0.833333333333, 0.933012701892, 0.0),
    (0.880513078598525, 1.000000000000, 1.000000000000, 1.0),
    (0.759510916949111, 0.625000000000, 0.625000000000, 1.0),
    (0.575102944049881, 0.250000000000, 0.250000000000, 0.25),
    (0.259758414194331, 0.250000000000, 0.250000000000, 0.25),
]
FRAMES = (Keyframe(0.0, 0.0), Keyframe(0.3, 1.0), Keyframe(0.7, 0.25))


@pytest.mark.parametrize("sigma,linear,cosine,hold", GATE_TABLE)
def test_schedule_values_at_sigmas_match_reference(sigma, linear, cosine, hold):
    blocks = parse_block_weights("default=1,double2=0.5,single=0.2")
    progress = sigma_to_percent(sigma, comfy_flux_percent_to_sigma(1.15))
    for interpolation, expected in (("linear", linear), ("cosine", cosine), ("hold", hold)):
        schedule = GateSchedule("a", FRAMES, interpolation, blocks)
        assert schedule.value("double", 0, progress) == pytest.approx(expected, abs=1e-9)
        assert schedule.value("double", 1, progress) == pytest.approx(0.5 * expected, abs=1e-9)
        assert schedule.value("single", 7, progress) == pytest.approx(0.2 * expected, abs=1e-9)
        assert schedule.value("other", 0, progress) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("percent", [0.1, 0.3, 0.5, 0.9])
def test_hold_switches_exactly_when_comfyui_would(percent):
    schedule = GateSchedule("a", (Keyframe(0.0, 0.0), Keyframe(percent, 1.0)))
    at = flux_percent_to_sigma(percent)
    just_before = at + 1e-6
    for to_percent in (lambda s: flux_sigma_to_percent(s), lambda s: sigma_to_percent(s, flux_percent_to_sigma)):
        assert schedule.curve(to_percent(at)) == 1.0
        assert schedule.curve(to_percent(just_before)) == 0.0


@pytest.mark.parametrize("schedule,block,progress", [
    (GateSchedule.constant("a", 0.0), ("double", 0), 0.5),
    (GateSchedule.constant("a", -0.7, parse_block_weights("double1=0")), ("double", 0), 0.5),
    (GateSchedule("a", (Keyframe(0.0, -1.0), Keyframe(0.5, 0.0)), "linear"), ("single", 0), 0.5),
    (GateSchedule("a", (Keyframe(0.0, 0.0), Keyframe(1.0, 0.0)), "cosine"), ("single", 0), 0.4),
    (GateSchedule.window("a", 0.8, 0.2, 0.6), ("double", 0), 0.1),
    (GateSchedule.window("a", 0.8, 0.2, 0.6), ("double", 0), 0.6),
    (GateSchedule.constant("a", 1.0, parse_block_weights("NONE")), ("other", 0), 0.0),
])
def test_gate_zero_is_exactly_positive_zero(schedule, block, progress):
    value = gate_values([schedule], block[0], block[1], progress)[0]
    assert value == 0.0 and math.copysign(1.0, value) == 1.0 and type(value) is float


def test_gate_values_keeps_adapter_order():
    schedules = [GateSchedule.constant("a", 0.5), GateSchedule.window("b", 1.0, 0.5), GateSchedule.constant("c", 2.0)]
    assert gate_values(schedules, "double", 0, 0.25) == [0.5, 0.0, 2.0]
    assert gate_values(schedules, "double", 0, 0.75) == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("schedule", [
    GateSchedule.constant("style", 0.8),
    GateSchedule("face", FRAMES, "cosine", parse_block_weights("DOUBLE-ONLY")),
    GateSchedule("tiny", FRAMES, "linear", parse_block_weights("1,0.5,0.25", 1, 1)),
])
def test_json_round_trip(schedule):
    text = schedule.to_json()
    assert json.loads(text)["adapter"] == schedule.adapter
    assert GateSchedule.from_json(text) == schedule
    assert GateSchedule.from_dict(json.loads(text)).value("double", 0, 0.4) == schedule.value("double", 0, 0.4)


@pytest.mark.parametrize("build,message", [
    (lambda: GateSchedule("a", ()), "no keyframes"),
    (lambda: GateSchedule("a", (Keyframe(0.5, 1), Keyframe(0.2, 0))), "sort keyframes"),
    (lambda: GateSchedule("a", (Keyframe(1.5, 1),)), "progress in [0, 1]"),
    (lambda: GateSchedule("a", (Keyframe(0.0, math.nan),)), "finite value"),
    (lambda: GateSchedule("a", interpolation="smooth"), "interpolation"),
    (lambda: GateSchedule.from_dict({"adapter": "a"}), "'keyframes'"),
    (lambda: GateSchedule.from_dict({"adapter": "a", "keyframes": [{"value": 1}]}), "'progress'"),
    (lambda: GateSchedule.window("a", 1.0, 0.6, 0.2), "start <= end"),
    (lambda: LoRASwitch(0), "adapters >= 1"),
    (lambda: LoRAComposite(0), "at least one"),
])
def test_invalid_descriptions_raise(build, message):
    with pytest.raises(GateError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build()


@pytest.mark.parametrize("adapters,every,step,active", [
    (2, 5, 0, 0), (2, 5, 4, 0), (2, 5, 5, 1), (2, 5, 10, 0), (3, 1, 4, 1), (3, 2, 5, 2), (1, 5, 99, 0),
])
def test_lora_switch_table(adapters, every, step, active):
    switch = LoRASwitch(adapters, every)
    assert switch.active_adapter(step) == active
    gates = switch.gates_at(step)
    assert gates[active] == 1.0 and sum(gates) == 1.0 and len(gates) == adapters


def test_lora_switch_is_round_robin_every_k_steps():
    switch = LoRASwitch(3, 4)
    actives = [switch.active_adapter(step) for step in range(24)]
    assert actives == [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4 + [1] * 4 + [2] * 4


def test_lora_composite_averages_one_pass_per_adapter():
    composite = LoRAComposite(3)
    assert composite.pass_gates() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    generator = torch.Generator().manual_seed(0)
    predictions = [torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3)]
    torch.testing.assert_close(composite_average(predictions), (predictions[0] + predictions[1] + predictions[2]) / 3)
    with pytest.raises(GateError, match="shape"):
        composite_average([predictions[0], predictions[1][:, :2]])


@pytest.mark.parametrize("sigma,step", [(1.0, 0), (0.76, 2), (0.5, 3), (0.0, 5)])
def test_step_of_sigma(sigma, step):
    assert step_of_sigma(sigma, [1.0, 0.9, 0.76, 0.52, 0.2, 0.0]) == step
