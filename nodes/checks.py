"""What a workflow gives a Loom node is checked when the prompt is queued, before anything runs.

Every node of the pack derives from :class:`LoomNode`, whose ``validate_inputs`` ComfyUI calls with the
node's constant inputs. ComfyUI's own checks let NaN through (``nan < min`` is False) and, on 0.3.75, do not
check V3 combos at all; and a node that defines ``validate_inputs`` turns ComfyUI's range checks off. So the
checks here are complete: every number finite and within the widget's min/max, every combo value one of its
options, every text bounded. The answer names the node, the input and the value; the prompt is refused with
HTTP 400 and nothing runs. Numbers inside text inputs (stack rows, keyframes, block weights) are checked by
their parsers, which name the row and field.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from comfy_api.latest import io

MAX_TEXT_CHARS = 1_000_000


def input_problem(inputs: Sequence[Any], values: Mapping[str, Any]) -> str | None:
    """The first problem with ``values`` (input id -> constant; ``None`` for linked inputs) against the
    schema ``inputs``, or ``None`` when all are acceptable."""
    for spec in inputs:
        value = values.get(spec.id)
        if value is None:
            continue
        if isinstance(spec, (io.Float.Input, io.Int.Input)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"input {spec.id!r} must be a number, got {value!r}"[:300]
            if isinstance(value, float) and not math.isfinite(value):
                return f"input {spec.id!r} must be a finite number, got {value!r}"
            if spec.min is not None and value < spec.min:
                return f"input {spec.id!r} is {value:g}, below its minimum {spec.min:g}"
            if spec.max is not None and value > spec.max:
                return f"input {spec.id!r} is {value:g}, above its maximum {spec.max:g}"
        elif isinstance(spec, io.Combo.Input):
            if value not in (spec.options or ()):
                shown = spec.options if len(spec.options or ()) <= 20 else f"{len(spec.options)} choices"
                return f"input {spec.id!r} is {str(value)[:200]!r}, not one of {shown}"
        elif isinstance(spec, io.String.Input):
            if not isinstance(value, str):
                return f"input {spec.id!r} must be text, got {type(value).__name__}"
            if len(value) > MAX_TEXT_CHARS:
                return f"input {spec.id!r} is {len(value)} characters long (at most {MAX_TEXT_CHARS})"
    return None


class LoomNode(io.ComfyNode):
    """Base of every Loom node: :func:`input_problem` runs when a prompt is queued."""

    @classmethod
    def validate_inputs(cls, **values: Any) -> bool | str:
        schema = cls.define_schema()
        problem = input_problem(schema.inputs, values)
        return True if problem is None else f"{schema.display_name or schema.node_id}: {problem}"
