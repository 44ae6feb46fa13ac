"""CLoRA on Flux as a runtime controller: N+1 passes per step, concept maps from probes, masked fusion.

Group i is LoRA i: its adapters act on the batch rows of pass i only, with weight 1 on every token, so no weights are
re-patched between passes. Each sampler chunk of a call becomes 1 + N passes, batched in one model call per text
length — the base pass (the sampler's own conditioning, no adapters) and, per LoRA i, its adapters with its prompt
(cond chunks) or with the chunk's own negative (uncond chunks). Predictions are fused ``Σ M_i v_i / Σ M_i`` (pixels
no mask covers: the base pass), with masks from this call's cond maps; an uncond chunk uses its cond's masks, so CFG
> 1 gives ``fuse_i(u_i + cfg·(c_i − u_i))``: CLoRA's per-pass CFG at 2(N+1) passes. With cfg 1 (Flux-dev) ComfyUI
skips the uncond: N+1 passes. A call marked for a latent update (``GRADIENT_MARK``, see ``comfy_bridge/clora.py``)
runs the cond passes only, checkpointed and stopped after the last probed block (:mod:`.probes`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..clora import CLoraError, CLoraOptions, concept_masks, fuse_predictions, resize_masks
from ..prompts import EncodedPrompt
from ..stack import StackEntry
from .core import Call, Controller, TokenState
from .probes import ConceptProbe, ProbeLayout, StopForward, checkpointed_blocks, parse_probe_blocks, probe_stride

logger = logging.getLogger(__name__)

GRADIENT_MARK = "lora_loom_clora_gradient"


@dataclass(frozen=True)
class CLoraConcept:
    """One LoRA of a CLoRA composition: its adapters, its prompt and the concept word(s) it paints.

    The concept must occur in the base prompt and in this prompt; ``prompt_tokens``/``base_tokens`` (content-token
    indices such as ``"2,3"``) override the word search."""

    prompt: str
    concept: str
    entries: tuple[StackEntry, ...] = ()
    prompt_tokens: str = ""
    base_tokens: str = ""


@dataclass
class MaskRecord:
    """The masks of the latest cond call: ``masks``/``maps`` ``[B, N, qh, qw]`` (CPU float32), the latent size."""

    masks: torch.Tensor
    maps: torch.Tensor
    latent_hw: tuple[int, int]
    percent: float


@dataclass
class PassRow:
    """One pass of one sampler chunk: the LoRA it runs (None = base), its context/pooled, concept positions."""

    chunk: int
    lora: int | None
    context: torch.Tensor
    pooled: torch.Tensor | None
    positions: dict = field(default_factory=dict)


@dataclass
class GradientRequest:
    """Passed through transformer options to the controller: which rows ran and the probe they filled."""

    rows: list = field(default_factory=list)
    probe: ConceptProbe | None = None

    def __deepcopy__(self, memo: dict) -> GradientRequest:
        return self


@dataclass(frozen=True)
class CLoraState(TokenState):
    """A batch of CLoRA passes: the token state plus the probe that reads its concept maps."""

    probe: ConceptProbe


class CLoraController(Controller):
    """``concepts`` (one group each), ``prompts``: the base prompt then each LoRA's (``concepts`` = concept index ->
    token positions), ``options``. ``record``: the masks of the latest cond call; ``losses``: the latent updates'."""

    name = "Loom CLoRA"
    changes_batch = True

    def __init__(self, concepts: Sequence[CLoraConcept], prompts: Sequence[EncodedPrompt],
                 options: CLoraOptions = CLoraOptions(), patch_size: int = 2,
                 wrappers: Callable[[Any, Any], dict] | None = None) -> None:
        if not concepts:
            raise CLoraError("Loom CLoRA: no LoRA concepts given (connect a Loom CLoRA Concept)")
        super().__init__([c.entries for c in concepts], wrappers)
        self.concepts = tuple(concepts)
        self.prompts = tuple(prompts)
        self.options = options.validate()
        self.blocks = parse_probe_blocks(options.map_blocks)
        self.patch_size = patch_size
        self.record: MaskRecord | None = None
        self.losses: list[tuple[int, int, float]] = []
        self._masks: torch.Tensor | None = None

    def attend(self, state: CLoraState, downstream: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               heads: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Show q, k of every block to the pass's probe, then attend as before."""
        options = kwargs.get("transformer_options") or {}
        if not args and kwargs.get("skip_reshape") and q.ndim == 4:
            state.probe.observe(q, k, options.get("block_type"), int(options.get("block_index", 0)))
        return downstream.call(q, k, v, heads, *args, **kwargs)

    def rows_for(self, chunks: list[int], c_crossattn: torch.Tensor, pooled: torch.Tensor | None,
                 batch: int) -> list[PassRow]:
        """1 + N passes per chunk; cond chunks (0) read the LoRA prompts and record concept maps."""
        rows = []
        for j, role in enumerate(chunks):
            part = slice(j * batch, (j + 1) * batch)
            own_pooled = None if pooled is None else pooled[part]
            base = self.prompts[0].concepts if role == 0 else {}
            rows.append(PassRow(j, None, c_crossattn[part], own_pooled, dict(base)))
            for i in range(len(self.concepts)):
                if role == 0:
                    encoded = self.prompts[i + 1]
                    context = encoded.context.to(c_crossattn).expand(batch, -1, -1)
                    lora_pooled = own_pooled if encoded.pooled is None or pooled is None else \
                        encoded.pooled.to(pooled).expand(batch, -1)
                    rows.append(PassRow(j, i, context, lora_pooled, dict(encoded.concepts)))
                else:
                    rows.append(PassRow(j, i, c_crossattn[part], own_pooled, {}))
        return rows

    def _pass(self, call: Call, rows: list[PassRow], batch: int, track_grad: bool) -> tuple[Call, CLoraState]:
        """The model call for ``rows`` (same text length): ``[len(rows)·batch, ...]`` inputs and its state."""
        x = call.x
        take = torch.cat([torch.arange(r.chunk * batch, (r.chunk + 1) * batch) for r in rows]).to(x.device)
        kwargs = {k: _rows_of(v, take, x.shape[0]) for k, v in call.kwargs.items()}
        if rows[0].pooled is not None and "y" in call.kwargs:
            kwargs["y"] = torch.cat([r.pooled for r in rows])
        context = torch.cat([r.context for r in rows])
        p = self.patch_size
        grid = (-(-x.shape[-2] // p), -(-x.shape[-1] // p))
        extra = sum(-(-r.shape[-2] // p) * -(-r.shape[-1] // p) for r in (call.kwargs.get("ref_latents") or []))
        per_row = torch.zeros(len(rows) * batch, 1, len(self.concepts))
        for r, row in enumerate(rows):
            if row.lora is not None:
                per_row[r * batch:(r + 1) * batch, 0, row.lora] = 1.0
        img, txt = per_row.expand(-1, grid[0] * grid[1] + extra, -1), per_row.expand(-1, int(context.shape[1]), -1)
        weights = {"img": img.to(x.device), "txt": txt.to(x.device)}
        weights["joint"] = torch.cat([weights["txt"], weights["img"]], dim=1)
        layout = ProbeLayout(int(context.shape[1]), grid, probe_stride(grid, self.options.map_size),
                             tuple(r.positions for r in rows for _ in range(batch)))
        state = CLoraState(weights, frozenset(r.lora for r in rows if r.lora is not None), call.percent,
                           ConceptProbe(layout, self.blocks, track_grad=track_grad))
        roles = list(call.options.get("cond_or_uncond") or [0])
        options = {**call.options, "cond_or_uncond": [roles[min(r.chunk, len(roles) - 1)] for r in rows]}
        return call.changed(x=x.index_select(0, take), t=call.t.index_select(0, take),
                            c_concat=_rows_of(call.c_concat, take, x.shape[0]), context=context, options=options,
                            kwargs=kwargs), state

    def run(self, call: Call, inner: Callable[[Call, TokenState], torch.Tensor]) -> torch.Tensor:
        """x ``[B, C, H, W]`` (B = chunks × latent batch) -> fused prediction; a gradient call -> its probe."""
        chunks = list(call.options.get("cond_or_uncond") or [0])
        batch = call.x.shape[0] // len(chunks)
        rows = self.rows_for(chunks, call.context, call.kwargs.get("y"), batch)
        gradient = call.options.get(GRADIENT_MARK)
        if gradient is not None:
            return self._gradient_call(call, inner, gradient, rows, batch)
        groups: dict[int, list[int]] = {}
        for r, row in enumerate(rows):
            groups.setdefault(int(row.context.shape[1]), []).append(r)
        outputs: dict[int, torch.Tensor] = {}
        maps: dict = {}
        for members in groups.values():
            group = [rows[r] for r in members]
            sub, state = self._pass(call, group, batch, False)
            out = inner(sub, state)
            for slot, r in enumerate(members):
                outputs[r] = out[slot * batch:(slot + 1) * batch]
            for (slot, concept), value in self.concept_maps(state.probe, group, batch).items():
                maps[(members[slot], concept)] = value
        return self._fuse(rows, outputs, maps, chunks, batch, call.x, call.percent)

    def concept_maps(self, probe: ConceptProbe, rows: list[PassRow], batch: int) -> dict:
        """(row index in ``rows``, concept) -> maps ``[batch, qh, qw]`` from the probe of those rows' pass."""
        found = probe.maps()
        out = {}
        for r, row in enumerate(rows):
            for concept in row.positions:
                parts = [found.get((r * batch + b, concept)) for b in range(batch)]
                if all(p is not None for p in parts):
                    out[(r, concept)] = torch.stack(parts)
        return out

    def _masks_of(self, rows: list[PassRow], maps: dict) -> torch.Tensor | None:
        """Per cond chunk: concept i's map = mean of its maps in the base pass and LoRA i's pass ``[B, N, qh, qw]``."""
        per_concept = []
        for i in range(len(self.concepts)):
            seen = [maps[(r, i)] for r, row in enumerate(rows) if (r, i) in maps and row.lora in (None, i)]
            if not seen:
                return None
            per_concept.append(torch.stack(seen).mean(dim=0))
        return torch.stack(per_concept, dim=1).float()  # [batch, N, qh, qw]

    def _fuse(self, rows: list[PassRow], outputs: dict, maps: dict, chunks: list[int], batch: int,
              x: torch.Tensor, percent: float) -> torch.Tensor:
        n = len(self.concepts)
        per_chunk = 1 + n
        fused = []
        for j, role in enumerate(chunks):
            members = list(range(j * per_chunk, (j + 1) * per_chunk))
            if role == 0:
                chunk_maps = {(r - members[0], c): v for (r, c), v in maps.items() if r in members}
                masks = self._masks_of(rows[members[0]:members[-1] + 1], chunk_maps)
                if masks is not None:
                    binary = concept_masks(masks, self.options.alpha, self.options.morphology, self.options.kernel)
                    self._masks = binary
                    self.record = MaskRecord(binary.detach().cpu(), masks.detach().cpu(), tuple(x.shape[-2:]),
                                             percent)
            masks = self._masks
            if percent < self.options.fuse_start_percent or masks is None or masks.shape[0] != batch:
                masks = torch.ones(batch, n, 1, 1)
            base = outputs[members[0]]
            preds = torch.stack([outputs[r] for r in members[1:]])
            fused.append(fuse_predictions(base, preds, resize_masks(masks, *base.shape[-2:]).to(base.device)))
        return torch.cat(fused)

    def _gradient_call(self, call: Call, inner: Callable, gradient: GradientRequest, rows: list[PassRow],
                       batch: int) -> torch.Tensor:
        """The probing forward of a latent update: cond passes only, stopped after the last probed block."""
        diffusion = call.model.diffusion_model
        last = self.blocks.last(len(diffusion.double_blocks), len(diffusion.single_blocks))
        stopped = call.changed(options=checkpointed_blocks(call.options, len(diffusion.double_blocks), last))
        sub, state = self._pass(stopped, rows, batch, True)
        gradient.rows, gradient.probe = rows, state.probe
        try:
            inner(sub, state)
            raise CLoraError("CLoRA latent update: the forward did not stop at the last probed block")
        except StopForward:
            pass
        return call.x.new_zeros(call.x.shape)


def _rows_of(value: Any, take: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.index_select(0, take.to(value.device))
    return value


__all__ = ["GRADIENT_MARK", "CLoraConcept", "CLoraController", "CLoraState", "GradientRequest", "MaskRecord",
           "PassRow"]
