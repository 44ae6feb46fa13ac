"""Adapter key spellings, grouping of a file's keys by module, and building adapters from raw parts.

Every spelling found in the wild maps to one part name: ``up``/``down``/``mid`` (LoRA: ``lora_up``/``lora_down``,
``lora_B``/``lora_A`` (+ ``.default``), ``lora.up``/``lora.down``, ``.up``/``.down``, ``_lora.up``,
``lora_linear_layer.up``), ``up_bias`` (``lora_B.bias``: a bias delta), ``hada_*``, ``lokr_*``, ``dora_scale``
(kohya / LyCORIS DoRA, ``[out, 1]`` or ``[1, in]``), ``magnitude`` (PEFT DoRA's ``lora_magnitude_vector``, always
``[out]``), ``diff``, ``diff_b``, ``set_weight``, ``alpha`` (also stored after ``lora_A``:
``...to_k.lora_A.weight.alpha``, as in files diffusers' Flux tests follow). Converters name the module; this
file turns the parts into adapters. Missing alpha means scale 1 (PEFT, ai-toolkit, XLabs, DiffSynth; kohya
without alpha = rank) unless the registry finds it in ``lora_adapter_metadata`` (see ``peft_metadata``).
Keys of adapter kinds we cannot apply (OFT/BOFT, GLoRA, IA3) are recognised so the error names the kind.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..adapters import BIAS, WEIGHT, DoRA, LoHa, LoKr, LoRA, Offset, SetWeight, WeightDiff
from ..adapters.adapter_set import Adapter
from .names import Placement

logger = logging.getLogger(__name__)

_SPELLINGS: dict[str, str] = {
    ".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_mid.weight": "mid",
    ".lora_B.default.weight": "up", ".lora_A.default.weight": "down",
    ".lora_B.weight": "up", ".lora_A.weight": "down", ".lora_B.bias": "up_bias",
    ".lora.up.weight": "up", ".lora.down.weight": "down", "_lora.up.weight": "up", "_lora.down.weight": "down",
    ".lora_linear_layer.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    ".up.weight": "up", ".down.weight": "down",
    **{f".hada_{p}": f"hada_{p}" for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{p}": f"lokr_{p}" for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    ".dora_scale": "dora_scale", ".diff": "diff", ".diff_b": "diff_b", ".set_weight": "set_weight",
    ".alpha": "alpha", ".lora_A.weight.alpha": "alpha",
    **{f".lora_magnitude_vector{tail}": "magnitude" for tail in ("", ".weight", ".default", ".default.weight")},
    # Kinds ComfyUI core reads that we do not apply: recognised only to name them in the error.
    ".oft_blocks": "unsupported:OFT", ".oft_diag": "unsupported:OFT", ".rescale": "unsupported:OFT",
    ".oft_R.weight": "unsupported:OFT", ".oft_r": "unsupported:OFT",
    **{f".{p}.weight": "unsupported:GLoRA" for p in ("a1", "a2", "b1", "b2")},
    ".on_input": "unsupported:IA3",
}
# Longest first so ".lora.up.weight" wins over ".up.weight".
SUFFIXES: tuple[tuple[str, str], ...] = tuple(sorted(_SPELLINGS.items(), key=lambda kv: -len(kv[0])))


def split_key(key: str) -> tuple[str, str] | None:
    """``(module prefix, part name)`` for an adapter key, or None when no known spelling ends it."""
    for suffix, part in SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part
    return None


@dataclass(frozen=True)
class RawAdapterParts:
    """The tensors of one source module, placed on one canonical module.

    ``tensors``: part name -> tensor; ``keys``: the file keys they came from (for errors and provenance);
    ``source``: the module as the file names it (``transformer.transformer_blocks.0.attn.to_q``).
    """

    placement: Placement
    tensors: dict[str, torch.Tensor]
    keys: tuple[str, ...]
    extra: dict[str, int] = field(default_factory=dict)
    source: str = ""


def group_by_prefix(keys: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group adapter keys by module prefix: ``{prefix: {part: key}}`` and the keys with no known spelling (or
    a second spelling of a part the module already has, e.g. both ``.alpha`` and ``.lora_A.weight.alpha``)."""
    groups: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in keys:
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        prefix, part = split
        parts = groups.setdefault(prefix, {})
        if part in parts:
            unknown.append(key)
        else:
            parts[part] = key
    return groups, unknown


Converted = dict[str, list[RawAdapterParts]]


def convert_with(state_dict: dict[str, torch.Tensor], place: Callable[[str], list[Placement] | None]
                 ) -> tuple[Converted, list[str]]:
    """Pop every key whose module ``place`` recognises; return the placed parts and the untouched keys."""
    groups, unknown = group_by_prefix(list(state_dict))
    out: Converted = {}
    leftovers = list(unknown)
    for prefix, part_keys in groups.items():
        placements = place(prefix)
        if not placements:
            leftovers.extend(part_keys.values())
            continue
        tensors = {part: state_dict.pop(key) for part, key in part_keys.items()}
        for placement in placements:
            out.setdefault(placement.name, []).append(
                RawAdapterParts(placement=placement, tensors=tensors, keys=tuple(part_keys.values()), source=prefix))
    return out, leftovers


def merge_converted(into: Converted, more: Converted) -> Converted:
    """Append ``more``'s parts to ``into`` (in place) and return it."""
    for name, parts in more.items():
        into.setdefault(name, []).extend(parts)
    return into


@dataclass(frozen=True)
class Geometry:
    """Flux widths seen in a file: ``hidden`` (H) and the single block's ``mlp_hidden`` (M, default 4H)."""

    hidden: int | None = None
    mlp_hidden: int | None = None


def _rows_and_cols(t: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(rows written, in)`` of a part set, from whichever factors it has."""
    if "up" in t or "down" in t:
        if "up" not in t or "down" not in t:
            raise ValueError("LoRA has only one of up/down")
        return int(t["up"].shape[0]), int(t["down"].shape[-1])
    if "hada_w1_a" in t:
        rows = t["hada_w1_a"].shape[1] if "hada_t1" in t else t["hada_w1_a"].shape[0]
        return int(rows), int(t["hada_w1_b"].shape[1])
    if any(k.startswith("lokr_") for k in t):
        w1 = t.get("lokr_w1")
        a1, a2 = (w1.shape if w1 is not None else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]))
        if "lokr_w2" in t:
            b1, b2 = t["lokr_w2"].shape
        elif "lokr_t2" in t:
            b1, b2 = t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1]
        else:
            b1, b2 = t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1]
        return int(a1 * b1), int(a2 * b2)
    for k in ("diff", "set_weight"):
        if k in t:
            shape = t[k].shape
            return int(shape[0]), int(shape[1]) if len(shape) > 1 else 0
    if "up_bias" in t:
        return int(t["up_bias"].shape[0]), 0
    if "diff_b" in t:
        return int(t["diff_b"].shape[0]), 0
    raise KeyError("no weight-bearing part")


def infer_geometry(converted: Converted) -> Geometry:
    """Read H from any fused-qkv / linear1 slice or Flux-named module, M from a proj_mlp slice or full linear1."""
    hidden = mlp = None
    for name, parts in converted.items():
        for p in parts:
            try:
                rows, cols = _rows_and_cols(p.tensors)
            except (KeyError, ValueError):
                continue
            if cols and (p.placement.slot is not None or name.endswith(("attn.proj", "linear1", "attn.qkv"))):
                hidden = hidden or cols
            elif not cols and p.placement.slot in ("q", "k", "v", "lq", "lk", "lv"):
                hidden = hidden or rows
            if p.placement.slot == "lmlp":
                mlp = rows
            elif name.endswith("linear1") and p.placement.slot is None and cols:
                mlp = mlp or rows - 3 * cols
    return Geometry(hidden=hidden, mlp_hidden=mlp)


def _offset(placement: Placement, rows: int, cols: int, geometry: Geometry) -> tuple[Offset | None, int]:
    """``(offset, full target rows)`` for a slot; H is the input width of the slice itself."""
    slot = placement.slot
    if slot is None:
        return None, rows
    hidden = cols or geometry.hidden or (rows if slot in ("q", "k", "v", "lq", "lk", "lv") else None)
    if hidden is None:
        raise ValueError(f"cannot place slot {slot!r} without knowing the hidden size")
    mlp = geometry.mlp_hidden or 4 * hidden
    if slot in ("q", "k", "v"):
        return Offset(0, "qkv".index(slot) * hidden, rows), 3 * hidden
    if slot in ("lq", "lk", "lv"):
        return Offset(0, "qkv".index(slot[1]) * hidden, rows), 3 * hidden + mlp
    if slot == "lmlp":
        return Offset(0, 3 * hidden, rows), 3 * hidden + rows
    if slot == "lqkv":
        return Offset(0, 0, rows), 3 * hidden + mlp
    raise ValueError(f"unknown slot {slot!r}")


def _alpha(t: dict[str, torch.Tensor]) -> float | None:
    a = t.get("alpha")
    return None if a is None else float(a.reshape(-1)[0])


def _weight_adapter(t: dict[str, torch.Tensor], shape: tuple[int, ...], offset: Offset | None) -> Adapter | None:
    """The weight adapter of a part set (LoRA / LoHa / LoKr / diff / set_weight), DoRA-wrapped if it has a
    magnitude (``dora_scale`` as stored, PEFT's ``lora_magnitude_vector`` on the output axis)."""
    alpha = _alpha(t)
    inner: Adapter | None = None
    if "up" in t or "down" in t:
        if "up" not in t or "down" not in t:
            raise ValueError("LoRA has only one of up/down")
        inner = LoRA(up=t["up"], down=t["down"], mid=t.get("mid"), alpha=alpha, target_shape=shape, offset=offset)
    elif any(k.startswith("hada_") for k in t):
        missing = [k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if k not in t]
        if missing:
            raise ValueError(f"LoHa is missing {missing}")
        inner = LoHa(w1_a=t["hada_w1_a"], w1_b=t["hada_w1_b"], w2_a=t["hada_w2_a"], w2_b=t["hada_w2_b"],
                     t1=t.get("hada_t1"), t2=t.get("hada_t2"), alpha=alpha, target_shape=shape, offset=offset)
    elif any(k.startswith("lokr_") for k in t):
        inner = LoKr(w1=t.get("lokr_w1"), w1_a=t.get("lokr_w1_a"), w1_b=t.get("lokr_w1_b"), w2=t.get("lokr_w2"),
                     w2_a=t.get("lokr_w2_a"), w2_b=t.get("lokr_w2_b"), t2=t.get("lokr_t2"), alpha=alpha,
                     target_shape=shape, offset=offset)
    elif "diff" in t:
        return WeightDiff(delta=t["diff"], target_shape=shape, offset=offset)
    elif "set_weight" in t:
        return SetWeight(value=t["set_weight"], target_shape=shape, offset=offset)
    if inner is None:
        return None
    if "dora_scale" in t and "magnitude" in t:
        raise ValueError("both dora_scale and lora_magnitude_vector: two DoRA magnitudes for one module")
    if "magnitude" in t:
        rows = inner.delta_shape[0]
        if t["magnitude"].numel() != rows:
            raise ValueError(f"lora_magnitude_vector has {t['magnitude'].numel()} values, the module writes "
                             f"{rows} rows (PEFT's DoRA magnitude is one value per output row)")
        return DoRA(inner=inner, magnitude=t["magnitude"].reshape(rows, 1))
    if "dora_scale" in t:
        return DoRA(inner=inner, magnitude=t["dora_scale"])
    return inner


def _vector_adapters(t: dict[str, torch.Tensor], rows: int, offset: Offset | None, parameter: str) -> list[Adapter]:
    """1-D ``set_weight`` / ``diff`` parts: a norm gain (``scale``, or a LayerNorm's 1-D ``weight``) or a bias."""
    return [(SetWeight if part == "set_weight" else WeightDiff)(t[part], target_shape=(rows,), offset=offset,
                                                                parameter=parameter)
            for part in ("set_weight", "diff") if part in t]


def build_adapters(parts: RawAdapterParts, geometry: Geometry, file_name: str) -> list[Adapter]:
    """Adapters for one placed part set (a weight adapter and/or a bias delta); raises naming file and keys."""
    t, placement = parts.tensors, parts.placement
    what = f"{file_name}: {placement.name} (keys {', '.join(parts.keys)})"
    unsupported = sorted({p.split(":", 1)[1] for p in t if p.startswith("unsupported:")})
    if unsupported:
        raise ValueError(f"{what}: {'/'.join(unsupported)} adapters are not supported by LoRA Loom (ComfyUI core "
                         f"applies them; this file cannot be loaded here)")
    try:
        rows, cols = _rows_and_cols(t)
        offset, full_rows = _offset(placement, rows, cols, geometry)
        adapters: list[Adapter] = []
        if not cols:
            adapters += _vector_adapters(t, full_rows, offset, placement.parameter)
        elif placement.parameter == WEIGHT:
            weight = _weight_adapter(t, (full_rows, cols), offset)
            if weight is not None:
                adapters.append(weight)
        if placement.parameter == WEIGHT:
            for part in ("diff_b", "up_bias"):
                if part in t:
                    adapters.append(WeightDiff(delta=t[part], target_shape=(full_rows,), offset=offset,
                                               parameter=BIAS))
    except (ValueError, KeyError, RuntimeError, IndexError) as err:
        raise ValueError(f"{what}: {err}") from err
    if not adapters:
        raise ValueError(f"{what}: no adapter could be built from parts {sorted(t)}")
    if ("dora_scale" in t or "magnitude" in t) and not any(isinstance(a, DoRA) for a in adapters):
        raise ValueError(f"{what}: a DoRA magnitude without a LoRA/LoHa/LoKr to wrap")
    if placement.swap_halves:
        adapters = [a.swap_output_halves() for a in adapters]
    return adapters
