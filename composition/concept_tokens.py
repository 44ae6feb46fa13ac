"""Concept words -> token positions of an encoded prompt (CLoRA's concept tokens, found automatically).

A prompt is tokenised by the text encoder's own tokenizer into a flat list of token ids ``[T]`` (start, end and
padding tokens included, chunks concatenated as ComfyUI concatenates them along the text axis). The prompt's
words are the whitespace-separated words of its weighted segments (``"a (red fox:1.2)"`` -> segments ``"a "``,
``"red fox"`` -> words ``a``, ``red``, ``fox``). Each word is tokenised alone by the same tokenizer; for CLIP's BPE
and T5's SentencePiece the prompt's content tokens are exactly those words' tokens in order (neither crosses
whitespace), so word ``w`` owns a contiguous run of positions. :func:`word_token_positions` checks that and raises
:class:`ConceptTokenError` when it does not hold, rather than guessing.

A concept is one or more words (``"red fox"``); :func:`concept_positions` returns the positions of every
occurrence of that word sequence (words compared case-insensitively, surrounding punctuation ignored), so a
repeated word contributes all its tokens and a multi-token word all of its pieces.

Power users may override with explicit content-token indices (``"2,3"``: 0 = the first non-special token), see
:func:`parse_token_override`.
"""
from __future__ import annotations

import logging
import string
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_PUNCTUATION = string.punctuation + "“”‘’«»…"


class ConceptTokenError(ValueError):
    """A concept word is missing from its prompt, or the tokens cannot be mapped to words; names both."""


@dataclass(frozen=True)
class PromptWord:
    """One word of a prompt: its text and the absolute token positions it owns in the flat token list."""

    text: str
    positions: tuple[int, ...]

    @property
    def key(self) -> str:
        return normalise_word(self.text)


def normalise_word(word: str) -> str:
    """Case-folded word without surrounding punctuation (``"Fox,"`` -> ``"fox"``)."""
    return word.strip().strip(_PUNCTUATION).casefold()


def split_words(segments: Sequence[str]) -> list[str]:
    """Whitespace-separated words of the prompt's weighted segments, in order."""
    return [w for segment in segments for w in segment.split()]


def content_positions(token_ids: Sequence[object], special_ids: set[int], strict: bool = True) -> list[int]:
    """Positions ``[T_content]`` of tokens that are not start/end/padding in the flat list ``token_ids [T]``.

    A token that is not an int (a textual-inversion embedding vector) is content; ``strict`` refuses it instead
    (words cannot be mapped to it)."""
    out = []
    for i, t in enumerate(token_ids):
        if not isinstance(t, int) and strict:
            raise ConceptTokenError(f"token {i} is an embedding vector, not a token id: prompts with "
                                    f"textual-inversion embeddings cannot be mapped to concept words")
        if not isinstance(t, int) or t not in special_ids:
            out.append(i)
    return out


def word_token_positions(token_ids: Sequence[int], special_ids: set[int], words: Sequence[str],
                         word_ids: Sequence[Sequence[int]], prompt: str = "") -> list[PromptWord]:
    """Align each word's own token ids ``word_ids[w]`` with the prompt's content tokens.

    token_ids: the flat token list ``[T]``; words/word_ids: the prompt's words and each one tokenised alone
    (without start/end tokens). Returns one :class:`PromptWord` per word. A prompt longer than the encoder keeps
    (truncation) leaves the last words without positions (empty tuples)."""
    if len(words) != len(word_ids):
        raise ConceptTokenError(f"prompt {prompt!r}: {len(words)} words but {len(word_ids)} tokenised words")
    content = content_positions(token_ids, special_ids)
    out, cursor = [], 0
    for word, ids in zip(words, word_ids):
        ids = list(ids)
        take = content[cursor:cursor + len(ids)]
        found = [token_ids[p] for p in take]
        if found != ids[:len(found)]:
            raise ConceptTokenError(
                f"prompt {prompt!r}: word {word!r} tokenises to {ids} alone but the prompt has {found} at token "
                f"positions {take}; this tokenizer splits across words, give the token indices explicitly")
        out.append(PromptWord(word, tuple(take)))
        cursor += len(take)
    if cursor != len(content):
        raise ConceptTokenError(f"prompt {prompt!r}: {len(content) - cursor} content tokens are not explained by "
                                f"its words (an embedding or unusual text?); give the token indices explicitly")
    return out


def concept_positions(words: Sequence[PromptWord], concept: str, prompt: str = "") -> tuple[int, ...]:
    """Token positions of every occurrence of the word sequence ``concept`` (``"red fox"``) in ``words``.

    Raises :class:`ConceptTokenError` naming the prompt and the concept when it does not occur."""
    wanted = [normalise_word(w) for w in concept.split() if normalise_word(w)]
    if not wanted:
        raise ConceptTokenError(f"prompt {prompt!r}: empty concept {concept!r} (name the concept's word(s))")
    keys = [w.key for w in words]
    positions: list[int] = []
    for start in range(len(keys) - len(wanted) + 1):
        if keys[start:start + len(wanted)] == wanted:
            for w in words[start:start + len(wanted)]:
                positions.extend(w.positions)
    if not positions:
        raise ConceptTokenError(f"concept {concept!r} is not in the prompt {prompt!r} (words: "
                                f"{[w.text for w in words]}); put the word in the prompt or change the concept")
    return tuple(sorted(set(positions)))


def parse_token_override(text: str, token_ids: Sequence[int], special_ids: set[int],
                         prompt: str = "") -> tuple[int, ...]:
    """Explicit concept tokens: ``"2,3"`` / ``"2 3"`` / ``"2-4"`` are content-token indices (0 = first
    non-special token); returns absolute positions in ``token_ids``. Errors name the prompt and the item."""
    content = content_positions(token_ids, special_ids)
    chosen: list[int] = []
    for item in text.replace(",", " ").split():
        low, _, high = item.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError as exc:
            raise ConceptTokenError(f"token indices {text!r}: cannot read {item!r} (write e.g. '2,3' or '2-4')") \
                from exc
        if first < 0 or last < first or last >= len(content):
            raise ConceptTokenError(f"token indices {text!r}: {item!r} is outside the {len(content)} content "
                                    f"tokens of the prompt {prompt!r}")
        chosen.extend(content[i] for i in range(first, last + 1))
    if not chosen:
        raise ConceptTokenError(f"token indices {text!r}: no index given for the prompt {prompt!r}")
    return tuple(sorted(set(chosen)))
