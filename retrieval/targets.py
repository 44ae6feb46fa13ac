"""What a LoRA file targets and what a model offers, read from safetensors headers alone (tensor shapes and key
names, never tensor data), and whether the two fit: the check the library panel and the stack editor make
before Run, so a LoRA for another model is flagged instead of failing with a shape mismatch while sampling.

A Flux LoRA's low-rank ``down`` factors are ``[r, d_in]``; most targeted layers (qkv, proj, mlp.0, modulation,
linear1) read the hidden width, so the most common ``d_in`` is the hidden size. Block indices in the key names
give the deepest double / single block the file touches.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

FLUX = "flux"
_DOWN = re.compile(r"(lora_down|lora_A|\.down)(\.default)?\.weight$")
_FLUX_KEY = re.compile(r"double_blocks|single_blocks|transformer_blocks|^blocks\.\d+\.")
_DOUBLE = re.compile(r"(?:^|[._])(?:double_blocks|(?<!single_)transformer_blocks)[._](\d+)[._]")
_SINGLE = re.compile(r"(?:^|[._])(?:single_blocks|single_transformer_blocks)[._](\d+)[._]")
_TEXT_ENCODER = re.compile(r"^(lora_te\d?_|text_encoders?\.|lora_te_)")


@dataclass(frozen=True)
class Targets:
    """A LoRA's reach (``hidden`` its width, ``double_blocks``/``single_blocks`` one past the deepest block it
    touches) or a model's size (its width and block counts). ``architecture`` is ``""`` when unknown."""

    architecture: str = ""
    hidden: int | None = None
    double_blocks: int = 0
    single_blocks: int = 0

    @property
    def known(self) -> bool:
        """Whether the width is known (else nothing can be said about fitting)."""
        return bool(self.architecture) and self.hidden is not None

    def describe(self) -> str:
        """``Flux, hidden 192, 2 double + 2 single blocks`` (or ``unknown``)."""
        if not self.known:
            return "unknown"
        return (f"{self.architecture.capitalize()}, hidden {self.hidden}, {self.double_blocks} double + "
                f"{self.single_blocks} single blocks")


@dataclass(frozen=True)
class Fit:
    """Whether a LoRA fits a model: ``ok`` is ``None`` when either side is unknown; ``reason`` in words."""

    ok: bool | None
    reason: str


def _deepest(pattern: re.Pattern[str], keys: Iterable[str]) -> int:
    found = [int(m.group(1)) for key in keys for m in [pattern.search(key)] if m]
    return max(found) + 1 if found else 0


def lora_targets(shapes: Mapping[str, tuple[int, ...]]) -> Targets:
    """What a LoRA file targets, from its tensor names and shapes (``header.tensors``' name → shape)."""
    unet = {k: s for k, s in shapes.items() if not _TEXT_ENCODER.match(k)}
    if not any(_FLUX_KEY.search(k) for k in unet):
        return Targets()
    widths = Counter(s[1] for k, s in unet.items() if _DOWN.search(k) and len(s) == 2)
    hidden = widths.most_common(1)[0][0] if widths else None
    return Targets(architecture=FLUX, hidden=hidden, double_blocks=_deepest(_DOUBLE, unet),
                   single_blocks=_deepest(_SINGLE, unet))


def model_targets(shapes: Mapping[str, tuple[int, ...]]) -> Targets:
    """A Flux diffusion model's width and block counts from its weights' names and shapes (any prefix, e.g.
    ``model.diffusion_model.``); ``Targets()`` for anything that is not a Flux."""
    img_in = next((s for k, s in shapes.items() if k.endswith("img_in.weight") and len(s) == 2), None)
    if img_in is None:
        return Targets()
    return Targets(architecture=FLUX, hidden=int(img_in[0]), double_blocks=_deepest(_DOUBLE, shapes),
                   single_blocks=_deepest(_SINGLE, shapes))


def fit(lora: Targets, model: Targets) -> Fit:
    """Whether ``lora`` can be applied to ``model``: same architecture and width, blocks within the model's."""
    if not lora.known or not model.known:
        return Fit(None, "cannot tell: " + ("the LoRA's" if not lora.known else "the model's") + " shapes are unknown")
    if lora.architecture != model.architecture:
        return Fit(False, f"made for {lora.architecture}, the model is {model.architecture}")
    if lora.hidden != model.hidden:
        return Fit(False, f"made for a {lora.architecture.capitalize()} of width {lora.hidden}; "
                          f"the model's width is {model.hidden}")
    if lora.double_blocks > model.double_blocks or lora.single_blocks > model.single_blocks:
        return Fit(False, f"touches {lora.double_blocks} double / {lora.single_blocks} single blocks; the model has "
                          f"{model.double_blocks} / {model.single_blocks}")
    return Fit(True, f"fits ({model.describe()})")
