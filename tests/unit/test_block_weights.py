"""Inspire-style Flux block weights (composition/block_weights.py)."""
from __future__ import annotations

import json

import pytest
from lora_loom.composition.block_weights import (
    FLUX_VECTOR_LENGTH,
    INSPIRE_PRESETS,
    PRESETS,
    BlockRef,
    BlockWeights,
    BlockWeightsError,
    block_of_module,
    parse_block_spec,
    parse_block_vector,
    parse_block_weights,
    preset_names,
)

# Inspire-Pack's resources/lbw-preset.txt vectors (58 values), as users paste them.
INSPIRE_SINGLE_1TO10 = "1," + "0," * 19 + "1," * 10 + ",".join(["0"] * 28)
INSPIRE_SINGLE_31TO37 = "1," + "0," * 19 + "0," * 30 + ",".join(["1"] * 8)


def expanded(weights: BlockWeights) -> list[float]:
    return [weights.base, *weights.double, *weights.single]


def test_vector_of_58_values_maps_base_double_single():
    values = [round(0.01 * i, 2) for i in range(FLUX_VECTOR_LENGTH)]
    weights = parse_block_vector(",".join(str(v) for v in values))
    assert weights.weight_for("other", 0) == 0.0
    assert weights.weight_for("double", 0) == 0.01
    assert weights.weight_for("double", 18) == 0.19
    assert weights.weight_for("single", 0) == 0.2
    assert weights.weight_for("single", 37) == 0.57
    assert parse_block_weights(weights.to_vector()) == weights


def test_named_vector_form_ignores_the_name():
    assert parse_block_weights("MY-PRESET:" + INSPIRE_SINGLE_1TO10) == parse_block_weights(INSPIRE_SINGLE_1TO10)


@pytest.mark.parametrize("spec,expected", [
    ("double3-5=0.5", {("double", 1): 1.0, ("double", 2): 0.5, ("double", 4): 0.5, ("double", 5): 1.0,
                       ("other", 0): 1.0}),
    ("%default=0,base=1,double3-5=0.5,single=1", {("other", 0): 1.0, ("double", 0): 0.0, ("double", 3): 0.5,
                                                  ("single", 20): 1.0}),
    ("default=0.2", {("other", 0): 0.2, ("double", 7): 0.2, ("single", 37): 0.2}),
    ("base=0,double=0.3", {("other", 0): 0.0, ("double", 18): 0.3, ("single", 0): 1.0}),
    ("double=0, double2=1", {("double", 0): 0.0, ("double", 1): 1.0, ("double", 2): 0.0}),
    ("single1-10=0,single38=-0.5", {("single", 0): 0.0, ("single", 9): 0.0, ("single", 10): 1.0,
                                    ("single", 37): -0.5}),
    ("double1=0.7,default=0", {("double", 0): 0.7, ("double", 1): 0.0, ("other", 0): 0.0}),
])
def test_spec_table(spec, expected):
    weights = parse_block_weights(spec)
    for (block_type, index), value in expected.items():
        assert weights.weight_for(block_type, index) == value, (block_type, index)


@pytest.mark.parametrize("name,inspire_vector", [
    ("SINGLE-1TO10", INSPIRE_SINGLE_1TO10),
    ("FLUX-SINGLE-1to10", INSPIRE_SINGLE_1TO10),
    ("SINGLE-31TO38", INSPIRE_SINGLE_31TO37),
    ("flux-single-31to37", INSPIRE_SINGLE_31TO37),
    ("FLUX-SINGLE-ALL", "1," + "0," * 19 + ",".join(["1"] * 38)),
    ("DOUBLE-FRONT7", "1," + "1," * 7 + ",".join(["0"] * 50)),
    ("FLUX-DBL-TAIL6", "1," + "0," * 13 + ",".join(["1"] * 44)),
    ("ALL", ",".join(["1"] * 58)),
    ("NONE", ",".join(["0"] * 58)),
])
def test_presets_match_inspire_vectors(name, inspire_vector):
    assert parse_block_weights(name) == parse_block_vector(inspire_vector)


def test_every_preset_parses_and_names_are_listed():
    assert preset_names() == [*PRESETS, *INSPIRE_PRESETS]
    for name in preset_names():
        weights = parse_block_weights(name)
        assert len(weights.double) == 19 and len(weights.single) == 38
    assert parse_block_weights("DOUBLE-ONLY").weight_for("single", 3) == 0.0
    assert parse_block_weights("SINGLE-ONLY").weight_for("double", 3) == 0.0


@pytest.mark.parametrize("text,expected", [
    ("double1=0.5", [1.0, 0.5, 1.0]),
    ("%single1=0,base=0.3", [0.3, 1.0, 0.0]),
    ("1,0.5,0.25", [1.0, 0.5, 0.25]),
    (",".join(str(i) for i in range(58)), [0.0, 1.0, 20.0]),
    ("DOUBLE-ONLY", [1.0, 1.0, 0.0]),
    ("SINGLE-1TO10", [1.0, 0.0, 1.0]),
])
def test_small_model_with_one_double_and_one_single_block(text, expected):
    assert expanded(parse_block_weights(text, double_blocks=1, single_blocks=1)) == expected


@pytest.mark.parametrize("text,column,reason", [
    ("double2=0", 7, "beyond this model's 1 double blocks"),
    ("default=0,single1-3=1", 19, "beyond this model's 1 single blocks"),
])
def test_small_model_rejects_blocks_it_lacks(text, column, reason):
    with pytest.raises(BlockWeightsError) as caught:
        parse_block_weights(text, double_blocks=1, single_blocks=1)
    assert reason in str(caught.value)
    assert f"column {column}:" in str(caught.value)


@pytest.mark.parametrize("text,column,reason", [
    ("double0-10=0", 7, "1-based"),
    ("double3-25=0.5", 9, "double25 is beyond"),
    ("double5-3=1", 7, "runs backwards"),
    ("in3=1", 1, "SD UNet"),
    ("double3-5=x", 11, "expected a number"),
    ("double3,single=0", 1, "lacks '=value'"),
    ("base=1,,double=0", 8, "empty item"),
    ("1,2,3", 1, "has 3 values"),
    ("1,2,,4", 5, "empty value"),
    ("1,R," + ",".join(["1"] * 56), 3, "random"),
    ("1,A," + ",".join(["1"] * 56), 3, "needs a value for A"),
    ("1,0.5 1," + ",".join(["1"] * 56), 3, "sub-values"),
])
def test_errors_point_at_offending_text(text, column, reason):
    with pytest.raises(BlockWeightsError) as caught:
        parse_block_weights(text)
    message = str(caught.value)
    assert reason in message
    assert f"column {column}:" in message
    lines = message.splitlines()
    assert lines[-2] == "  " + text
    assert lines[-1] == "  " + " " * (column - 1) + "^"


def test_unknown_preset_lists_known_names():
    with pytest.raises(BlockWeightsError, match="unknown block weight preset 'FOO'.*DOUBLE-ONLY"):
        parse_block_weights("FOO")


def test_inspire_letters_use_given_values():
    text = "A,a,B,b," + ",".join(["1"] * 54)
    weights = parse_block_weights(text, a_value=0.8, b_value=0.4)
    assert expanded(weights)[:4] == [0.8, 0.4, 0.4, 0.2]
    assert parse_block_spec("double=a", a_value=0.6).weight_for("double", 5) == 0.3


@pytest.mark.parametrize("name,block", [
    ("double_blocks.3.img_attn.qkv", BlockRef("double", 3)),
    ("diffusion_model.double_blocks.18.txt_mod.lin.weight", BlockRef("double", 18)),
    ("single_blocks.10.linear1", BlockRef("single", 10)),
    ("single_blocks.0.modulation.lin", BlockRef("single", 0)),
    ("img_in", BlockRef("other", 0)),
    ("final_layer.adaLN_modulation.1", BlockRef("other", 0)),
    ("time_in.in_layer", BlockRef("other", 0)),
])
def test_block_of_module(name, block):
    assert block_of_module(name) == block


@pytest.mark.parametrize("call,reason", [
    (lambda: block_of_module("double_blocks.x.img_attn.qkv"), "no block index"),
    (lambda: block_of_module(""), "empty"),
    (lambda: BlockWeights.uniform(1.0).weight_for("middle", 0), "not one of"),
    (lambda: BlockWeights.uniform(1.0).weight_for("double", 19), "outside these block weights"),
    (lambda: BlockWeights.uniform(1.0, 1, 1).weight_for("single", 1), "outside these block weights"),
    (lambda: BlockWeights(float("inf"), (), ()), "finite"),
    (lambda: BlockWeights.from_dict({"base": 1, "double": []}), "'single'"),
])
def test_lookup_errors(call, reason):
    with pytest.raises(BlockWeightsError, match=reason):
        call()


def test_dict_round_trip_through_json():
    weights = parse_block_weights("default=0.5,base=1,double2-4=0,single37=2")
    assert BlockWeights.from_dict(json.loads(json.dumps(weights.to_dict()))) == weights
