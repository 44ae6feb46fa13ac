"""One small converter per Flux LoRA file format -> canonical ComfyUI Flux module names (+ leftovers).

Each format module exposes ``NAME``, ``detect(keys) -> bool`` and
``convert(state_dict, file_name) -> (canonical name -> [RawAdapterParts], leftover keys)`` (popping what it
handles). ``registry.FORMATS`` is the ordered list; ``read_adapter_set`` builds an AdapterSet.
"""
from .foreign import NotFluxLoRAError, foreign_model_evidence, identify_foreign_model
from .registry import FORMATS, convert_state_dict, read_adapter_set
from .shapes import ShapeMismatchError, check_shapes, shape_problems

__all__ = ["FORMATS", "NotFluxLoRAError", "ShapeMismatchError", "check_shapes", "convert_state_dict",
           "foreign_model_evidence", "identify_foreign_model", "read_adapter_set", "shape_problems"]
