"""Regional composition (LoRA-Composer on Flux) as a runtime controller: one group per region.

Per call the controller finds which batch entries carry its composed prompt (same length and values; others — an
uncond, a zeroed negative, another prompt batched alongside — run plain attention and get the region adapters on
image tokens only, as a merged LoRA would give the uncond its LoRA), and builds the call's :class:`CallLayout`
from the latent's size (masks are resized at sampling time): per-token region weights
(:func:`~..regional.region_token_weights`) and, per group of entries sharing a labelling, the joint sequence's
attention labels (:func:`~..regional.label_joint_sequence`) that :class:`~.regional_attention.RegionalAttention`
turns into rules. Regions' entries may carry gate schedules and learned gates (read by the runtime).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...bounded_cache import BoundedCache
from ..plan import Plan, PlanError, region_token_masks
from ..prompts import EncodedPrompt
from ..regional import label_joint_sequence, region_token_weights
from ..stack import StackEntry
from .core import Call, Controller, TokenState
from .regional_attention import RegionalAttention

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallLayout:
    """Per (latent size, batch, which entries are composed): weights per stream ``[B, L, N]`` (float32),
    attention chunks ``(batch_index [b] or None, labels [L] or None)``, grid size and active regions."""

    text_length: int
    image_tokens: int
    grid: tuple[int, int]
    weights: dict
    chunks: tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...]
    active: frozenset[int]
    composed: tuple[bool, ...]


@dataclass(frozen=True)
class RegionalState(TokenState):
    """A regional pass: the token state plus its layout (for the attention rules and probes)."""

    layout: CallLayout


class RegionalController(RegionalAttention, Controller):
    """``plan`` (regions and :class:`~..plan.ComposeOptions`), the composed ``prompt`` (:func:`~..prompts.concatenate`,
    its ``spans`` and region ``concepts``), ``entries[k]``: region k's stack entries. ``probe``: an observer of every
    block's q, k (latent re-initialisation, refinement) or None."""

    name = "Loom Compose"
    batched = True

    def __init__(self, plan: Plan, prompt: EncodedPrompt, entries: Sequence[Sequence[StackEntry]],
                 patch_size: int = 2, wrappers: Callable[[Any, Any], dict] | None = None) -> None:
        super().__init__(entries, wrappers)
        if prompt.spans is None or len(prompt.spans.region_spans) != len(plan.regions):
            raise PlanError(f"regional composition: the prompt has no span for each of the {len(plan.regions)} regions")
        self.plan = plan.validate()
        self.options = plan.options
        self.prompt = prompt
        self.patch_size = patch_size
        self.probe: Any = None
        self._layouts: BoundedCache[tuple, CallLayout] = BoundedCache("regional layouts", max_entries=16)
        self._contexts: BoundedCache[tuple, torch.Tensor] = BoundedCache("composed prompts by device", max_entries=8)
        self._allowed = BoundedCache("regional attention rules", max_entries=8)  # one per rule state
        self._masks = BoundedCache("regional additive masks", max_entries=4)

    def composed_entries(self, context: torch.Tensor | None) -> tuple[bool, ...]:
        """Which batch entries of ``context [B, T, C]`` are the composed prompt."""
        mine = self.prompt.context
        if context is None or context.shape[1] != mine.shape[1] or context.shape[2] != mine.shape[2]:
            return (False,) * (0 if context is None else context.shape[0])
        key = (str(context.device), context.dtype)
        cast = self._contexts.get(key)
        if cast is None:
            cast = self._contexts.put(key, mine[0].to(device=context.device, dtype=context.dtype))
        return tuple(bool(torch.equal(context[b], cast)) for b in range(context.shape[0]))

    def layout_for(self, h: int, w: int, batch: int, chunks: int, extra_tokens: int, composed: tuple[bool, ...],
                   device: torch.device, text_length: int | None = None) -> CallLayout:
        """Layout of one call; ``text_length`` is this call's context length (the plan's when None): an
        uncond of another length runs in its own call with no composed entry."""
        spans = self.prompt.spans
        text_length = spans.total if text_length is None else int(text_length)
        key = (h, w, batch, chunks, extra_tokens, composed, str(device), text_length)
        cached = self._layouts.get(key)
        if cached is not None:
            return cached
        p = self.patch_size
        latent_batch = max(1, batch // max(1, chunks))
        masks = region_token_masks(self.plan, h, w, p, latent_batch)  # [N, Bl, grid]
        n, grid = masks.shape[0], masks.shape[2]
        latent_index = torch.arange(batch) % latent_batch
        joint = region_token_weights(self.plan, masks[:, latent_index], spans, n_image_tokens=grid + extra_tokens,
                                     global_text=self.options.global_text_adapters, composed=composed,
                                     text_length=text_length).to(device)
        weights = {"joint": joint, "txt": joint[:, :text_length].contiguous(),
                   "img": joint[:, text_length:].contiguous()}
        groups: dict[bytes, list[int]] = {}
        labels_of: dict[bytes, torch.Tensor] = {}
        for b in (b for b in range(batch) if composed[b]):
            labels = label_joint_sequence(self.plan, masks[:, int(latent_index[b])], spans,
                                          n_image_tokens=grid + extra_tokens)
            signature = labels.numpy().tobytes()
            groups.setdefault(signature, []).append(b)
            labels_of[signature] = labels
        plain = [b for b in range(batch) if not composed[b]]
        chunk_list: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        if plain:
            chunk_list.append((torch.tensor(plain, device=device), None))
        for sig, members in groups.items():
            chunk_list.append((torch.tensor(members, device=device), labels_of[sig].to(device)))
        if len(chunk_list) == 1:
            chunk_list = [(None, chunk_list[0][1])]
        active = frozenset(k for k in range(n) if float(masks[k].max()) > 0.0)
        layout = CallLayout(text_length, grid + extra_tokens, (-(-h // p), -(-w // p)), weights,
                            tuple(chunk_list), active, composed)
        return self._layouts.put(key, layout)

    def state(self, call: Call) -> RegionalState:
        x, p = call.x, self.patch_size
        composed = self.composed_entries(call.context)
        if not any(composed):
            logger.debug("regional composition: no batch entry carries the composed prompt; adapters on image "
                         "tokens only, plain attention")
        extra = sum((-(-r.shape[-2] // p)) * (-(-r.shape[-1] // p)) for r in (call.kwargs.get("ref_latents") or []))
        chunks = len(call.options.get("cond_or_uncond") or [1])
        text_length = int(call.context.shape[1]) if call.context is not None else self.prompt.spans.total
        layout = self.layout_for(int(x.shape[-2]), int(x.shape[-1]), int(x.shape[0]), chunks, extra,
                                 composed or (False,) * x.shape[0], x.device, text_length)
        return RegionalState(layout.weights, layout.active, call.percent, layout)


__all__ = ["CallLayout", "RegionalController", "RegionalState"]
