"""When the bridge's wrapped layers and attention override may run the Triton kernels of :mod:`lora_loom.kernels`.

The kernels (``multi_lora_triton``, ``joint_attention_triton``) read any strides (no contiguity needed) and
accumulate in float32, but they are forward-only and compiled for the float types ``tl.dot`` takes. So the
bridge uses them only when all of these hold, and its torch path otherwise:

* :func:`lora_loom.kernels.multi_lora_triton.triton_usable` — a CUDA device with triton installed, or Triton's
  CPU interpreter (``TRITON_INTERPRET=1``); ``LOOM_KERNELS=torch`` forces torch;
* every tensor is float16, bfloat16 or float32;
* no autograd: latent refinement (``refine.py``) and gate training differentiate through the regional layers
  and the attention override, and the kernels have no backward.
"""
from __future__ import annotations

import torch

from ...kernels.multi_lora_triton import triton_usable

TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def triton_eligible(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels may take these inputs (the first one's device decides usability)."""
    if not triton_usable(tensors[0].device) or any(t.dtype not in TRITON_DTYPES for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


__all__ = ["TRITON_DTYPES", "triton_eligible"]
