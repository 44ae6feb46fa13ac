"""The queue-time checks of every Loom node (``nodes/checks.py``) on the real V3 schemas: defaults pass, and a
NaN, an out-of-range number, an unknown combo value and an oversized text are each refused naming the input."""
from __future__ import annotations

import importlib
import math

import pytest
from comfy_api.latest import io

nodes = importlib.import_module("lora_loom.nodes")
checks = importlib.import_module("lora_loom.nodes.checks")
NODES = nodes.node_list()


def defaults(node: type) -> dict[str, object]:
    return {spec.id: spec.default for spec in node.define_schema().inputs
            if getattr(spec, "default", None) is not None}


@pytest.mark.parametrize("node", NODES, ids=[n.__name__ for n in NODES])
def test_every_node_validates_and_accepts_its_defaults(node: type) -> None:
    assert issubclass(node, checks.LoomNode)
    assert node.validate_inputs(**defaults(node)) is True


def _first(kind: type, predicate=lambda spec: True) -> list[tuple[type, object]]:
    return [(node, spec) for node in NODES for spec in node.define_schema().inputs
            if isinstance(spec, kind) and predicate(spec)]


@pytest.mark.parametrize("node, spec", _first(io.Float.Input),
                         ids=lambda v: getattr(v, "id", getattr(v, "__name__", "")))
def test_float_inputs_refuse_nan_and_out_of_range(node: type, spec) -> None:
    for bad, message in ((math.nan, "must be a finite number"), (math.inf, "must be a finite number"),
                         ((spec.max or 0) + 1e6, "above its maximum"), ((spec.min or 0) - 1e6, "below its minimum")):
        if "maximum" in message and spec.max is None or "minimum" in message and spec.min is None:
            continue
        answer = node.validate_inputs(**{**defaults(node), spec.id: bad})
        assert isinstance(answer, str) and f"input {spec.id!r}" in answer and message in answer, answer


def test_int_combo_and_text_inputs() -> None:
    from lora_loom.nodes.library import LoomLibrarySearch
    from lora_loom.nodes.lora_stack import LoomLoraStack

    base = defaults(LoomLibrarySearch)
    assert "above its maximum 50" in LoomLibrarySearch.validate_inputs(**{**base, "top_k": 51})
    assert "must be a number" in LoomLibrarySearch.validate_inputs(**{**base, "top_k": True})
    assert "is 'evil', not one of" in LoomLoraStack.validate_inputs(**{**defaults(LoomLoraStack), "mode": "evil"})
    too_long = "x" * (checks.MAX_TEXT_CHARS + 1)
    assert "characters long" in LoomLibrarySearch.validate_inputs(**{**base, "prompt": too_long})
    assert LoomLibrarySearch.validate_inputs(**{**base, "prompt": None}) is True  # a linked input: checked later
