"""Check an AdapterSet against a model's parameter shapes before anything is patched.

``model_shapes`` maps canonical module names to WEIGHT shapes (``"double_blocks.0.img_attn.qkv": (9216, 3072)``)
and, for other parameters, ``"<module>.bias"`` / ``"<module>.scale"`` to 1-D shapes. ``"<module>.weight"`` is
accepted as an alias of the module name.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from ..adapters import WEIGHT, AdapterSet
from ..adapters.adapter_set import Adapter

logger = logging.getLogger(__name__)


class ShapeMismatchError(ValueError):
    """An adapter does not fit the model parameter it targets."""


def _model_shape(model_shapes: Mapping[str, tuple[int, ...]], module: str, parameter: str) -> tuple[int, ...] | None:
    keys = (module, f"{module}.weight") if parameter == WEIGHT else (f"{module}.{parameter}",)
    for key in keys:
        if key in model_shapes:
            return tuple(model_shapes[key])
    return None


def _fits(adapter: Adapter, shape: tuple[int, ...], widened: tuple[int, ...] | None) -> bool:
    target = tuple(adapter.target_shape)
    if adapter.offset is not None:
        return adapter.offset.stop <= shape[0] and target[1:] == shape[1:]
    if target == shape:
        return True
    return widened is not None and target == tuple(widened) and target[0] == shape[0] and target[1] >= shape[1]


def shape_problems(adapter_set: AdapterSet, model_shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """One message per adapter that does not fit (or targets a module the model lacks)."""
    problems: list[str] = []
    for module, adapters in sorted(adapter_set.adapters.items()):
        for a in adapters:
            shape = _model_shape(model_shapes, module, a.parameter)
            param = module if a.parameter == WEIGHT else f"{module}.{a.parameter}"
            keys = ", ".join(adapter_set.source_keys.get(module, ())[:2])
            where = f" (file keys {keys})" if keys else ""
            if shape is None:
                problems.append(f"{param}{where}: the model has no such parameter")
                continue
            if not _fits(a, shape, adapter_set.widened_inputs.get(module)):
                rows = "" if a.offset is None else f" rows {a.offset.start}:{a.offset.stop} of"
                problems.append(f"{param}{where}: adapter{rows} shape {tuple(a.target_shape)} "
                                f"vs model shape {shape}")
    return problems


def check_shapes(adapter_set: AdapterSet, model_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise :class:`ShapeMismatchError` naming the file, each key and both shapes when anything misfits."""
    problems = shape_problems(adapter_set, model_shapes)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ShapeMismatchError(f"{adapter_set.source}: {'; '.join(problems[:5])}{more}")
