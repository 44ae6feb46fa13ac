"""Encoded prompts as the composition methods read them, and Loom Compose's concatenation of several into one.

An :class:`EncodedPrompt` is what the workflow's CLIP made of one prompt (``comfy_bridge/tokens.py`` encodes it):
the text conditioning, the encoder's other outputs, which token positions carry content (not start/end/padding,
by the tokenizer's own special ids) and, per adapter group, the positions of the tokens that name it. CLoRA reads
a prompt's concept words; Loom Compose reads its composed prompt ``[global | region_0 | region_1 | ...]``
(:func:`concatenate`, RoPE-neutral on Flux since text position ids are zero), whose groups are the regions.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .plan import TextSpans

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedPrompt:
    """``context [1, T, C]``; ``extra``: the encoder's other outputs (``pooled_output`` ...); ``content``: positions
    of the content tokens (None: the tokenizer did not tell); ``concepts``: group -> absolute token positions of
    what it paints; ``spans``: where each prompt of a composed prompt sits (None for a single prompt)."""

    text: str
    context: torch.Tensor
    extra: Mapping = field(default_factory=dict)
    content: tuple[int, ...] | None = None
    concepts: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    spans: TextSpans | None = None

    @property
    def pooled(self) -> torch.Tensor | None:
        return self.extra.get("pooled_output")

    @property
    def length(self) -> int:
        return int(self.context.shape[1])

    def trimmed(self) -> EncodedPrompt:
        """Without the padding after the last content token's end token (the whole prompt when content is unknown)."""
        if not self.content:
            return self
        keep = min(self.length, max(self.content) + 2)
        return EncodedPrompt(self.text, self.context[:, :keep], self.extra, self.content, self.concepts, self.spans)


def concatenate(global_prompt: EncodedPrompt, region_prompts: Sequence[EncodedPrompt],
                trim_regions: bool = False) -> EncodedPrompt:
    """``[global | region_0 | ...]`` along the token axis with the global prompt's ``extra``; region k's concept is
    its content tokens (all its tokens when unknown); with ``trim_regions`` region prompts lose their padding."""
    regions = [p.trimmed() if trim_regions else p for p in region_prompts]
    spans = TextSpans.from_lengths(global_prompt.length, [p.length for p in regions])
    concepts = {k: tuple(span.start + i for i in (p.content or range(p.length)))
                for k, (p, span) in enumerate(zip(regions, spans.region_spans))}
    context = torch.cat([global_prompt.context, *(p.context for p in regions)], dim=1)
    text = " | ".join(p.text for p in [global_prompt, *regions])
    return EncodedPrompt(text, context, dict(global_prompt.extra), None, concepts, spans)


__all__ = ["EncodedPrompt", "concatenate"]
