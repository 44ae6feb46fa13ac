"""A pure FLOP model of one Flux step: the blocks' Linears, joint attention, and the adapters on top.

It gives every benchmark row its *physical limit*: the work a method must do, divided by the work of the
merged-LoRA step (which is exactly the base model's work: merged weights cost nothing per step). A measured ratio
reads against it: regional composition that runs at 1.05× when its adapters add 3 % FLOPs wastes 2 %; a method
that needs N passes can never beat N×.

Counting rules (multiply-add = 2 FLOPs; per-sample layers such as ``time_in`` or the modulations count once per
sample, not per token):

* double block, per token of its stream (img or txt): ``qkv D→3D``, ``proj D→D``, ``mlp.0 D→M``, ``mlp.2 M→D``;
  per sample: ``mod.lin D→6D``;
* single block, per joint token: ``linear1 D→3D+M``, ``linear2 D+M→D``; per sample: ``modulation.lin D→3D``;
* attention of one block: ``4 · pairs · D`` (``QKᵀ`` and ``PV`` over all heads), ``pairs = Σ Lq·Lk`` over the query
  blocks actually computed (``L²`` for full or dense-masked attention);
* a LoRA of rank ``r`` on ``c_in→c_out`` costs ``2 · r · (c_in + c_out)`` per token it is evaluated on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

logger = logging.getLogger(__name__)


class FlopModelError(ValueError):
    """A shape or workload field is out of range; the message names the field."""


@dataclass(frozen=True)
class FluxShape:
    """The dimensions of a Flux transformer (ComfyUI names): hidden ``D``, ``heads``, ``mlp_ratio`` (M = D·ratio),
    ``depth`` double and ``depth_single`` single blocks, latent ``in_channels``, ``patch_size``, ``context_dim``
    (text features), ``vec_dim`` (pooled features)."""

    hidden: int
    heads: int
    depth: int
    depth_single: int
    mlp_ratio: float = 4.0
    in_channels: int = 16
    patch_size: int = 2
    context_dim: int = 4096
    vec_dim: int = 768

    @property
    def mlp(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    def validate(self) -> FluxShape:
        for name in ("hidden", "heads", "in_channels", "patch_size", "context_dim", "vec_dim"):
            if getattr(self, name) <= 0:
                raise FlopModelError(f"FluxShape.{name}: must be positive, got {getattr(self, name)}")
        if self.depth < 0 or self.depth_single < 0:
            raise FlopModelError(f"FluxShape.depth/depth_single: must be >= 0, got {self.depth}, {self.depth_single}")
        if self.hidden % self.heads:
            raise FlopModelError(f"FluxShape.heads: {self.heads} does not divide hidden {self.hidden}")
        return self


FLUX_DEV = FluxShape(hidden=3072, heads=24, depth=19, depth_single=38)
DEMO_FLUX = FluxShape(hidden=3072, heads=24, depth=1, depth_single=1, context_dim=768, vec_dim=768)
SMALL_FLUX = FluxShape(hidden=256, heads=4, depth=1, depth_single=1, context_dim=64, vec_dim=64)
SHAPES = {"flux-dev": FLUX_DEV, "demo": DEMO_FLUX, "small": SMALL_FLUX}


@dataclass(frozen=True)
class BlockLinear:
    """One Linear of a block: ``module`` (suffix after the block index), ``stream`` ("img", "txt", "joint"),
    ``c_in``, ``c_out``, ``per_sample`` (runs once per sample, e.g. modulation)."""

    module: str
    stream: str
    c_in: int
    c_out: int
    per_sample: bool = False


def double_block_linears(shape: FluxShape) -> tuple[BlockLinear, ...]:
    """The Linears of one double-stream block, image stream then text stream."""
    d, m = shape.hidden, shape.mlp
    out = []
    for stream in ("img", "txt"):
        out += [BlockLinear(f"{stream}_attn.qkv", stream, d, 3 * d), BlockLinear(f"{stream}_attn.proj", stream, d, d),
                BlockLinear(f"{stream}_mlp.0", stream, d, m), BlockLinear(f"{stream}_mlp.2", stream, m, d),
                BlockLinear(f"{stream}_mod.lin", stream, d, 6 * d, per_sample=True)]
    return tuple(out)


def single_block_linears(shape: FluxShape) -> tuple[BlockLinear, ...]:
    """The Linears of one single-stream block (fused ``linear1`` = qkv + mlp in)."""
    d, m = shape.hidden, shape.mlp
    return (BlockLinear("linear1", "joint", d, 3 * d + m), BlockLinear("linear2", "joint", d + m, d),
            BlockLinear("modulation.lin", "joint", d, 3 * d, per_sample=True))


@dataclass(frozen=True)
class Workload:
    """One model call: ``image_tokens`` (latent H·W / patch²), ``text_tokens`` (context length) and ``batch``."""

    image_tokens: int
    text_tokens: int
    batch: int = 1

    @property
    def joint_tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    def tokens(self, stream: str) -> int:
        return {"img": self.image_tokens, "txt": self.text_tokens, "joint": self.joint_tokens}[stream]


def workload_for(resolution: int, shape: FluxShape, text_tokens: int, batch: int = 1, vae_factor: int = 8) -> Workload:
    """The workload of a ``resolution``² image: latent side ``resolution / vae_factor``, tokens per patch²."""
    if resolution <= 0 or resolution % (vae_factor * shape.patch_size):
        raise FlopModelError(f"resolution: {resolution} is not a positive multiple of {vae_factor * shape.patch_size}")
    side = resolution // vae_factor // shape.patch_size
    return Workload(image_tokens=side * side, text_tokens=text_tokens, batch=batch)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one model call split by kind: ``linear`` (blocks + embedders), ``attention``, ``adapters``."""

    linear: float
    attention: float
    adapters: float = 0.0

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.adapters

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(self.linear + other.linear, self.attention + other.attention, self.adapters + other.adapters)

    def scaled(self, factor: float) -> StepFlops:
        return StepFlops(self.linear * factor, self.attention * factor, self.adapters * factor)


def linear_flops(tokens: int, c_in: int, c_out: int) -> float:
    """``2 · tokens · c_in · c_out``."""
    return 2.0 * tokens * c_in * c_out


def lora_flops(tokens: int, c_in: int, c_out: int, rank: int) -> float:
    """One rank-``rank`` LoRA evaluated on ``tokens`` tokens: ``2 · tokens · rank · (c_in + c_out)``."""
    return 2.0 * tokens * rank * (c_in + c_out)


def attention_flops(shape: FluxShape, pairs: float) -> float:
    """One joint attention over ``pairs`` (query, key) pairs, all heads: ``4 · pairs · D``."""
    return 4.0 * pairs * shape.hidden


def base_flops(shape: FluxShape, work: Workload, attention_pairs: float | None = None) -> StepFlops:
    """The base model's step. ``attention_pairs``: pairs per block and sample (default: full, ``L²``)."""
    shape.validate()
    pairs = float(work.joint_tokens) ** 2 if attention_pairs is None else float(attention_pairs)
    linear = 0.0
    for layer in double_block_linears(shape):
        linear += shape.depth * linear_flops(1 if layer.per_sample else work.tokens(layer.stream), layer.c_in,
                                             layer.c_out)
    for layer in single_block_linears(shape):
        linear += shape.depth_single * linear_flops(1 if layer.per_sample else work.joint_tokens, layer.c_in,
                                                    layer.c_out)
    d, patch_in = shape.hidden, shape.in_channels * shape.patch_size ** 2
    linear += linear_flops(work.image_tokens, patch_in, d) + linear_flops(work.text_tokens, shape.context_dim, d)
    linear += linear_flops(work.image_tokens, d, patch_in) + linear_flops(1, d, 2 * d)  # final layer + its adaLN
    linear += 2 * (linear_flops(1, 256, d) + linear_flops(1, d, d)) + linear_flops(1, shape.vec_dim, d) \
        + linear_flops(1, d, d)  # time_in, guidance_in, vector_in
    attention = (shape.depth + shape.depth_single) * attention_flops(shape, pairs)
    return StepFlops(linear * work.batch, attention * work.batch)


def adapter_flops(shape: FluxShape, work: Workload, adapters: int, rank: int, token_fraction: float = 1.0,
                  per_sample_layers: bool = True) -> float:
    """``adapters`` LoRAs of ``rank`` on every block Linear, each evaluated on ``token_fraction`` of its stream's
    tokens (1.0 = every token, as a masked multi-LoRA kernel does; 1/regions = only its region's tokens)."""
    if not 0.0 <= token_fraction <= 1.0:
        raise FlopModelError(f"token_fraction: must lie in [0, 1], got {token_fraction}")
    total = 0.0
    for depth, layers in ((shape.depth, double_block_linears(shape)),
                          (shape.depth_single, single_block_linears(shape))):
        for layer in layers:
            if layer.per_sample and not per_sample_layers:
                continue
            tokens = 1 if layer.per_sample else work.tokens(layer.stream) * token_fraction
            total += depth * lora_flops(tokens, layer.c_in, layer.c_out, rank)  # type: ignore[arg-type]
    return total * adapters * work.batch


@dataclass(frozen=True)
class MethodWork:
    """A method's step relative to merged: ``flops`` of the step, ``limit`` = flops / merged flops, ``passes``."""

    method: str
    flops: StepFlops
    limit: float
    passes: int


def method_flops(method: str, shape: FluxShape, image_tokens: int, prompt_tokens: int, adapters: int, regions: int,
                 rank: int, regional_pairs: float | None = None, base_pairs: float | None = None,
                 base_blend: bool = True, region_tokens: int | None = None) -> MethodWork:
    """The work of one step of ``method`` for ``adapters`` LoRAs painted into ``regions`` regions.

    Every prompt is ``prompt_tokens`` long except Loom regional's region prompts, ``region_tokens`` each (None =
    untrimmed, ``prompt_tokens``; Loom Compose trims a region prompt's padding after its end token, so a few-word
    CLIP-L region prompt keeps words + 2 tokens); the peers do not trim. Methods: ``base`` / ``merged`` (one pass,
    ``prompt_tokens`` of text), ``regional`` (one pass over ``prompt_tokens + regions·region_tokens`` text tokens,
    every adapter on every token of its stream; attention over ``regional_pairs`` — the pairs the grouped path
    computes, default ``L²`` — plus a second, base-rule attention over ``base_pairs`` when ``base_blend``),
    ``regional_noblend`` (``regional`` with ``base_blend`` off),
    ``dense_per_head`` (the peers' layout: the same pass over ``(1 + regions)·prompt_tokens`` text tokens, always
    ``L²`` pairs), ``gates`` (one pass, adapters on every token), ``clora`` (1 + adapters passes with adapters on
    every token of the concept passes, an upper bound), ``hooks`` (one full pass per region with its hook group's
    weights and its region prompt), ``composite`` (one pass per adapter).
    """
    if adapters < 1 or regions < 1 or rank < 1:
        raise FlopModelError(f"adapters/regions/rank: must be >= 1, got {adapters}, {regions}, {rank}")
    if region_tokens is not None and region_tokens < 1:
        raise FlopModelError(f"region_tokens: must be >= 1 or None (= prompt_tokens), got {region_tokens}")
    if method == "regional_noblend":  # Loom regional with base blending off: no second, base-rule attention
        method, base_blend = "regional", False
    per_region = prompt_tokens if region_tokens is None or method != "regional" else region_tokens
    plain = Workload(image_tokens, prompt_tokens)
    merged = base_flops(shape, plain)
    if method in ("base", "merged"):
        flops, passes = merged, 1
    elif method in ("regional", "dense_per_head"):
        work = Workload(image_tokens, prompt_tokens + regions * per_region)
        full = float(work.joint_tokens) ** 2
        pairs = full if method == "dense_per_head" or regional_pairs is None else regional_pairs
        blend = (full if method == "dense_per_head" or base_pairs is None else base_pairs) if base_blend else 0.0
        flops = replace(base_flops(shape, work, attention_pairs=pairs + blend),
                        adapters=adapter_flops(shape, work, adapters, rank))
        passes = 1
    elif method == "gates":
        flops, passes = replace(merged, adapters=adapter_flops(shape, plain, adapters, rank)), 1
    elif method == "clora":
        passes = 1 + adapters
        flops = merged.scaled(passes) + StepFlops(0.0, 0.0, adapter_flops(shape, plain, adapters, rank))
    elif method == "hooks":
        flops, passes = merged.scaled(regions), regions
    elif method == "composite":
        flops, passes = merged.scaled(adapters), adapters
    else:
        raise FlopModelError(f"method: unknown {method!r}")
    return MethodWork(method, flops, flops.total / merged.total, passes)


__all__ = ["DEMO_FLUX", "FLUX_DEV", "SHAPES", "SMALL_FLUX", "BlockLinear", "FlopModelError", "FluxShape",
           "MethodWork", "StepFlops", "Workload", "adapter_flops", "attention_flops", "base_flops",
           "double_block_linears", "linear_flops", "lora_flops", "method_flops", "single_block_linears",
           "workload_for"]
