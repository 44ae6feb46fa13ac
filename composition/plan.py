"""A regional composition plan (LoRA-Composer on Flux): regions, prompts, rule schedule, method options.

Frozen, JSON-serialisable descriptions; nothing touches a model. The bridge turns a :class:`Plan` into token
masks (:func:`region_token_masks`), text spans (:class:`TextSpans`) and attention rules (``regional.py``).

JSON form: ``plan.to_dict()`` gives plain dicts/lists/strings/numbers with ``"version": PLAN_VERSION``;
``Plan.from_dict(d)`` rebuilds an equal plan and raises :class:`PlanError` naming the offending field.
Masks are stored as float32 bytes (base64) with their shape, so the round trip is exact.
"""
from __future__ import annotations

import base64
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .numbers import checked_number

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
BACKGROUND_MODES = ("global", "isolated", "shared")
RULE_NAMES = ("injection", "isolation", "base_blend")
BOX_UNITS = ("normalised", "pixels")


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
    def from_array(array: torch.Tensor | np.ndarray, region_index: int | None = None) -> "RegionMask":
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

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "float32_base64": base64.b64encode(self.values).decode("ascii")}

    @staticmethod
    def from_dict(d: Mapping[str, Any], region_index: int | None = None) -> "RegionMask":
        where = _where(region_index, "mask")
        try:
            shape = tuple(int(s) for s in d["shape"])
            raw = base64.b64decode(d["float32_base64"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{where}: malformed mask entry ({exc})") from exc
        if len(raw) != 4 * int(np.prod(shape)):
            raise PlanError(f"{where}: {len(raw)} bytes do not match shape {shape}")
        return RegionMask.from_array(np.frombuffer(raw, dtype=np.float32).reshape(shape), region_index)


@dataclass(frozen=True)
class AdapterRef:
    """A reference to an adapter applied inside a region; the adapter itself is resolved elsewhere."""

    name: str
    sha256: str | None = None
    strength: float = 1.0


@dataclass(frozen=True)
class RegionOptions:
    """Per-region switches.

    isolate: take part in concept isolation (False: this region's image tokens see and are seen by all image
        tokens). adapters_on_text: also apply the region's adapters to its own prompt tokens (text stream).
    """

    isolate: bool = True
    adapters_on_text: bool = True


@dataclass(frozen=True)
class Region:
    """One region: a box or a mask, a region prompt and the adapters that paint it.

    box: ``(x0, y0, x1, y1)``; in ``box_units="normalised"`` fractions of the canvas in [0, 1], in ``"pixels"``
    image pixels of a canvas ``canvas_width x canvas_height`` (required then). Exactly one of box / mask.
    """

    prompt: str
    box: tuple[float, float, float, float] | None = None
    box_units: str = "normalised"
    canvas_width: int | None = None
    canvas_height: int | None = None
    mask: RegionMask | None = None
    adapters: tuple[AdapterRef, ...] = ()
    options: RegionOptions = RegionOptions()

    def validate(self, index: int) -> None:
        """Raise :class:`PlanError` naming ``plan.regions[index].<field>`` if the region is malformed."""
        if (self.box is None) == (self.mask is None):
            raise PlanError(f"{_where(index, 'box')}: give exactly one of box or mask")
        for a, ref in enumerate(self.adapters):
            if not ref.name:
                raise PlanError(f"{_where(index, f'adapters[{a}].name')}: empty adapter name")
        if self.box is None:
            return
        if len(self.box) != 4:
            raise PlanError(f"{_where(index, 'box')}: expected 4 numbers (x0, y0, x1, y1), got {len(self.box)}")
        if self.box_units not in BOX_UNITS:
            raise PlanError(f"{_where(index, 'box_units')}: {self.box_units!r} is not one of {BOX_UNITS}")
        x0, y0, x1, y1 = (checked_number(v, f"{_where(index, 'box')}[{i}]", -math.inf, math.inf, PlanError)
                          for i, v in enumerate(self.box))
        if self.box_units == "pixels":
            if not self.canvas_width or not self.canvas_height or self.canvas_width <= 0 or self.canvas_height <= 0:
                raise PlanError(f"{_where(index, 'canvas_width')}: pixel boxes need a positive canvas size")
            limit_x, limit_y = float(self.canvas_width), float(self.canvas_height)
        else:
            limit_x, limit_y = 1.0, 1.0
        if x1 <= x0 or y1 <= y0:
            raise PlanError(f"{_where(index, 'box')}: zero or negative area {self.box}")
        if x0 < 0 or y0 < 0 or x1 > limit_x + 1e-9 or y1 > limit_y + 1e-9:
            raise PlanError(f"{_where(index, 'box')}: {self.box} lies outside the canvas [0, {limit_x:g}] x [0, {limit_y:g}]")

    def normalised_box(self) -> tuple[float, float, float, float]:
        """The box as fractions of the canvas ``(x0, y0, x1, y1)``; call :meth:`validate` first."""
        if self.box is None:
            raise PlanError("region has a mask, not a box")
        x0, y0, x1, y1 = (float(v) for v in self.box)
        if self.box_units == "pixels":
            w, h = float(self.canvas_width), float(self.canvas_height)
            return (x0 / w, y0 / h, x1 / w, y1 / h)
        return (x0, y0, x1, y1)


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

    def validate(self, index: int) -> None:
        where = f"plan.rules[{index}]"
        if self.rule not in RULE_NAMES:
            raise PlanError(f"{where}.rule: {self.rule!r} is not one of {RULE_NAMES}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise PlanError(f"{where}.start_percent/end_percent: need 0 <= start <= end <= 1, "
                            f"got {self.start_percent}, {self.end_percent}")
        for name in ("double_blocks", "single_blocks"):
            blocks = getattr(self, name)
            if blocks is not None and any(int(b) < 0 for b in blocks):
                raise PlanError(f"{where}.{name}: negative block index in {sorted(blocks)}")


@dataclass(frozen=True)
class RefinementOptions:
    """Test-time latent refinement (LoRA-Composer defaults): loss weights, learning-rate schedule, stopping."""

    enabled: bool = False
    max_steps: int = 25
    patience_start: int = 5
    learning_rate: float = 20.0
    learning_rate_end_factor: float = 0.5
    enhancement_weight: float = 8.0
    fill_weight: float = 2.0
    region_weight: float = 10.0
    top_fraction: float = 0.2


@dataclass(frozen=True)
class MethodOptions:
    """base_ratio: β in ``h = (1-β)·h_regional + β·h_base``; latent_reinit: LoRA-Composer's window search;
    regions_see_global: while injection applies, a region's image tokens also attend to the global prompt (off:
    only to their own region prompt, LoRA-Composer's concept injection)."""

    base_ratio: float = 0.2
    latent_reinit: bool = False
    refinement: RefinementOptions = RefinementOptions()
    region_threshold: float = 0.5
    regions_see_global: bool = False


def default_rules() -> tuple[RuleSchedule, ...]:
    """Injection and isolation in every block for the first 40% of sampling; base blending alongside."""
    return (RuleSchedule("injection", end_percent=0.4), RuleSchedule("isolation", end_percent=0.4),
            RuleSchedule("base_blend", end_percent=0.4))


@dataclass(frozen=True)
class Plan:
    """A whole regional composition. background: "global" | "isolated" | "shared" (see regional.py)."""

    global_prompt: str
    regions: tuple[Region, ...]
    background: str = "global"
    rules: tuple[RuleSchedule, ...] = field(default_factory=default_rules)
    options: MethodOptions = MethodOptions()

    def validate(self) -> "Plan":
        """Check every field; returns self so ``Plan(...).validate()`` chains. Raises :class:`PlanError`."""
        if self.background not in BACKGROUND_MODES:
            raise PlanError(f"plan.background: {self.background!r} is not one of {BACKGROUND_MODES}")
        if not 0.0 <= self.options.base_ratio <= 1.0:
            raise PlanError(f"plan.options.base_ratio: {self.options.base_ratio} is outside [0, 1]")
        if not 0.0 < self.options.region_threshold <= 1.0:
            raise PlanError(f"plan.options.region_threshold: {self.options.region_threshold} is outside (0, 1]")
        for items in (self.regions, self.rules):
            for i, item in enumerate(items):
                item.validate(i)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict with ``"version"``."""
        return {"version": PLAN_VERSION, "global_prompt": self.global_prompt,
                "regions": [_region_to_dict(r) for r in self.regions], "background": self.background,
                "rules": [_rule_to_dict(r) for r in self.rules],
                "options": asdict(self.options)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`; validates and raises :class:`PlanError` naming the bad field."""
        version = d.get("version")
        if version != PLAN_VERSION:
            raise PlanError(f"plan.version: unsupported version {version!r} (this build reads {PLAN_VERSION})")
        try:
            opts = dict(d.get("options", {}))
            refinement = RefinementOptions(**opts.pop("refinement", {}))
            options = MethodOptions(refinement=refinement, **opts)
        except TypeError as exc:
            raise PlanError(f"plan.options: {exc}") from exc
        regions = tuple(_region_from_dict(r, i) for i, r in enumerate(d.get("regions", [])))
        rules = default_rules() if d.get("rules") is None else \
            tuple(_rule_from_dict(r, i) for i, r in enumerate(d["rules"]))
        return Plan(global_prompt=str(d.get("global_prompt", "")), regions=regions,
                    background=str(d.get("background", "global")), rules=rules, options=options).validate()


def _region_to_dict(region: Region) -> dict[str, Any]:
    return {"prompt": region.prompt, "box": list(region.box) if region.box is not None else None,
            "box_units": region.box_units, "canvas_width": region.canvas_width,
            "canvas_height": region.canvas_height,
            "mask": region.mask.to_dict() if region.mask is not None else None,
            "adapters": [dict(vars(a)) for a in region.adapters], "options": dict(vars(region.options))}


def _region_from_dict(d: Mapping[str, Any], index: int) -> Region:
    try:
        adapters = tuple(AdapterRef(**a) for a in d.get("adapters", []))
        options = RegionOptions(**d.get("options", {}))
    except TypeError as exc:
        raise PlanError(f"{_where(index, 'adapters/options')}: {exc}") from exc
    box, mask = d.get("box"), d.get("mask")
    return Region(prompt=str(d.get("prompt", "")), box=tuple(float(v) for v in box) if box is not None else None,
                  box_units=str(d.get("box_units", "normalised")), canvas_width=d.get("canvas_width"),
                  canvas_height=d.get("canvas_height"), mask=RegionMask.from_dict(mask, index) if mask else None,
                  adapters=adapters, options=options)


def _rule_to_dict(rule: RuleSchedule) -> dict[str, Any]:
    return {"rule": rule.rule, "start_percent": rule.start_percent, "end_percent": rule.end_percent,
            **{name: sorted(b) if (b := getattr(rule, name)) is not None else None
               for name in ("double_blocks", "single_blocks")}}


def _rule_from_dict(d: Mapping[str, Any], index: int) -> RuleSchedule:
    def blocks(name: str) -> frozenset[int] | None:
        value = d.get(name)
        return frozenset(int(b) for b in value) if value is not None else None
    try:
        return RuleSchedule(rule=str(d["rule"]), double_blocks=blocks("double_blocks"),
                            single_blocks=blocks("single_blocks"),
                            start_percent=float(d.get("start_percent", 0.0)),
                            end_percent=float(d.get("end_percent", 1.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"plan.rules[{index}]: malformed rule ({exc})") from exc


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
    def from_lengths(global_length: int, region_lengths: Sequence[int]) -> "TextSpans":
        """Spans for ``[global | region_0 | region_1 | ...]`` concatenated in that order."""
        spans, start = [], global_length
        for length in region_lengths:
            spans.append(TokenSpan(start, start + int(length)))
            start += int(length)
        return TextSpans(TokenSpan(0, int(global_length)), tuple(spans), start).validate()

    def validate(self) -> "TextSpans":
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
