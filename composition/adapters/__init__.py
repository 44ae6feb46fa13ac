"""Adapter kinds as frozen dataclasses with ``delta_weight()`` and ``bypass_delta(x)``, and the AdapterSet.

See ``common`` for the shared protocol (offsets, ``base_weight``, parameters).
"""
from .adapter_set import (
    NEEDS_BASE,
    TEXT_ENCODERS,
    Adapter,
    AdapterSet,
    adapter_tensors,
    bypass_output,
    merged_delta,
    strength_applied,
    with_tensors,
)
from .common import BIAS, PARAMETERS, SCALE, WEIGHT, LowRankFit, Offset, apply_parameter_delta, fit_low_rank
from .decomposed import DoRA
from .full import SetWeight, WeightDiff
from .hadamard import LoHa
from .kronecker import LoKr
from .lowrank import LoRA

__all__ = ["Adapter", "AdapterSet", "BIAS", "DoRA", "LoHa", "LoKr", "LoRA", "LowRankFit", "NEEDS_BASE", "Offset",
           "PARAMETERS", "SCALE", "SetWeight", "TEXT_ENCODERS", "WEIGHT", "WeightDiff", "adapter_tensors",
           "apply_parameter_delta", "bypass_output", "fit_low_rank", "merged_delta", "strength_applied",
           "with_tensors"]
