"""Low-rank factors of a LoRA file per canonical Flux module, and the Flux layer layout they are read against.

The weight signature and the AutoLoRA weight encoder only need, per targeted Linear, a factorisation
``ΔW = scale · up @ down`` (``up [out, r]``, ``down [r, in]``). Files are parsed by the composition package's
format converters (every format in the wild, slices of fused qkv/linear1 placed at their offsets);
non-low-rank kinds (LoHa, LoKr, full diffs) are brought to this form by a truncated SVD of their delta.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from safetensors import safe_open

from ..composition.adapters import NEEDS_BASE, LoRA
from ..composition.formats import read_adapter_set

logger = logging.getLogger(__name__)

FIT_RANK = 16
DOUBLE_KINDS = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin",
                "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin")
SINGLE_KINDS = ("linear1", "linear2", "modulation.lin")


@dataclass(frozen=True)
class LowRankFactors:
    """``ΔW = scale · up @ down`` with ``up [out, r]`` and ``down [r, in]`` (float32)."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        """``r``."""
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LayerSpec:
    """One targeted Linear: canonical ``name`` (``double_blocks.3.img_attn.qkv``), its ``kind``
    (``img_attn.qkv``), and ``d_in``/``d_out`` of its weight ``[d_out, d_in]``."""

    name: str
    kind: str
    d_in: int
    d_out: int


@dataclass(frozen=True)
class FluxLayout:
    """The Flux transformer's targeted Linears in a fixed order (double blocks, then single blocks).

    Defaults are Flux.1 (hidden 3072, MLP ratio 4, 19 double and 38 single blocks); tests use hidden 32.
    """

    hidden: int = 3072
    mlp_ratio: float = 4.0
    double_blocks: int = 19
    single_blocks: int = 38

    @cached_property
    def layers(self) -> tuple[LayerSpec, ...]:
        """Every targeted layer in order: 10 per double block, 3 per single block."""
        h, m = self.hidden, int(self.hidden * self.mlp_ratio)
        dims = {"attn.qkv": (h, 3 * h), "attn.proj": (h, h), "mlp.0": (h, m), "mlp.2": (m, h), "mod.lin": (h, 6 * h),
                "linear1": (h, 3 * h + m), "linear2": (h + m, h), "modulation.lin": (h, 3 * h)}
        specs = []
        for i in range(self.double_blocks):
            for kind in DOUBLE_KINDS:
                d_in, d_out = dims[kind[4:]]
                specs.append(LayerSpec(f"double_blocks.{i}.{kind}", kind, d_in, d_out))
        for j in range(self.single_blocks):
            for kind in SINGLE_KINDS:
                d_in, d_out = dims[kind]
                specs.append(LayerSpec(f"single_blocks.{j}.{kind}", kind, d_in, d_out))
        return tuple(specs)

    @cached_property
    def kinds(self) -> dict[str, tuple[int, int]]:
        """Layer kind → ``(d_in, d_out)``."""
        return {spec.kind: (spec.d_in, spec.d_out) for spec in self.layers}

    def check(self, name: str, factors: LowRankFactors) -> None:
        """Raise ValueError when ``factors`` do not fit layer ``name`` of this layout."""
        spec = self.index.get(name)
        if spec is None:
            return
        shape = (int(factors.up.shape[0]), int(factors.down.shape[1]))
        if shape != (self.layers[spec].d_out, self.layers[spec].d_in):
            raise ValueError(f"module {name}: factors give ΔW {shape}, layout expects "
                             f"{(self.layers[spec].d_out, self.layers[spec].d_in)} (hidden {self.hidden})")

    @cached_property
    def index(self) -> dict[str, int]:
        """Layer name → position."""
        return {spec.name: i for i, spec in enumerate(self.layers)}


def _module_factors(name: str, adapters: tuple[object, ...]) -> LowRankFactors | None:
    """Stack one module's adapters into one factorisation (offsets placed as zero-padded ``up`` rows)."""
    if any(isinstance(a, NEEDS_BASE) for a in adapters) or any(a.parameter != "weight" for a in adapters):
        return None
    target = tuple(adapters[0].target_shape)
    if len(target) != 2:
        return None
    ups, downs = [], []
    for a in adapters:
        if isinstance(a, LoRA):
            down = a.down.float() if a.mid is None else a.mid.float() @ a.down.float()
            up = a.up.float() * a.scale
        else:
            delta = a.delta_weight().float()
            u, s, v = torch.svd_lowrank(delta, q=min(FIT_RANK, *delta.shape))
            up, down = u * s, v.T
        if a.offset is not None:
            placed = up.new_zeros(target[0], up.shape[1])
            placed[a.offset.start:a.offset.stop] = up
            up = placed
        ups.append(up)
        downs.append(down)
    return LowRankFactors(up=torch.cat(ups, dim=1), down=torch.cat(downs, dim=0), scale=1.0)


def read_factors(path: str | os.PathLike[str]) -> dict[str, LowRankFactors]:
    """Canonical Flux module → factors for one safetensors file (text-encoder adapters are ignored).

    Raises the composition converters' errors (foreign model, no Flux keys, malformed adapters), naming the
    file. Unlike ``composition.loading.load_adapter_set`` nothing is cached, so a library pass stays flat in
    memory.
    """
    path = os.fspath(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        state_dict = {key: f.get_tensor(key) for key in f.keys()}
    adapter_set = read_adapter_set(state_dict, os.path.basename(path), metadata=metadata)
    factors: dict[str, LowRankFactors] = {}
    for module, adapters in adapter_set.adapters.items():
        name = module.removeprefix("diffusion_model.")
        found = _module_factors(name, tuple(adapters))
        if found is not None:
            factors[name] = found
    return factors


def scaled(factors: Mapping[str, LowRankFactors], strength: float) -> dict[str, LowRankFactors]:
    """The same adapter at another strength (``ΔW → strength · ΔW``)."""
    return {k: LowRankFactors(up=f.up, down=f.down, scale=f.scale * strength) for k, f in factors.items()}
