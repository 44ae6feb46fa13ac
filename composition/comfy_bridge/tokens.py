"""Prompts through the workflow's CLIP, and which of their tokens carry content or name a concept, by ComfyUI's
own tokenizers (CLIP-L's ``SDTokenizer``, T5-XXL's in Flux): one encoder for Loom Compose and Loom CLoRA.

``clip.tokenizer`` is an ``SD1Tokenizer`` (``clip_l``), a ``FluxTokenizer`` (``clip_l`` + ``t5xxl``) or similar;
its ``tokenize_with_weights(text)`` returns ``{key: [[(id, weight), ...] per chunk]}``. The conditioning Flux
reads is the encoder whose flat token count equals the context length (T5 on Flux, CLIP-L on the demo model).
Words come from ComfyUI's own weight parser (``token_weights``) and are tokenised one by one with the key's
HF tokenizer, then aligned (pure code in :mod:`lora_loom.composition.concept_tokens`). Content tokens are those that
are not the encoder's start, end or padding token (``special_ids``).
"""
from __future__ import annotations

import logging
from typing import Any

import comfy.sd1_clip

from ..concept_tokens import (
    ConceptTokenError,
    PromptWord,
    concept_positions,
    content_positions,
    parse_token_override,
    split_words,
    word_token_positions,
)
from ..prompts import EncodedPrompt

logger = logging.getLogger(__name__)

KEY_PREFERENCE = ("t5xxl", "l", "g")


def sd_tokenizer(tokenizer: Any, key: str) -> Any:
    """The ``SDTokenizer`` behind ``key`` (``"l"`` -> ``clip_l``, ``"t5xxl"`` -> ``t5xxl``)."""
    for name in (key, f"clip_{key}"):
        found = getattr(tokenizer, name, None)
        if found is not None and hasattr(found, "tokenizer"):
            return found
    if hasattr(tokenizer, "tokenizer") and getattr(tokenizer, "embedding_key", None) in (key, f"clip_{key}"):
        return tokenizer
    raise ConceptTokenError(f"tokenizer {type(tokenizer).__name__} has no encoder {key!r}")


def flat_ids(tokens: dict, key: str) -> list[Any]:
    """Token ids of ``key`` with chunks concatenated (the context's text axis) ``[T]``."""
    return [item[0] for chunk in tokens[key] for item in chunk]


def context_key(tokens: dict, length: int) -> str:
    """The encoder whose flat token count is the context length ``length`` (T5 preferred when both match)."""
    matches = [k for k in tokens if len(flat_ids(tokens, k)) == length]
    if not matches:
        raise ConceptTokenError(f"no encoder's token count matches the context length {length} "
                                f"(have {{{', '.join(f'{k}: {len(flat_ids(tokens, k))}' for k in tokens)}}})")
    return sorted(matches, key=lambda k: KEY_PREFERENCE.index(k) if k in KEY_PREFERENCE else 99)[0]


def special_ids(sd_tok: Any) -> set[int]:
    return {t for t in (sd_tok.start_token, sd_tok.end_token, sd_tok.pad_token) if isinstance(t, int)}


def prompt_words(tokenizer: Any, key: str, text: str, tokens: dict | None = None) -> list[PromptWord]:
    """Every word of ``text`` with its absolute token positions in the ``key`` encoder's flat token list."""
    sd_tok = sd_tokenizer(tokenizer, key)
    tokens = tokens if tokens is not None else tokenizer.tokenize_with_weights(text)
    segments = [comfy.sd1_clip.unescape_important(s) for s, _ in
                comfy.sd1_clip.token_weights(comfy.sd1_clip.escape_important(text), 1.0)]
    words = split_words(segments)
    end = -1 if sd_tok.tokenizer_adds_end_token else None
    word_ids = [list(sd_tok.tokenizer(w)["input_ids"][sd_tok.tokens_start:end]) for w in words]
    return word_token_positions(flat_ids(tokens, key), special_ids(sd_tok), words, word_ids, text)


def find_concept(tokenizer: Any, key: str, text: str, concept: str, override: str = "",
                 tokens: dict | None = None) -> tuple[int, ...]:
    """Absolute token positions of ``concept`` in ``text`` for encoder ``key``; ``override`` (content-token
    indices such as ``"2,3"``) replaces the word search."""
    tokens = tokens if tokens is not None else tokenizer.tokenize_with_weights(text)
    if override.strip():
        sd_tok = sd_tokenizer(tokenizer, key)
        return parse_token_override(override, flat_ids(tokens, key), special_ids(sd_tok), text)
    return concept_positions(prompt_words(tokenizer, key, text, tokens), concept, text)


def encode(clip: Any, text: str) -> tuple[EncodedPrompt, dict, str | None]:
    """``text`` through ``clip``: the encoded prompt (content tokens by the tokenizer of the encoder whose token
    count is the context length; unknown when none matches), the tokenizer's output and that encoder's key."""
    tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    context = out.pop("cond")
    extra = {k: v for k, v in out.items() if k != "attention_mask"}
    try:
        key = context_key(tokens, int(context.shape[1]))
        special = special_ids(sd_tokenizer(clip.tokenizer, key))
    except ConceptTokenError:
        return EncodedPrompt(text, context, extra), tokens, None
    content = tuple(content_positions(flat_ids(tokens, key), special, strict=False))
    return EncodedPrompt(text, context, extra, content), tokens, key
