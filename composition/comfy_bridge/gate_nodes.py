"""What the gate nodes call: build ``LOOM_GATE`` values, load learned-gate checkpoints, import prompt
schedules (with timed CONDITIONING), and draw the strength-over-steps preview.

``LOOM_GATE`` is a tuple of :class:`~..adapter_gate.AdapterGate`; every builder appends to an optional
incoming tuple so gate nodes chain. Learned-gate checkpoints live in ComfyUI's ``models/loom_gates`` folder
(registered here as the ``loom_gates`` folder name, ``.safetensors`` only).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import folder_paths
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ...bounded_cache import BoundedCache, tensor_bytes
from ...files.folders import OutsideFoldersError
from ..adapter_gate import AdapterGate, parse_keyframes, schedule_samples
from ..block_weights import BlockWeights, parse_block_weights
from ..gates import INTERPOLATIONS, GateError, GateSchedule
from ..learned_gate import LearnedGates, load_learned_gates
from ..prompt_schedule import parse_prompt_schedule
from .model_files import model_file

logger = logging.getLogger(__name__)

GATE_FOLDER = "loom_gates"
PLOT_COLOURS = ((242, 142, 43), (78, 121, 167), (89, 161, 79), (225, 87, 89), (176, 122, 161), (237, 201, 72))
_LEARNED: BoundedCache[tuple[str, int, int], LearnedGates] = BoundedCache(
    "learned gates", max_entries=4, max_bytes=2 << 30, weigh=tensor_bytes)


def _folder() -> None:
    """Register ``models/loom_gates`` with ComfyUI's folder_paths once (created when missing)."""
    if GATE_FOLDER not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, GATE_FOLDER)
        folder_paths.folder_names_and_paths[GATE_FOLDER] = ([path], {".safetensors"})


def gate_checkpoint_names() -> list[str]:
    """Learned-gate checkpoints in ``models/loom_gates`` (for the node's combo)."""
    _folder()
    try:
        return folder_paths.get_filename_list(GATE_FOLDER)
    except OSError:  # a listed folder vanished since ComfyUI cached the listing (it stats the cached folders)
        folder_paths.filename_list_cache.pop(GATE_FOLDER, None)
        return folder_paths.get_filename_list(GATE_FOLDER)


def _chain(previous: Sequence[AdapterGate] | None, gate: AdapterGate) -> tuple[AdapterGate, ...]:
    return (*(previous or ()), gate)


def parse_gate_blocks(text: str) -> BlockWeights | None:
    """A gate's block vector/spec/preset written for Flux's 19 + 38 blocks (smaller models use the first ones);
    empty text = every block 1 (None)."""
    return parse_block_weights(text) if text.strip() else None


def schedule_gate(lora: str, keyframes: str, interpolation: str, blocks: str,
                  previous: Sequence[AdapterGate] | None = None) -> tuple[AdapterGate, ...]:
    """``Loom Gate Schedule``: keyframes text + interpolation + blocks -> LOOM_GATE (appended to ``previous``)."""
    if interpolation not in INTERPOLATIONS:
        raise GateError(f"interpolation {interpolation!r} is not one of {INTERPOLATIONS}")
    schedule = GateSchedule(lora.strip(), parse_keyframes(keyframes), interpolation, parse_gate_blocks(blocks))
    return _chain(previous, AdapterGate(lora=lora.strip(), schedule=schedule))


def learned_gate(checkpoint: str, lora: str = "",
                 previous: Sequence[AdapterGate] | None = None) -> tuple[AdapterGate, ...]:
    """``Loom Learned Gate``: a DiffSynth LoRA-fusion checkpoint, by its name in ``models/loom_gates`` only
    (absolute paths, ``..`` and links leading outside are refused before anything is opened)."""
    _folder()
    try:
        path = model_file(GATE_FOLDER, checkpoint)
    except (OutsideFoldersError, FileNotFoundError) as exc:
        raise GateError(f"Loom Learned Gate: {exc}") from None
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    gates = _LEARNED.get(key)
    if gates is None:
        gates = load_learned_gates(path)
        for parameter in gates.parameters():
            parameter.requires_grad_(False)
        _LEARNED.put(key, gates)
    return _chain(previous, AdapterGate(lora=lora.strip(), learned=gates, learned_source=os.path.basename(path)))


@dataclass(frozen=True)
class ImportedPrompt:
    """A prompt schedule imported: gates per LoRA named in it, the text at the start, timed CONDITIONING."""

    gates: tuple[AdapterGate, ...]
    text: str
    conditioning: list | None


def _encode(clip: Any, text: str) -> tuple[torch.Tensor, dict]:
    tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    return cond, out


def import_prompt(prompt: str, steps: int = 0, blocks: str = "", clip: Any = None,
                  previous: Sequence[AdapterGate] | None = None) -> ImportedPrompt:
    """``Loom Prompt Schedule``: A1111 / prompt-control syntax -> one hold gate per ``<lora:...>`` name, plus
    (with ``clip``) CONDITIONING whose segments carry ComfyUI's ``start_percent`` / ``end_percent``.
    ``steps`` > 0 reads integer switch points as steps. Syntax errors point at the character."""
    schedule = parse_prompt_schedule(prompt, steps if steps > 0 else None)
    gate_blocks = parse_gate_blocks(blocks)
    gates = tuple(previous or ())
    for gate_schedule in schedule.gate_schedules(gate_blocks):
        gates = _chain(gates, AdapterGate(lora=gate_schedule.adapter, schedule=gate_schedule))
    conditioning = None
    if clip is not None:
        conditioning, encoded = [], {}
        timed = len(schedule.segments) > 1
        for segment in schedule.segments:
            if segment.text not in encoded:
                encoded[segment.text] = _encode(clip, segment.text)
            cond, extra = encoded[segment.text]
            options = dict(extra)
            if timed:
                options.update(start_percent=segment.start, end_percent=segment.end)
            conditioning.append([cond, options])
    logger.info("prompt schedule: %d segments, gates for %s", len(schedule.segments), schedule.adapters())
    return ImportedPrompt(gates, schedule.text_at(0.0), conditioning)


def gate_plot(gates: Sequence[AdapterGate], steps: int, width: int = 320, height: int = 160) -> torch.Tensor:
    """IMAGE ``[1, H, W, 3]`` (float 0..1): each scheduled gate's strength at the start of every step as a
    stepped line (progress ``i / steps``, Flux's simple scheduler) with a legend; block weights as a strip."""
    image = Image.new("RGB", (width, height), (28, 28, 28))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    scheduled = [g for g in gates if g.schedule is not None]
    values = [schedule_samples(g.schedule, steps) for g in scheduled]
    top = max([1.0, *(v for row in values for v in row)])
    low = min([0.0, *(v for row in values for v in row)])
    left, right, upper, lower = 28, width - 8, 16, height - 30
    draw.rectangle((left, upper, right, lower), outline=(90, 90, 90))

    def y_of(v: float) -> float:
        return lower - (v - low) / (top - low or 1.0) * (lower - upper)

    draw.line((left, y_of(0.0), right, y_of(0.0)), fill=(70, 70, 70))
    draw.text((2, upper - 6), f"{top:g}", fill=(170, 170, 170), font=font)
    draw.text((2, y_of(0.0) - 6), "0", fill=(170, 170, 170), font=font)
    step_width = (right - left) / steps
    for number, (gate, row) in enumerate(zip(scheduled, values)):
        colour = PLOT_COLOURS[number % len(PLOT_COLOURS)]
        points = []
        for i, v in enumerate(row):
            points += [(left + i * step_width, y_of(v)), (left + (i + 1) * step_width, y_of(v))]
        draw.line(points, fill=colour, width=2)
        draw.text((left + 4, upper + 2 + 11 * number), gate.lora or "* (every row)", fill=colour, font=font)
        blocks = gate.schedule.blocks
        if blocks is not None:
            cells = (blocks.base, *blocks.double, *blocks.single)
            cell = (right - left) / len(cells)
            peak = max([abs(c) for c in cells] + [1e-9])
            for j, c in enumerate(cells):
                shade = int(40 + 200 * abs(c) / peak)
                x0 = left + j * cell
                draw.rectangle((x0, lower + 6 + 5 * number, x0 + max(cell - 1, 1), lower + 9 + 5 * number),
                               fill=tuple(int(ch * shade / 255) for ch in colour))
    learned = [g for g in gates if g.learned is not None]
    if learned:
        draw.text((left + 4, lower - 12), "learned: " + ", ".join(g.learned_source for g in learned),
                  fill=(200, 200, 200), font=font)
    draw.text((right - 40, height - 12), f"{steps} steps", fill=(170, 170, 170), font=font)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


__all__ = ["GATE_FOLDER", "ImportedPrompt", "gate_checkpoint_names", "gate_plot", "import_prompt", "learned_gate",
           "parse_gate_blocks", "schedule_gate"]
