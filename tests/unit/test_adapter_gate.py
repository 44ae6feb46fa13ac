"""Gates attached to stack rows: keyframe text, name matching, attachment rules, the gate book."""
from __future__ import annotations

import pytest
from lora_loom.composition.adapter_gate import (
    AdapterGate,
    GateBook,
    attach_gates,
    lora_name_matches,
    parse_keyframes,
    schedule_samples,
)
from lora_loom.composition.adapters import AdapterSet
from lora_loom.composition.block_weights import parse_block_weights
from lora_loom.composition.gates import GateError, GateSchedule, Keyframe
from lora_loom.composition.stack import StackEntry, StackRow


@pytest.mark.parametrize("text,frames", [
    ("0:1, 0.5:0.2", ((0.0, 1.0), (0.5, 0.2))),
    ("0.7", ((0.0, 0.7),)),
    (" 0:0 ; 0.5:1 ; 0.5:0.3 ", ((0.0, 0.0), (0.5, 1.0), (0.5, 0.3))),
    ("1:-0.5", ((1.0, -0.5),)),
])
def test_keyframes_parse(text, frames):
    assert parse_keyframes(text) == tuple(Keyframe(p, v) for p, v in frames)


@pytest.mark.parametrize("text,column,reason", [
    ("0:1, 0.5:x", 10, "not a number"),
    ("0:1, 1.5:0", 6, "outside [0, 1]"),
    ("0.5:1, 0.2:0", 8, "comes before"),
    ("0:1,, 1:0", 5, "empty keyframe"),
    ("0:1, 0.4", 6, "progress:value"),
    ("", 1, "empty"),
])
def test_keyframe_errors_point_at_the_character(text, column, reason):
    with pytest.raises(GateError) as error:
        parse_keyframes(text)
    message = str(error.value)
    assert reason in message and f"column {column}" in message
    assert message.splitlines()[-1].index("^") - 2 == column - 1


@pytest.mark.parametrize("gate,row,matches", [
    ("", "anything.safetensors", True),
    ("style", "style.safetensors", True),
    ("style", "flux/style.safetensors", True),
    ("flux/style", "flux\\style.safetensors", True),
    ("style.safetensors", "flux/style.safetensors", True),
    ("styl", "style.safetensors", False),
    ("other/style", "flux/style.safetensors", False),
])
def test_lora_names_match_rows(gate, row, matches):
    assert lora_name_matches(gate, row) is matches


def _entry(name: str) -> StackEntry:
    return StackEntry(StackRow(lora=name), AdapterSet(source=name, format="test", adapters={}), name)


def test_named_gates_win_over_unnamed_and_attach_by_name():
    entries = [_entry("a.safetensors"), _entry("dir/b.safetensors"), _entry("c.safetensors")]
    every = AdapterGate(schedule=GateSchedule.constant("", 0.5))
    only_b = AdapterGate(lora="b", schedule=GateSchedule.constant("b", 0.1))
    attached = attach_gates(entries, [every, only_b])
    assert [e.gate.schedule.keyframes[0].value for e in attached] == [0.5, 0.1, 0.5]
    assert attached[1].gate.lora == "dir/b.safetensors"
    assert attach_gates(entries, None) == tuple(entries) and entries[0].gate is None


@pytest.mark.parametrize("gates,message", [
    ([AdapterGate(lora="missing", schedule=GateSchedule.constant("missing", 1.0))], "matches no row"),
    ([AdapterGate(lora="a", schedule=GateSchedule.constant("a", 1.0)),
      AdapterGate(lora="a.safetensors", schedule=GateSchedule.constant("a", 0.5))], "gets 2 schedule gates"),
    ([AdapterGate(schedule=GateSchedule.constant("", 1.0)), AdapterGate(schedule=GateSchedule.constant("", 2.0))],
     "without a LoRA name"),
])
def test_attachment_errors(gates, message):
    with pytest.raises(GateError, match=message):
        attach_gates([_entry("a.safetensors"), _entry("b.safetensors")], gates)


def test_gate_book_values_and_curves():
    blocks = parse_block_weights("default=1,double=0.5", 2, 2)
    book = GateBook((None, GateSchedule("a", (Keyframe(0.0, 1.0), Keyframe(1.0, 0.0)), "linear", blocks),
                     GateSchedule.window("b", 1.0, 0.5, 1.0)))
    assert book.values("double", 1, 0.25) == (1.0, 0.375, 0.0)
    assert book.values("single", 0, 0.75) == (1.0, 0.25, 1.0)
    assert book.curves(0.25) == (1.0, 0.75, 0.0)
    assert len(book) == 3


def test_schedule_samples_per_step():
    schedule = GateSchedule("a", parse_keyframes("0:1, 0.5:0"), "hold")
    assert schedule_samples(schedule, 4) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(GateError):
        schedule_samples(schedule, 0)
