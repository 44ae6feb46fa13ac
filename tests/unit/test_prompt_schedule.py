"""A1111 / prompt-control schedule import (composition/prompt_schedule.py)."""
from __future__ import annotations

import pytest
from lora_loom.composition.block_weights import parse_block_weights
from lora_loom.composition.gates import GateSchedule, Keyframe
from lora_loom.composition.prompt_schedule import (
    LoraTag,
    PromptSyntaxError,
    parse_prompt_schedule,
)


@pytest.mark.parametrize("prompt,segments", [
    ("a cat", [(0.0, 1.0, "a cat")]),
    ("a [red:blue:0.3] cat", [(0.0, 0.3, "a red cat"), (0.3, 1.0, "a blue cat")]),
    ("a [large::0.1] cat", [(0.0, 0.1, "a large cat"), (0.1, 1.0, "a cat")]),
    ("a [cat:0.5]", [(0.0, 0.5, "a"), (0.5, 1.0, "a cat")]),
    ("a [red:[blue::0.7]:0.5] cat", [(0.0, 0.5, "a red cat"), (0.5, 0.7, "a blue cat"), (0.7, 1.0, "a cat")]),
    ("[a:b:c:0.3,0.7]", [(0.0, 0.3, "a"), (0.3, 0.7, "b"), (0.7, 1.0, "c")]),
    ("x [b:0.1,0.4]", [(0.0, 0.1, "x"), (0.1, 0.4, "x b"), (0.4, 1.0, "x")]),
    ("x [b:c:0.1,0.4]", [(0.0, 0.1, "x"), (0.1, 0.4, "x b"), (0.4, 1.0, "x c")]),
    ("[a:b:c:0.6]", [(0.0, 0.6, "a"), (0.6, 1.0, "b")]),
    ("[SEQ:a:0.3:b:0.6] x", [(0.0, 0.3, "a x"), (0.3, 0.6, "b x"), (0.6, 1.0, "x")]),
    ("[cat|dog:0.25]", [(0.0, 0.25, "cat"), (0.25, 0.5, "dog"), (0.5, 0.75, "cat"), (0.75, 1.0, "dog")]),
    ("[(cat:1.2):dog:0.5]", [(0.0, 0.5, "(cat:1.2)"), (0.5, 1.0, "dog")]),
    ("a [word] b", [(0.0, 1.0, "a [word] b")]),
    (r"time 12\:30 [a\:b:c:0.5]", [(0.0, 0.5, "time 12:30 a:b"), (0.5, 1.0, "time 12:30 c")]),
    ("style: anime, a <3 heart", [(0.0, 1.0, "style: anime, a <3 heart")]),
    ("[a:b:0] [c:d:1]", [(0.0, 1.0, "b c")]),
])
def test_text_segments(prompt, segments):
    schedule = parse_prompt_schedule(prompt)
    assert [(s.start, s.end, s.text) for s in schedule.segments] == segments


def test_alternation_defaults_to_every_tenth():
    schedule = parse_prompt_schedule("[cat|dog]")
    assert len(schedule.segments) == 10
    assert [schedule.text_at(p) for p in (0.0, 0.1, 0.35, 0.99)] == ["cat", "dog", "dog", "dog"]
    assert schedule.text_at(0.2) == "cat"


@pytest.mark.parametrize("prompt,gates", [
    ("a cat <lora:style:0.8>", {"style": [(0.0, 0.8)]}),
    ("[<lora:x:1>::0.5] a cat", {"x": [(0.0, 1.0), (0.5, 0.0)]}),
    ("[<lora:x:1>:0.3] a cat", {"x": [(0.0, 0.0), (0.3, 1.0)]}),
    ("<lora:full:1> [<lora:part:0.5>::0.5]", {"full": [(0.0, 1.0)], "part": [(0.0, 0.5), (0.5, 0.0)]}),
    ("[<lora:x:1>:<lora:x:0.25>:0.4]", {"x": [(0.0, 1.0), (0.4, 0.25)]}),
    ("[a [<lora:y:2>:0.2,0.6]::0.8]", {"y": [(0.0, 0.0), (0.2, 2.0), (0.6, 0.0)]}),
    ("[<lora:a:1>|<lora:b:1>:0.5]", {"a": [(0.0, 1.0), (0.5, 0.0)], "b": [(0.0, 0.0), (0.5, 1.0)]}),
    ("<lora:sub dir/my lora:-0.5>", {"sub dir/my lora": [(0.0, -0.5)]}),
])
def test_lora_gate_schedules(prompt, gates):
    schedule = parse_prompt_schedule(prompt)
    built = schedule.gate_schedules()
    assert [g.adapter for g in built] == list(gates)
    for gate in built:
        assert gate.interpolation == "hold"
        assert [(k.progress, k.value) for k in gate.keyframes] == gates[gate.adapter]
    assert "<lora" not in "".join(segment.text for segment in schedule.segments)


@pytest.mark.parametrize("prompt,tag", [
    ("<lora:x:0.8>", LoraTag("x", 0.8, 0.8)),
    ("<lora:x:0.8:0.5>", LoraTag("x", 0.8, 0.5)),
    ("<lora:x>", LoraTag("x", 1.0, 1.0)),
    ("<lora: x : 0.7 : -1 >", LoraTag("x", 0.7, -1.0)),
])
def test_model_and_clip_strengths(prompt, tag):
    assert parse_prompt_schedule(prompt).segments[0].loras == (tag,)


def test_step_numbers_with_num_steps():
    schedule = parse_prompt_schedule("[a:b:10] [<lora:x:1>::15]", num_steps=20)
    assert [(s.start, s.text) for s in schedule.segments] == [(0.0, "a"), (0.5, "b"), (0.75, "b")]
    assert schedule.gate_schedules()[0].keyframes == (Keyframe(0.0, 1.0), Keyframe(0.75, 0.0))


def test_gate_schedules_take_block_weights_and_round_trip():
    blocks = parse_block_weights("SINGLE-ONLY")
    for gate in parse_prompt_schedule("[<lora:x:1>:0.3] <lora:y:0.5>").gate_schedules(blocks):
        assert gate.blocks == blocks
        assert GateSchedule.from_json(gate.to_json()) == gate


@pytest.mark.parametrize("prompt,column,reason", [
    ("a [b:c", 3, "unclosed '['"),
    ("a (b c", 3, "unclosed '('"),
    ("x ] y", 3, "unmatched ']'"),
    ("[a:(b]:0.5]", 6, "unmatched ']'"),
    ("a <lora:x:1:2:3> b", 15, "at most two strengths"),
    ("a <lora:x:1", 3, "unclosed '<lora:'"),
    ("<lora::1>", 7, "needs a name"),
    ("<lora:x:zz>", 9, "expected a lora strength"),
    ("[a:b:TAG]", 6, "tag selection"),
    ("[a:b:c]", 6, "switch point"),
    ("[a:b:5]", 6, "needs num_steps"),
    ("[a:b:1.5]", 6, "outside 0.0..1.0"),
    ("[a:b:0.7,0.2]", 6, "must not decrease"),
    ("[a:b:c:d:0.5]", 8, "at most three prompts"),
    ("[a:b|c]", 3, "alternation"),
    ("[SEQ:a:0.3:b]", 12, "sequence"),
    ("<lora:x:1> [<lora:x:0.5>:0.5]", 13, "active twice"),
])
def test_errors_show_caret_and_column(prompt, column, reason):
    with pytest.raises(PromptSyntaxError) as caught:
        parse_prompt_schedule(prompt)
    error = caught.value
    assert reason in str(error)
    assert error.position == column - 1
    lines = str(error).splitlines()
    assert lines[-3].endswith(f"column {column}:")
    assert lines[-2] == "  " + prompt
    assert lines[-1] == "  " + " " * (column - 1) + "^"


def test_multiline_error_names_line():
    with pytest.raises(PromptSyntaxError) as caught:
        parse_prompt_schedule("first line\nsecond [a:b")
    assert "line 2, column 8:" in str(caught.value)
    assert str(caught.value).splitlines()[-2:] == ["  second [a:b", "         ^"]
