"""Attention rules of regional composition (LoRA-Composer ported to Flux joint attention).

The joint sequence is ``[text | image]`` (``image_first=True`` for models built with ``flipped_img_txt``); the
text part is ``[global prompt | region_0 prompt | region_1 prompt | ...]`` as described by :class:`TextSpans`.
Every token gets a *group* id; an ``allowed[query_group, key_group]`` bool matrix says who may attend to whom.
The kernels in :mod:`lora_loom.kernels.joint_attention` consume ``(labels [L], allowed [G, G])``.

Group ids (G = 2 + 2·N for N regions):
    0 = global text, 1 = background image, 2 + 2k = region-k text, 3 + 2k = region-k image.

Rules, with *injection* on:
    global text   -> global text, every image token (it describes the whole canvas);
    region-k text -> region-k text and region-k image only;
    region-k image-> region-k text (and global text with ``options.regions_see_global``), no other prompt;
    background img-> global text (``background="shared"``: also every region prompt).
With injection off every query sees every text token, and text queries see everything.
With *isolation* on: region-k image <-> region-j image is forbidden for j != k; background image tokens
    ``"global"``/``"shared"``: see and are seen by every region; ``"isolated"``: background <-> background only.
    A region with ``options.isolate=False`` sees and is seen by all image tokens.
With isolation off every image token sees every image token.

Overlaps: an image token belongs to the region with the largest soft coverage (ties -> lowest region
index) if that coverage is at least ``plan.options.region_threshold``; otherwise it is background. The soft
coverage itself still scales that region's adapters (see :func:`region_token_weights`), so overlapping
regions blend their LoRAs while attention stays a clean partition.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .plan import Plan, PlanError, TextSpans

logger = logging.getLogger(__name__)

GLOBAL_TEXT = 0
BACKGROUND_IMAGE = 1
BLOCK_TYPES = ("double", "single")


def region_text_group(k: int) -> int:
    """Group id of region k's prompt tokens."""
    return 2 + 2 * k


def region_image_group(k: int) -> int:
    """Group id of region k's image tokens."""
    return 3 + 2 * k


def group_count(n_regions: int) -> int:
    """Number of groups G for ``n_regions`` regions."""
    return 2 + 2 * n_regions


@dataclass(frozen=True)
class ActiveRules:
    """Which rules are on for one (block, step)."""

    injection: bool
    isolation: bool
    base_blend: bool

    @property
    def any(self) -> bool:
        return self.injection or self.isolation


def rule_applies(plan: Plan, rule: str, block_type: str, block_index: int, percent: float) -> bool:
    """True if any schedule entry for ``rule`` covers this block and sampling percent (0 = start, 1 = end)."""
    if block_type not in BLOCK_TYPES:
        raise PlanError(f"rule_applies: block_type {block_type!r} is not one of {BLOCK_TYPES}")
    for schedule in plan.rules:
        if schedule.rule != rule:
            continue
        blocks = schedule.double_blocks if block_type == "double" else schedule.single_blocks
        if blocks is not None and block_index not in blocks:
            continue
        inside = schedule.start_percent <= percent < schedule.end_percent or \
            (schedule.end_percent >= 1.0 and percent >= 1.0 and schedule.start_percent <= percent)
        if inside:
            return True
    return False


def active_rules(plan: Plan, block_type: str, block_index: int, percent: float) -> ActiveRules:
    """All three rule switches for one block at one sampling percent."""
    return ActiveRules(*(rule_applies(plan, name, block_type, block_index, percent)
                         for name in ("injection", "isolation", "base_blend")))


def _assign_regions(token_masks: torch.Tensor, threshold: float) -> torch.Tensor:
    """Hard region index per image token from soft masks ``[N, L_img]``; -1 = background. Returns ``[L_img]``."""
    if token_masks.shape[0] == 0:
        return torch.full((token_masks.shape[1],), -1, dtype=torch.long)
    best_value, best_index = token_masks.max(dim=0)  # ties: first (lowest) index
    return torch.where(best_value >= threshold, best_index, torch.full_like(best_index, -1))


def label_joint_sequence(plan: Plan, token_masks: torch.Tensor, spans: TextSpans, image_first: bool = False,
                         n_image_tokens: int | None = None) -> torch.Tensor:
    """Group id of every token of the joint sequence: ``[L]`` int64, ``L = spans.total + L_img``.

    token_masks: ``[N, L_img_grid]`` or ``[N, B, L_img_grid]`` (labels are shared across the batch, so every
    batch item must give the same hard assignment). n_image_tokens: total image tokens if larger than the
    grid (e.g. Kontext reference latents appended after it); the extra tokens are labelled background.
    """
    n = len(plan.regions)
    if token_masks.ndim == 3:
        assigned = [_assign_regions(token_masks[:, b], plan.options.region_threshold)
                    for b in range(token_masks.shape[1])]
        if any(not torch.equal(assigned[0], a) for a in assigned[1:]):
            raise PlanError("token_masks: batch items assign tokens to different regions; "
                            "labels are shared across the batch, so run them one batch item at a time")
        regions = assigned[0]
    elif token_masks.ndim == 2:
        regions = _assign_regions(token_masks, plan.options.region_threshold)
    else:
        raise PlanError(f"token_masks: expected [N, L_img] or [N, B, L_img], got {tuple(token_masks.shape)}")
    if token_masks.shape[0] != n or len(spans.region_spans) != n:
        raise PlanError(f"token_masks/spans: {token_masks.shape[0]} masks and {len(spans.region_spans)} text "
                        f"spans for {n} regions")
    spans.validate()
    extra = 0 if n_image_tokens is None else n_image_tokens - regions.shape[0]
    if extra < 0:
        raise PlanError(f"n_image_tokens {n_image_tokens} is smaller than the token grid {regions.shape[0]}")
    image = torch.where(regions >= 0, 3 + 2 * regions, torch.full_like(regions, BACKGROUND_IMAGE))
    image = torch.cat([image.cpu(), torch.full((extra,), BACKGROUND_IMAGE, dtype=torch.long)])
    text = torch.full((spans.total,), GLOBAL_TEXT, dtype=torch.long)
    for k, span in enumerate(spans.region_spans):
        text[span.start:span.end] = region_text_group(k)
    return torch.cat([image, text]) if image_first else torch.cat([text, image])


def allowed_groups(plan: Plan, rules: ActiveRules) -> torch.Tensor:
    """The ``allowed[query_group, key_group]`` bool matrix ``[G, G]`` for the active rules (see module doc)."""
    n = len(plan.regions)
    g = group_count(n)
    allowed = torch.ones(g, g, dtype=torch.bool)
    texts = [GLOBAL_TEXT] + [region_text_group(k) for k in range(n)]
    images = [BACKGROUND_IMAGE] + [region_image_group(k) for k in range(n)]
    if rules.injection:
        for q in texts + images:
            for key in texts:
                allowed[q, key] = False
        allowed[GLOBAL_TEXT, GLOBAL_TEXT] = True
        allowed[BACKGROUND_IMAGE, GLOBAL_TEXT] = True
        for k in range(n):
            tk, ik = region_text_group(k), region_image_group(k)
            allowed[tk, :] = False
            allowed[tk, tk] = allowed[tk, ik] = True
            allowed[ik, tk] = True
            allowed[ik, GLOBAL_TEXT] = plan.options.regions_see_global
            if plan.background == "shared":
                allowed[BACKGROUND_IMAGE, tk] = True
    if rules.isolation:
        background_open = plan.background in ("global", "shared")
        for k in range(n):
            ik = region_image_group(k)
            allowed[ik, BACKGROUND_IMAGE] = allowed[BACKGROUND_IMAGE, ik] = background_open
            for j in range(n):
                if j != k and plan.regions[k].options.isolate and plan.regions[j].options.isolate:
                    allowed[ik, region_image_group(j)] = False
            if not plan.regions[k].options.isolate:
                allowed[ik, images] = True
                allowed[images, ik] = True
    return allowed


def base_allowed(plan: Plan, regional: torch.Tensor) -> torch.Tensor:
    """Allowed matrix ``[G, G]`` of the *base* pass for base-ratio blending.

    Global text and every image query attend to the global prompt and all image tokens (no region prompts,
    no isolation); region-prompt queries keep their regional rows, so blending leaves them unchanged.
    """
    n = len(plan.regions)
    base = regional.clone()
    keys = torch.zeros(group_count(n), dtype=torch.bool)
    keys[[GLOBAL_TEXT, BACKGROUND_IMAGE] + [region_image_group(k) for k in range(n)]] = True
    for q in [GLOBAL_TEXT, BACKGROUND_IMAGE] + [region_image_group(k) for k in range(n)]:
        base[q] = keys
    return base


def blend_base(h_regional: torch.Tensor, h_base: torch.Tensor, beta: float) -> torch.Tensor:
    """Base-ratio blending ``(1 - beta)·h_regional + beta·h_base`` for any matching shapes (e.g. ``[B, L, C]``)."""
    if h_regional.shape != h_base.shape:
        raise PlanError(f"blend_base: shapes differ {tuple(h_regional.shape)} vs {tuple(h_base.shape)}")
    if not 0.0 <= beta <= 1.0:
        raise PlanError(f"blend_base: beta {beta} is outside [0, 1]")
    if beta == 0.0:
        return h_regional
    return torch.lerp(h_regional, h_base.to(h_regional.dtype), beta)


def region_text_weights(plan: Plan, spans: TextSpans, global_text: bool = False) -> torch.Tensor:
    """Per text token per region weight ``[T, N]`` float32: region-k prompt tokens carry 1 for region k; with
    ``global_text`` the global prompt's tokens carry 1 for every region (the global prompt names every concept, so
    its words are read with every region's adapters, as a merged stack would read them); everything else 0."""
    text = torch.zeros(spans.total, len(plan.regions))
    for k, span in enumerate(spans.region_spans):
        text[span.start:span.end, k] = 1.0
        if global_text:
            text[spans.global_span.start:spans.global_span.end, k] = 1.0
    return text


def region_token_weights(plan: Plan, token_masks: torch.Tensor, spans: TextSpans, image_first: bool = False,
                         n_image_tokens: int | None = None, global_text: bool = False,
                         composed: Sequence[bool] | None = None, text_length: int | None = None) -> torch.Tensor:
    """Per-token per-region weight over the joint sequence: ``[B, T + L_img, N]`` float32 in [0, 1].

    Image tokens carry the soft coverage of each region (``token_masks [N, B, L_img]``), extra image tokens 0. Text
    tokens of the batch entries that carry the composed prompt (``composed[b]``, default all) carry
    :func:`region_text_weights`; other entries' text (an uncond, another prompt) carries 0, over ``text_length``
    tokens (default ``spans.total``; another length only when no entry is composed).
    Multiply by each adapter's strength to get ``token_scale`` for :func:`kernels.multi_lora.masked_multi_lora`;
    slice ``[:, :T]`` / ``[:, T:]`` for the text / image streams of double blocks.
    """
    if token_masks.ndim != 3:
        raise PlanError(f"token_masks: expected [N, B, L_img], got {tuple(token_masks.shape)}")
    n, batch, grid = token_masks.shape
    composed = tuple(composed) if composed is not None else (True,) * batch
    length = spans.total if text_length is None else int(text_length)
    if any(composed) and length != spans.total:
        raise PlanError(f"composed entries with text length {length}, the plan has {spans.total}")
    extra = 0 if n_image_tokens is None else n_image_tokens - grid
    image = torch.cat([token_masks.permute(1, 2, 0).float(), torch.zeros(batch, max(extra, 0), n)], dim=1)
    text = torch.zeros(batch, length, n)
    if any(composed):
        text[torch.tensor(composed)] = region_text_weights(plan, spans, global_text)
    return torch.cat([image, text], dim=1) if image_first else torch.cat([text, image], dim=1)
