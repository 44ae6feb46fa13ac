"""Per-block weights for Flux adapters, in Inspire-Pack's "LoRA Block Weight" vocabulary.

A Flux block vector has 58 values: 1 base + 19 double-stream + 38 single-stream blocks. The base value
applies to every layer outside the blocks (``img_in``, ``txt_in``, ``time_in``, ``vector_in``,
``guidance_in``, ``final_layer``). Three ways to write one, all accepted by :func:`parse_block_weights`:

* a vector ``1,0,0.5,...`` (58 values; Inspire's ``NAME:values`` form is accepted and the name ignored),
* a spec ``%default=0,base=1,double3-5=0.5,single=1`` (the leading ``%`` is optional),
* a preset name from :data:`PRESETS` or one of Inspire's Flux preset names in :data:`INSPIRE_PRESETS`.

Spec block numbers are **1-based, as in Inspire-Pack**: ``double1`` is ``double_blocks.0`` and
``single38`` is ``single_blocks.37``. ``default=`` sets every block (and the base unless ``base=`` is
given); it and ``base=`` apply first wherever they are written, the other items apply left to right.

Models with fewer blocks (test models with 1 double + 1 single block): a spec naming a block the model
lacks is an error; a full 58-value vector or a preset is truncated to the model's blocks (the values for
missing blocks are dropped), as is a vector of exactly ``1 + doubles + singles`` values accepted as is.

Unlike Inspire, values are mapped by block index, never by the order of the blocks a LoRA happens to
contain (Inspire's behaviour that confuses users, its issue #165), and a short vector is an error instead
of carrying its last value onto the remaining blocks.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from .numbers import STRENGTH_LIMIT, checked_number

logger = logging.getLogger(__name__)

FLUX_DOUBLE_BLOCKS = 19
FLUX_SINGLE_BLOCKS = 38
FLUX_VECTOR_LENGTH = 1 + FLUX_DOUBLE_BLOCKS + FLUX_SINGLE_BLOCKS
BLOCK_TYPES = ("double", "single", "other")

# Our presets, written as specs so they read as what they do. The base stays 1 as in Inspire's presets.
PRESETS: dict[str, str] = {
    "ALL": "default=1",
    "NONE": "default=0",
    "DOUBLE-ONLY": "base=1,double=1,single=0",
    "SINGLE-ONLY": "base=1,double=0,single=1",
    "DOUBLE-FRONT7": "default=0,base=1,double1-7=1",
    "DOUBLE-MID6": "default=0,base=1,double8-13=1",
    "DOUBLE-TAIL6": "default=0,base=1,double14-19=1",
    "SINGLE-1TO10": "default=0,base=1,single1-10=1",
    "SINGLE-11TO20": "default=0,base=1,single11-20=1",
    "SINGLE-21TO30": "default=0,base=1,single21-30=1",
    "SINGLE-31TO38": "default=0,base=1,single31-38=1",
}

# Inspire-Pack's Flux preset names (resources/lbw-preset.txt), as the vector each one has in effect on a
# LoRA with all 57 blocks. Its 20-value FLUX-DBL-* vectors carry their last value onto the single blocks,
# so FLUX-DBL-ALL means ALL and FLUX-DBL-TAIL6 also enables every single block. Inspire's
# "FLUX-SINGLE-31to37" covers 8 blocks, single31..single38.
INSPIRE_PRESETS: dict[str, str] = {
    "FLUX-ALL": PRESETS["ALL"],
    "FLUX-DBL-ALL": PRESETS["ALL"],
    "FLUX-DBL-FRONT7": PRESETS["DOUBLE-FRONT7"],
    "FLUX-DBL-MID6": PRESETS["DOUBLE-MID6"],
    "FLUX-DBL-TAIL6": "default=0,base=1,double14-19=1,single=1",
    "FLUX-SINGLE-ALL": PRESETS["SINGLE-ONLY"],
    "FLUX-SINGLE-1TO10": PRESETS["SINGLE-1TO10"],
    "FLUX-SINGLE-11TO20": PRESETS["SINGLE-11TO20"],
    "FLUX-SINGLE-21TO30": PRESETS["SINGLE-21TO30"],
    "FLUX-SINGLE-31TO37": PRESETS["SINGLE-31TO38"],
}

_SPEC_ITEM = re.compile(r"^(?P<kind>[A-Za-z]+)(?:(?P<first>\d+)(?:-(?P<last>\d+))?)?$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class BlockWeightsError(ValueError):
    """A block vector, spec or preset that cannot be read; the message points at the offending text."""


def point_at(text: str, position: int) -> str:
    """Show ``text`` (the line holding ``position``) with a caret under character ``position`` (0-based)."""
    line_start = text.rfind("\n", 0, position) + 1
    line_end = text.find("\n", position)
    line = text[line_start:] if line_end < 0 else text[line_start:line_end]
    column = position - line_start
    where = f"column {column + 1}"
    if "\n" in text:
        where = f"line {text.count(chr(10), 0, position) + 1}, {where}"
    return f"{where}:\n  {line}\n  {' ' * column}^"


def _fail(reason: str, text: str, position: int) -> BlockWeightsError:
    return BlockWeightsError(f"{reason} at {point_at(text, position)}")


@dataclass(frozen=True)
class BlockRef:
    """Which block a module belongs to: ``block_type`` in ("double", "single", "other"); index 0 for other."""

    block_type: str
    index: int


@dataclass(frozen=True)
class BlockWeights:
    """One weight per Flux block: ``base`` for layers outside the blocks, then one per double/single block."""

    base: float
    double: tuple[float, ...]
    single: tuple[float, ...]

    def __post_init__(self) -> None:
        for value in (self.base, *self.double, *self.single):
            checked_number(value, "a block weight", error=BlockWeightsError)

    @classmethod
    def uniform(cls, value: float = 1.0, double_blocks: int = FLUX_DOUBLE_BLOCKS,
                single_blocks: int = FLUX_SINGLE_BLOCKS) -> BlockWeights:
        """The same weight everywhere (``uniform(1.0)`` leaves an adapter untouched)."""
        return cls(float(value), (float(value),) * double_blocks, (float(value),) * single_blocks)

    def weight_for(self, block_type: str, index: int) -> float:
        """The weight of block ``index`` of ``block_type`` ("double", "single"; "other" gives the base)."""
        if block_type == "double":
            values = self.double
        elif block_type == "single":
            values = self.single
        elif block_type == "other":
            return self.base
        else:
            raise BlockWeightsError(f"block type {block_type!r} is not one of {BLOCK_TYPES}")
        if not 0 <= index < len(values):
            raise BlockWeightsError(
                f"{block_type}_blocks.{index} is outside these block weights ({len(values)} {block_type} blocks)")
        return values[index]

    def truncated(self, double_blocks: int, single_blocks: int) -> BlockWeights:
        """Keep the first ``double_blocks`` / ``single_blocks`` values (for models with fewer blocks)."""
        if double_blocks > len(self.double) or single_blocks > len(self.single):
            raise BlockWeightsError(
                f"cannot widen block weights of {len(self.double)}+{len(self.single)} blocks "
                f"to {double_blocks}+{single_blocks}")
        return BlockWeights(self.base, self.double[:double_blocks], self.single[:single_blocks])

    def to_vector(self) -> str:
        """Inspire's comma-separated form: base, doubles, singles."""
        return ",".join(f"{value:g}" for value in (self.base, *self.double, *self.single))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"base": self.base, "double": list(self.double), "single": list(self.single)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockWeights:
        """Inverse of :meth:`to_dict`; names the missing field on error."""
        for field in ("base", "double", "single"):
            if field not in data:
                raise BlockWeightsError(f"block weights dict lacks the field {field!r}: {data!r}")
        return cls(float(data["base"]), tuple(float(v) for v in data["double"]),
                   tuple(float(v) for v in data["single"]))


def block_of_module(name: str) -> BlockRef:
    """Map a canonical ComfyUI Flux module name to its block.

    ``double_blocks.3.img_attn.qkv`` -> double 3, ``single_blocks.10.linear1`` -> single 10, ``img_in`` ->
    other. A ``diffusion_model.`` prefix and a ``.weight``/``.bias`` suffix are accepted.
    """
    if not name:
        raise BlockWeightsError("empty module name")
    parts = name.removeprefix("diffusion_model.").split(".")
    if parts[0] in ("double_blocks", "single_blocks"):
        if len(parts) < 2 or not parts[1].isdigit():
            raise BlockWeightsError(f"module name {name!r} has no block index after {parts[0]!r}")
        return BlockRef(parts[0].removesuffix("_blocks"), int(parts[1]))
    return BlockRef("other", 0)


def _value(token: str, text: str, position: int, a_value: float | None, b_value: float | None) -> float:
    """Read one vector/spec value: a number, or Inspire's A, a (A/2), B, b (B/2)."""
    letters = {"A": a_value, "a": None if a_value is None else a_value / 2,
               "B": b_value, "b": None if b_value is None else b_value / 2}
    if token in letters:
        if letters[token] is None:
            raise _fail(f"'{token}' needs a value for {token.upper()} (pass {token.lower()}_value)", text, position)
        return float(letters[token])
    if token == "R":
        raise _fail("random 'R' weights are not supported (they make workflows irreproducible)", text, position)
    if " " in token:
        raise _fail("space-separated sub-values (LyCORIS per-layer ratios) are not supported", text, position)
    if not _NUMBER.match(token):
        raise _fail(f"expected a number, got {token!r}", text, position)
    value = float(token)
    if not math.isfinite(value) or abs(value) > STRENGTH_LIMIT:
        raise _fail(f"block weight {token} is outside [-{STRENGTH_LIMIT:g}, {STRENGTH_LIMIT:g}]", text, position)
    return value


def _items(text: str, start: int) -> list[tuple[str, int]]:
    """Split ``text[start:]`` on commas into stripped items with the position of their first character."""
    items = []
    position = start
    for raw in text[start:].split(","):
        stripped = raw.strip()
        items.append((stripped, position + (len(raw) - len(raw.lstrip())) if stripped else position))
        position += len(raw) + 1
    return items


def parse_block_vector(text: str, double_blocks: int = FLUX_DOUBLE_BLOCKS, single_blocks: int = FLUX_SINGLE_BLOCKS,
                       a_value: float | None = None, b_value: float | None = None) -> BlockWeights:
    """Read a comma-separated vector (``NAME:`` prefix allowed) of 58 values or ``1 + doubles + singles``."""
    start = text.index(":") + 1 if ":" in text else 0
    values: list[float] = []
    for token, position in _items(text, start):
        if not token:
            raise _fail("empty value in block vector", text, position)
        values.append(_value(token, text, position, a_value, b_value))
    model_length = 1 + double_blocks + single_blocks
    if len(values) == model_length:
        return BlockWeights(values[0], tuple(values[1:1 + double_blocks]), tuple(values[1 + double_blocks:]))
    if (len(values) == FLUX_VECTOR_LENGTH and double_blocks <= FLUX_DOUBLE_BLOCKS
            and single_blocks <= FLUX_SINGLE_BLOCKS):
        logger.debug("truncating a 58-value Flux block vector to %d double + %d single blocks",
                     double_blocks, single_blocks)
        full = BlockWeights(values[0], tuple(values[1:20]), tuple(values[20:]))
        return full.truncated(double_blocks, single_blocks)
    expected = f"{FLUX_VECTOR_LENGTH} (Flux: 1 base + 19 double + 38 single)"
    if model_length != FLUX_VECTOR_LENGTH:
        expected += f" or {model_length} (this model: 1 base + {double_blocks} double + {single_blocks} single)"
    raise _fail(f"block vector has {len(values)} values; expected {expected}. Inspire's shorter vectors carry"
                " their last value onto the remaining blocks; write a spec such as 'single=0' instead", text, start)


def parse_block_spec(text: str, double_blocks: int = FLUX_DOUBLE_BLOCKS, single_blocks: int = FLUX_SINGLE_BLOCKS,
                     a_value: float | None = None, b_value: float | None = None) -> BlockWeights:
    """Read Inspire's spec syntax (``%default=0,base=1,double3-5=0.5,single=1``); numbering is 1-based."""
    start = 1 if text.startswith("%") else 0
    counts = {"double": double_blocks, "single": single_blocks}
    default, base = 1.0, None
    assignments: list[tuple[str, int, int, float]] = []
    for item, position in _items(text, start):
        if not item:
            raise _fail("empty item in block spec", text, position)
        if "=" not in item:
            raise _fail(f"spec item {item!r} lacks '=value'", text, position)
        target, _, raw_value = item.partition("=")
        target = target.strip()
        value_position = position + item.index("=") + 1 + (len(raw_value) - len(raw_value.lstrip()))
        value = _value(raw_value.strip(), text, value_position, a_value, b_value)
        if target == "default":
            default = value
            continue
        if target == "base":
            base = value
            continue
        match = _SPEC_ITEM.match(target)
        if match is None or match["kind"] not in counts:
            known = "in/out/mid name SD UNet blocks; " if match and match["kind"] in ("in", "out", "mid") else ""
            raise _fail(f"unknown block {target!r} ({known}Flux specs use default, base, doubleN, singleN)",
                        text, position)
        kind = match["kind"]
        number_position = position + len(kind)
        if match["first"] is None:
            assignments.append((kind, 0, counts[kind], value))
            continue
        first = int(match["first"])
        last = int(match["last"]) if match["last"] is not None else first
        if first == 0:
            raise _fail(f"block numbers are 1-based as in Inspire-Pack ({kind}1 = {kind}_blocks.0); "
                        f"'{kind}0' names no block", text, number_position)
        if last < first:
            raise _fail(f"range {first}-{last} runs backwards", text, number_position)
        if last > counts[kind]:
            bad = number_position if first > counts[kind] else position + target.index("-") + 1
            raise _fail(f"{kind}{last} is beyond this model's {counts[kind]} {kind} blocks", text, bad)
        assignments.append((kind, first - 1, last, value))
    values = {"double": [default] * double_blocks, "single": [default] * single_blocks}
    for kind, begin, end, value in assignments:
        values[kind][begin:end] = [value] * (end - begin)
    return BlockWeights(default if base is None else base, tuple(values["double"]), tuple(values["single"]))


def preset_names() -> list[str]:
    """Every preset name :func:`parse_block_weights` accepts: ours first, then Inspire's Flux names."""
    return [*PRESETS, *INSPIRE_PRESETS]


def parse_block_weights(text: str, double_blocks: int = FLUX_DOUBLE_BLOCKS, single_blocks: int = FLUX_SINGLE_BLOCKS,
                        a_value: float | None = None, b_value: float | None = None) -> BlockWeights:
    """Read a preset name, a spec or a vector (see the module docstring); empty text means ALL."""
    stripped = text.strip()
    if not stripped:
        return BlockWeights.uniform(1.0, double_blocks, single_blocks)
    upper = stripped.upper()
    preset = PRESETS.get(upper, INSPIRE_PRESETS.get(upper))
    if preset is not None:
        full = parse_block_spec(preset, FLUX_DOUBLE_BLOCKS, FLUX_SINGLE_BLOCKS)
        if double_blocks > FLUX_DOUBLE_BLOCKS or single_blocks > FLUX_SINGLE_BLOCKS:
            raise BlockWeightsError(f"preset {stripped!r} is written for Flux's 19+38 blocks, "
                                    f"not {double_blocks}+{single_blocks}")
        return full.truncated(double_blocks, single_blocks)
    if stripped.startswith("%") or "=" in stripped:
        return parse_block_spec(stripped, double_blocks, single_blocks, a_value, b_value)
    if "," not in stripped and ":" not in stripped and not _NUMBER.match(stripped):
        raise BlockWeightsError(f"unknown block weight preset {stripped!r}; known: {', '.join(preset_names())}")
    return parse_block_vector(stripped, double_blocks, single_blocks, a_value, b_value)
