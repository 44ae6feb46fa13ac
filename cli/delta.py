"""``loom delta FILE --out OUT.safetensors [--strength S] [--model FLUX.safetensors]``.

Writes the effective change a LoRA makes to the diffusion model: one float32 tensor per parameter, keyed by
ComfyUI's Flux weight names (``double_blocks.0.img_attn.qkv.weight``, ``….bias``, ``….norm.key_norm.scale``),
slices of fused weights summed into the whole parameter, ``strength`` applied. Text-encoder parts are left out.
DoRA and set_weight deltas depend on the base weight: pass ``--model`` (a Flux diffusion-model safetensors,
keys with or without ``model.diffusion_model.`` / ``diffusion_model.``) for those.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..arguments import add_force, float_in
from ..composition.adapters import NEEDS_BASE, WEIGHT, AdapterSet, merged_delta
from ..composition.adapters.adapter_set import Adapter
from ..composition.formats import check_shapes
from ..composition.loading import read_header
from ..composition.numbers import STRENGTH_LIMIT
from ..files.writing import OutputFileError, check_output, write_file
from .inspect import InspectError, load_for_cli

logger = logging.getLogger(__name__)

MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def parameter_key(module: str, parameter: str) -> str:
    """ComfyUI's Flux state-dict name (without ``diffusion_model.``) of one parameter of ``module``."""
    return f"{module}.{parameter}"


class BaseModelFile:
    """Base weights of a Flux diffusion model, read one tensor at a time (memory-mapped).

    ``shapes`` maps ``double_blocks.0.img_attn.qkv.weight``-style names (prefix stripped) to shapes.
    """

    def __init__(self, path: str):
        self.path = Path(path)
        if not self.path.is_file():
            raise InspectError(f"{path}: no such file")
        try:
            header = read_header(self.path)
        except (ValueError, OSError) as err:
            message = str(err)
            raise InspectError(message if self.path.name in message else f"{self.path.name}: {message}") from err
        self._names: dict[str, str] = {}
        for key in header.tensors:
            short = next((key[len(p):] for p in MODEL_PREFIXES if key.startswith(p)), key)
            self._names[short] = key
        self.shapes = {k: header.tensors[v].shape for k, v in self._names.items()}

    def tensor(self, key: str) -> torch.Tensor:
        """The base parameter ``key`` in float32 ``[*shape]``; InspectError naming the key when absent."""
        if key not in self._names:
            raise InspectError(f"{self.path.name}: has no parameter {key} (is it a Flux diffusion model?)")
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                tensor = f.get_tensor(self._names[key]).to(torch.float32)
        except Exception as err:  # the file changed after its header was checked, or is unreadable
            raise InspectError(f"{self.path.name}: cannot read {key} ({err})") from err
        if not bool(torch.isfinite(tensor).all()):
            raise InspectError(f"{self.path.name}: parameter {key} holds NaN or infinite values")
        return tensor


def parameter_deltas(adapter_set: AdapterSet, strength: float = 1.0,
                     base: BaseModelFile | None = None) -> dict[str, torch.Tensor]:
    """``strength · ΔW`` per diffusion-model parameter, float32, ComfyUI names; needs ``base`` for DoRA/set_weight.

    Raises InspectError naming the file and the module when a base weight is needed and ``base`` is None, and
    (through ``check_shapes``) naming the key and both shapes when the LoRA does not fit ``base``.
    """
    if base is not None:
        try:
            check_shapes(adapter_set, base.shapes)
        except ValueError as err:
            raise InspectError(f"{err} (model {base.path.name})") from err
    grouped: dict[str, list[Adapter]] = defaultdict(list)
    for module, adapters in adapter_set.adapters.items():
        for a in adapters:
            grouped[parameter_key(module, a.parameter)].append(a)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(grouped):
        group = grouped[key]
        base_weight = None
        if any(isinstance(a, NEEDS_BASE) for a in group):
            kind = next(type(a).__name__ for a in group if isinstance(a, NEEDS_BASE))
            if base is None:
                raise InspectError(f"{adapter_set.source}: {key} is {kind}; its delta depends on the base weight. "
                                   f"Pass --model FLUX.safetensors (the diffusion model it is meant for)")
            base_weight = base.tensor(key)
        shape = tuple(group[0].target_shape)
        if base_weight is not None and tuple(base_weight.shape) != shape:
            module = key.rsplit(".", 1)[0]
            widened = adapter_set.widened_inputs.get(module) if key.endswith("." + WEIGHT) else None
            if widened is None:
                raise InspectError(f"{adapter_set.source}: shape mismatch at {key}: the LoRA targets {shape}, "
                                   f"the model has {tuple(base_weight.shape)}")
            padded = base_weight.new_zeros(shape)
            padded[tuple(slice(0, s) for s in base_weight.shape)] = base_weight
            base_weight = padded
        out[key] = (strength * merged_delta(group, shape, base_weight=base_weight)).to(torch.float32).contiguous()
    return out


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("delta", help="write a LoRA's effective weight change (float32, ComfyUI Flux names)")
    p.add_argument("file", help="a .safetensors LoRA")
    p.add_argument("--out", required=True, help="output .safetensors (a new file; see --force)")
    p.add_argument("--strength", type=float_in(-STRENGTH_LIMIT, STRENGTH_LIMIT), default=1.0,
                   help=f"multiplier applied to every delta, within +-{STRENGTH_LIMIT:g} (default 1)")
    p.add_argument("--model", help="Flux diffusion-model .safetensors (needed for DoRA and set_weight)")
    add_force(p, "--out file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    inputs = [args.file, *([args.model] if args.model else [])]
    try:
        check_output(args.out, force=args.force, inputs=inputs)
        adapter_set = load_for_cli(args.file)
        base = BaseModelFile(args.model) if args.model else None
        deltas = parameter_deltas(adapter_set, args.strength, base)
        metadata = {"lora_loom.source": Path(args.file).name, "lora_loom.sha256": adapter_set.sha256 or "",
                    "lora_loom.strength": repr(args.strength), "lora_loom.format": adapter_set.format}
        write_file(args.out, lambda temporary: save_file(deltas, temporary, metadata=metadata), force=args.force,
                   inputs=inputs)
    except (InspectError, OutputFileError) as err:
        sys.stderr.write(f"loom delta: error: {err}\n")
        return 1
    except OSError as err:
        sys.stderr.write(f"loom delta: error: cannot write {args.out}: {err.strerror or err}\n")
        return 1
    skipped = len(adapter_set.te_adapters)
    sys.stdout.write(f"{args.out}: {len(deltas)} parameters"
                     + (f" ({skipped} text-encoder modules left out)" if skipped else "") + "\n")
    return 0
