"""LoRA scales kept only in the header: diffusers' ``lora_adapter_metadata`` (PEFT ``LoraConfig`` per component).

diffusers' ``save_lora_weights`` (its Flux training scripts, SimpleTuner) writes no ``.alpha`` tensors; the scale
lives in the header as JSON of each component's ``LoraConfig.to_dict()`` with the component as prefix:
``{"transformer.r": 4, "transformer.lora_alpha": 16, "transformer.alpha_pattern": {...},
"transformer.rank_pattern": {...}, "transformer.use_rslora": false, "text_encoder.r": ...}``
(``diffusers/loaders/lora_base.py``: ``_pack_dict_with_prefix`` + ``LORA_ADAPTER_METADATA_KEY``). diffusers
loads it with ``LoraConfig(**metadata)``, so PEFT's rules apply per module: ``r`` and ``lora_alpha`` from the
first ``rank_pattern`` / ``alpha_pattern`` key matching ``(.*\\.)?(key)$`` against the module's path inside the
component (``peft/utils/other.py: get_pattern_key``), else the defaults; scale ``alpha / r``, or
``alpha / sqrt(r)`` with ``use_rslora`` (``peft/tuners/lora/layer.py: update_layer``).
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ...files.json_text import parse_json

logger = logging.getLogger(__name__)

LORA_ADAPTER_METADATA = "lora_adapter_metadata"


@dataclass(frozen=True)
class ComponentConfig:
    """The PEFT LoRA settings of one component (``transformer``, ``text_encoder``, ...)."""

    component: str
    r: int
    lora_alpha: float
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    use_rslora: bool = False

    def scale(self, module: str) -> tuple[float, float, int, str]:
        """``(scale, alpha, r, where)`` for ``module`` (its path inside the component); ``where`` names the field."""
        alpha, r, where = self.lora_alpha, self.r, f"{self.component}.lora_alpha"
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha, where = float(value), f"{self.component}.alpha_pattern[{pattern!r}]"
                break
        for pattern, value in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                r = int(value)
                break
        scale = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        return scale, alpha, r, where + (" with use_rslora" if self.use_rslora else "")


def _number(raw: object, file_name: str, field_name: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw <= 0:
        raise ValueError(f"{file_name}: metadata '{LORA_ADAPTER_METADATA}' field {field_name!r} is {raw!r}, "
                         "not a positive number")
    return float(raw)


def _pattern(raw: object, file_name: str, field_name: str) -> dict[str, float]:
    if raw in (None, ""):
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{file_name}: metadata '{LORA_ADAPTER_METADATA}' field {field_name!r} is not an object")
    return {str(k): _number(v, file_name, f"{field_name}[{k!r}]") for k, v in raw.items()}


def read_component_configs(metadata: Mapping[str, str], file_name: str) -> dict[str, ComponentConfig]:
    """Each component's config from ``lora_adapter_metadata`` ({} when absent); raises naming the file and the
    field when the JSON or a value is malformed."""
    raw = metadata.get(LORA_ADAPTER_METADATA)
    if not raw:
        return {}
    packed = parse_json(raw, f"{file_name}: metadata '{LORA_ADAPTER_METADATA}'")
    if not isinstance(packed, dict):
        raise ValueError(f"{file_name}: metadata '{LORA_ADAPTER_METADATA}' is not a JSON object")
    by_component: dict[str, dict[str, object]] = {}
    for key, value in packed.items():
        component, _, name = str(key).partition(".")
        if name:
            by_component.setdefault(component, {})[name] = value
    configs: dict[str, ComponentConfig] = {}
    for component, fields in by_component.items():
        if "r" not in fields and "lora_alpha" not in fields:
            continue
        r = _number(fields.get("r"), file_name, f"{component}.r")
        alpha = _number(fields.get("lora_alpha", r), file_name, f"{component}.lora_alpha")
        configs[component] = ComponentConfig(
            component=component, r=int(r), lora_alpha=alpha,
            alpha_pattern=_pattern(fields.get("alpha_pattern"), file_name, f"{component}.alpha_pattern"),
            rank_pattern={k: int(v) for k, v in
                          _pattern(fields.get("rank_pattern"), file_name, f"{component}.rank_pattern").items()},
            use_rslora=bool(fields.get("use_rslora", False)))
    return configs


def component_of(source: str, configs: Mapping[str, ComponentConfig]) -> tuple[ComponentConfig, str] | None:
    """``(config, module path inside the component)`` for a module as a diffusers file names it, else None."""
    component, _, module = source.partition(".")
    config = configs.get(component)
    return (config, module) if config is not None and module else None
