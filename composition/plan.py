"""A regional composition plan (LoRA-Composer on Flux): regions, Loom Compose's options and the rules they imply.

Frozen descriptions; nothing touches a model. The runtime turns a :class:`Plan` into token masks
(:func:`region_token_masks`), text spans (:class:`TextSpans`) and attention rules (``regional.py``).
:class:`ComposeOptions` is the one set of Loom Compose's switches (its defaults are the node's).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .numbers import checked_number
from .refine import RefineOptions

if TYPE_CHECKING:
    from .stack import StackEntry

logger = logging.getLogger(__name__)

BACKGROUND_MODES = ("global", "isolated", "shared")
RULE_NAMES = ("injection", "isolation", "base_blend")
ATTENTION_PATHS = ("grouped", "dense")


class PlanError(ValueError):
    """A plan, region or mask is malformed; the message names the region index and the field."""


def _where(region_index: int | None, field_name: str) -> str:
    """``plan.regions[i].<field>`` (or ``plan.<field>`` when the region index is unknown) for error messages."""
    return f"plan.regions[{region_index}].{field_name}" if region_index is not None else f"plan.{field_name}"


@dataclass(frozen=True)
class RegionMask:
    """An immutable soft mask: float32 values in [0, 1], shape ``[H, W]`` or ``[B, H, W]`` (row-major bytes)."""

    shape: tuple[int, ...]
    values: bytes = field(repr=False)

    @staticmethod
    def from_array(array: torch.Tensor | np.ndarray, region_index: int | None = None) -> RegionMask:
        """Build from a tensor/array ``[H, W]`` or ``[B, H, W]`` (a ComfyUI MASK is ``[B, H, W]``)."""
        where = _where(region_index, "mask")
        if isinstance(array, torch.Tensor):
            array = array.detach().to("cpu", torch.float32).numpy()
        values = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
        if values.ndim not in (2, 3):
            raise PlanError(f"{where}: expected [H, W] or [B, H, W], got {values.ndim} dims {tuple(values.shape)}")
        if min(values.shape) == 0:
            raise PlanError(f"{where}: empty shape {tuple(values.shape)}")
        if not np.isfinite(values).all():
            raise PlanError(f"{where}: contains NaN or infinity")
        if values.min() < -1e-6 or values.max() > 1.0 + 1e-6:
            raise PlanError(f"{where}: values must lie in [0, 1], got [{values.min():.4g}, {values.max():.4g}]")
        return RegionMask(shape=tuple(int(s) for s in values.shape), values=np.clip(values, 0.0, 1.0).tobytes())

    def to_tensor(self) -> torch.Tensor:
        """The mask as a float32 tensor of :attr:`shape` (a fresh copy)."""
        return torch.from_numpy(np.frombuffer(self.values, dtype=np.float32).reshape(self.shape).copy())


@dataclass(frozen=True)
class RegionOptions:
    """Per-region switches. isolate: take part in concept isolation (False: this region's image tokens see and are
    seen by all image tokens)."""

    isolate: bool = True


@dataclass(frozen=True)
class Region:
    """One region: a box ``(x0, y0, x1, y1)`` in fractions of the canvas ([0, 1]) or a mask (exactly one of them),
    and its prompt."""

    prompt: str
    box: tuple[float, float, float, float] | None = None
    mask: RegionMask | None = None
    options: RegionOptions = RegionOptions()

    def validate(self, index: int) -> None:
        """Raise :class:`PlanError` naming ``plan.regions[index].<field>`` if the region is malformed."""
        if (self.box is None) == (self.mask is None):
            raise PlanError(f"{_where(index, 'box')}: give exactly one of box or mask")
        if self.box is None:
            return
        if len(self.box) != 4:
            raise PlanError(f"{_where(index, 'box')}: expected 4 numbers (x0, y0, x1, y1), got {len(self.box)}")
        x0, y0, x1, y1 = (checked_number(v, f"{_where(index, 'box')}[{i}]", -math.inf, math.inf, PlanError)
                          for i, v in enumerate(self.box))
        if x1 <= x0 or y1 <= y0:
            raise PlanError(f"{_where(index, 'box')}: zero or negative area {self.box}")
        if x0 < 0 or y0 < 0 or x1 > 1.0 + 1e-9 or y1 > 1.0 + 1e-9:
            raise PlanError(f"{_where(index, 'box')}: {self.box} lies outside the canvas [0, 1] x [0, 1]")

    def normalised_box(self) -> tuple[float, float, float, float]:
        """The box as fractions of the canvas ``(x0, y0, x1, y1)``."""
        if self.box is None:
            raise PlanError("region has a mask, not a box")
        x0, y0, x1, y1 = (float(v) for v in self.box)
        return (x0, y0, x1, y1)


@dataclass(frozen=True)
class ComposedRegion:
    """What ``LOOM_REGIONS`` carries per region: the plan region and the loaded adapters that paint it."""

    region: Region
    entries: tuple[StackEntry, ...] = ()


@dataclass(frozen=True)
class RuleSchedule:
    """Where a rule applies: block index sets (None = every block of that type) and a sampling-percent window.

    rule: one of RULE_NAMES. Percent follows ComfyUI (0 = first step, 1 = end); the window is
    ``start_percent <= p < end_percent``, with ``end_percent == 1`` including 1.
    """

    rule: str
    double_blocks: frozenset[int] | None = None
    single_blocks: frozenset[int] | None = None
    start_percent: float = 0.0
    end_percent: float = 1.0


@dataclass(frozen=True)
class ComposeOptions:
    """Loom Compose's switches (the defaults are the node's).

    background: "global" | "isolated" | "shared" (see ``regional.py``); base_ratio: β in
    ``h = (1-β)·h_regional + β·h_base`` while base blending applies; injection / isolation / base_blend: the rules,
    applied in ``double_blocks``/``single_blocks`` (None = all) for sampling percent ``[start_percent,
    end_percent)`` — isolation is off by default: regions' image tokens seeing each other is how the model forms
    whole shapes (playground tune split: presence 0.85 -> 0.98 with global_text_adapters off too, BENCHMARKS.md);
    latent_reinit: LoRA-Composer's window search; refinement: LoRA-Composer's latent refinement,
    with ``refine`` its weights and schedule; attention_path "grouped" (no L×L mask) or "dense"; region_threshold:
    the soft coverage from which an image token belongs to a region; trim_region_padding: region prompts keep their
    start, words and end token but not the padding after (the padding of every region prompt would otherwise run
    through every block: 4 CLIP-L region prompts add 308 text tokens, trimmed ~40; the global prompt keeps its full
    length); global_text_adapters: the global prompt's tokens are read with every region's adapters (text stream),
    as a merged stack reads them. Off by default: read with every region's LoRAs, a class word two LoRAs share
    ("toy") or any word under a trigger-less style carries each region's LoRA into the others (with isolation on,
    world v1, it had helped: presence 0.16 -> 0.44; with isolation off the regions get the global picture from
    each other's image tokens instead);
    regions_see_global: while injection applies a region's image tokens also read the global prompt (off: only
    their own prompt, LoRA-Composer's concept injection)."""

    background: str = "global"
    base_ratio: float = 0.2
    injection: bool = True
    isolation: bool = False
    base_blend: bool = True
    double_blocks: frozenset[int] | None = None
    single_blocks: frozenset[int] | None = None
    start_percent: float = 0.0
    end_percent: float = 1.0
    latent_reinit: bool = True
    refinement: bool = False
    refine: RefineOptions = RefineOptions()
    attention_path: str = "grouped"
    region_threshold: float = 0.5
    trim_region_padding: bool = True
    global_text_adapters: bool = False
    regions_see_global: bool = False

    def rules(self) -> tuple[RuleSchedule, ...]:
        names = [n for n, on in (("injection", self.injection), ("isolation", self.isolation),
                                 ("base_blend", self.base_blend and self.base_ratio > 0)) if on]
        return tuple(RuleSchedule(n, self.double_blocks, self.single_blocks, self.start_percent, self.end_percent)
                     for n in names)

    def validate(self) -> ComposeOptions:
        """Raise :class:`PlanError` naming the field when an option is out of range; returns self."""
        checks = (("background", self.background in BACKGROUND_MODES, f"is not one of {BACKGROUND_MODES}"),
                  ("base_ratio", 0.0 <= self.base_ratio <= 1.0, "is outside [0, 1]"),
                  ("region_threshold", 0.0 < self.region_threshold <= 1.0, "is outside (0, 1]"),
                  ("attention_path", self.attention_path in ATTENTION_PATHS, f"is not one of {ATTENTION_PATHS}"),
                  ("start_percent", 0.0 <= self.start_percent <= self.end_percent <= 1.0,
                   f"and end_percent {self.end_percent}: need 0 <= start <= end <= 1"))
        for name, ok, why in checks:
            if not ok:
                raise PlanError(f"plan.options.{name}: {getattr(self, name)!r} {why}")
        for name in ("double_blocks", "single_blocks"):
            blocks = getattr(self, name)
            if blocks is not None and any(int(b) < 0 for b in blocks):
                raise PlanError(f"plan.options.{name}: negative block index in {sorted(blocks)}")
        return self


def parse_rule_blocks(text: str) -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """Blocks where the attention rules apply: ``""``/``"all"`` -> every block; otherwise items like
    ``d0-18 s0-9 s12`` (or ``double0-18, single3``), 0-based inclusive, as ComfyUI's ``block_index``. A block
    type not named gets no rules. Returns ``(double_blocks, single_blocks)``."""
    cleaned = text.strip().lower()
    if cleaned in ("", "all"):
        return None, None
    chosen: dict[str, set[int]] = {"d": set(), "s": set()}
    for item in cleaned.replace(",", " ").replace(";", " ").split():
        kind = "d" if item.startswith("d") else "s" if item.startswith("s") else None
        numbers = item.lstrip("doublesingle")
        try:
            low, _, high = numbers.partition("-")
            first, last = int(low), int(high or low)
        except ValueError as exc:
            raise PlanError(f"rule blocks {text!r}: cannot read {item!r} (write e.g. 'd0-18 s0-37')") from exc
        if kind is None or first < 0 or last < first:
            raise PlanError(f"rule blocks {text!r}: bad item {item!r} (write e.g. 'd0-18 s0-37')")
        chosen[kind].update(range(first, last + 1))
    return frozenset(chosen["d"]), frozenset(chosen["s"])


@dataclass(frozen=True)
class Plan:
    """A whole regional composition: the global prompt, the regions and Loom Compose's options."""

    global_prompt: str
    regions: tuple[Region, ...]
    options: ComposeOptions = ComposeOptions()

    @property
    def background(self) -> str:
        return self.options.background

    @property
    def rules(self) -> tuple[RuleSchedule, ...]:
        return self.options.rules()

    def validate(self) -> Plan:
        """Check every field; returns self so ``Plan(...).validate()`` chains. Raises :class:`PlanError`."""
        self.options.validate()
        for i, region in enumerate(self.regions):
            region.validate(i)
        return self


@dataclass(frozen=True)
class TokenSpan:
    """Half-open span ``[start, end)`` of one prompt in the concatenated text sequence."""

    start: int
    end: int


@dataclass(frozen=True)
class TextSpans:
    """Where the global prompt and each region prompt sit in the text part ``[0, total)`` of the joint sequence.

    Text tokens inside no span (e.g. padding) are labelled as global text by the attention rules.
    """

    global_span: TokenSpan
    region_spans: tuple[TokenSpan, ...]
    total: int

    @staticmethod
    def from_lengths(global_length: int, region_lengths: Sequence[int]) -> TextSpans:
        """Spans for ``[global | region_0 | region_1 | ...]`` concatenated in that order."""
        spans, start = [], global_length
        for length in region_lengths:
            spans.append(TokenSpan(start, start + int(length)))
            start += int(length)
        return TextSpans(TokenSpan(0, int(global_length)), tuple(spans), start).validate()

    def validate(self) -> TextSpans:
        """Spans must be non-empty, inside ``[0, total)`` and must not overlap."""
        named = [("global_span", self.global_span)] + [(f"region_spans[{i}]", s)
                                                       for i, s in enumerate(self.region_spans)]
        for name, span in named:
            if not 0 <= span.start < span.end <= self.total:
                raise PlanError(f"text_spans.{name}: {span} is empty or outside [0, {self.total})")
        ordered = sorted(named, key=lambda item: item[1].start)
        for (name_a, a), (name_b, b) in zip(ordered, ordered[1:]):
            if b.start < a.end:
                raise PlanError(f"text_spans.{name_b}: overlaps text_spans.{name_a}")
        return self


def _box_coverage(lo: float, hi: float, size: int, patch: int) -> torch.Tensor:
    """Fraction of each token's real latent cells covered by ``[lo, hi)`` (latent cells); ``[ceil(size/patch)]``."""
    n = -(-size // patch)
    starts = torch.arange(n, dtype=torch.float64) * patch
    ends = torch.clamp(starts + patch, max=float(size))
    overlap = torch.clamp(torch.minimum(ends, torch.tensor(hi)) - torch.maximum(starts, torch.tensor(lo)), min=0.0)
    return (overlap / (ends - starts)).to(torch.float32)


def _mask_to_tokens(mask: torch.Tensor, latent_h: int, latent_w: int, patch: int) -> torch.Tensor:
    """Resize a mask ``[Bm, H, W]`` to the latent grid (area when shrinking, bilinear when growing), then
    average each token's real (unpadded) latent cells. Returns ``[Bm, ceil(h/p) * ceil(w/p)]``."""
    m = mask[:, None].to(torch.float32)
    if m.shape[-2:] != (latent_h, latent_w):
        shrinking = m.shape[-2] >= latent_h and m.shape[-1] >= latent_w
        m = F.interpolate(m, size=(latent_h, latent_w), mode="area") if shrinking else \
            F.interpolate(m, size=(latent_h, latent_w), mode="bilinear", align_corners=False)
    pad = (0, (-latent_w) % patch, 0, (-latent_h) % patch)
    valid = F.pad(torch.ones_like(m[:1]), pad)
    m = F.pad(m.clamp(0.0, 1.0), pad)
    summed = F.avg_pool2d(m, patch) / F.avg_pool2d(valid, patch)
    return summed.flatten(1)


def region_token_masks(plan: Plan, latent_h: int, latent_w: int, patch: int = 2, batch: int = 1) -> torch.Tensor:
    """Soft coverage of every image token by every region: ``[N_regions, B, L_img]`` float32 in [0, 1].

    The token grid is ``ceil(latent_h/patch) x ceil(latent_w/patch)`` in raster order, as ComfyUI's Flux
    ``process_img`` builds it (odd sizes are padded; a token's value averages only its real latent cells).
    Boxes are rasterised with fractional coverage; masks of any size are resized (area/bilinear). A mask
    with batch 1 is broadcast to ``batch``; other batch sizes must equal ``batch``.
    """
    if latent_h <= 0 or latent_w <= 0 or patch <= 0 or batch <= 0:
        raise PlanError(f"region_token_masks: bad grid latent {latent_h}x{latent_w}, patch {patch}, batch {batch}")
    plan.validate()
    grid = (-(-latent_h // patch)) * (-(-latent_w // patch))
    out = torch.zeros(len(plan.regions), batch, grid, dtype=torch.float32)
    for i, region in enumerate(plan.regions):
        if region.box is not None:
            x0, y0, x1, y1 = region.normalised_box()
            cov_y = _box_coverage(y0 * latent_h, y1 * latent_h, latent_h, patch)
            cov_x = _box_coverage(x0 * latent_w, x1 * latent_w, latent_w, patch)
            out[i] = (cov_y[:, None] * cov_x[None, :]).flatten()[None]
            continue
        mask = region.mask.to_tensor()
        mask = mask[None] if mask.ndim == 2 else mask
        if mask.shape[0] not in (1, batch):
            raise PlanError(f"{_where(i, 'mask')}: mask batch {mask.shape[0]} does not match batch {batch} (or 1)")
        if float(mask.max()) <= 0.0:
            raise PlanError(f"{_where(i, 'mask')}: mask is empty (all zeros)")
        tokens = _mask_to_tokens(mask, latent_h, latent_w, patch)
        if float(tokens.max()) <= 0.0:
            raise PlanError(f"{_where(i, 'mask')}: mask covers no image token at latent {latent_h}x{latent_w}")
        out[i] = tokens.expand(batch, grid)
    return out
