"""CLoRA on Flux, installed on a cloned ModelPatcher: N+1 passes per step, contrastive latent updates, masked fusion.

``clora(model, clip, base_prompt, concepts, options)`` returns a clone with:

- every targeted Linear wrapped per token (``regional_layers.wrap_linear``; the composition is the
  ``TokenWeights`` provider): LoRA i's adapters act on the batch rows of pass i only, with weight 1 on every
  token, so no weights are re-patched between passes;
- :class:`~.clora_probe.ProbeAttention` as the attention override (chained) to read concept maps;
- an ``APPLY_MODEL`` wrapper: each sampler chunk becomes 1 + N passes batched in one call per text length —
  the base pass (the sampler's own conditioning, no adapters) and, per LoRA i, its adapters with its prompt
  (cond chunks) or with the chunk's own negative (uncond chunks). Predictions are fused
  ``Σ M_i v_i / Σ M_i`` (pixels no mask covers: the base pass), with masks from this call's cond maps; an uncond
  chunk uses its cond's masks, so CFG > 1 gives ``fuse_i(u_i + cfg·(c_i − u_i))``: CLoRA's per-pass CFG at
  2(N+1) passes. With cfg 1 (Flux-dev) ComfyUI skips the uncond: N+1 passes;
- a ``PREDICT_NOISE`` wrapper: while sampling percent < ``update_end_percent``, ``iterations`` gradient steps
  ``z <- z − step_t·∇z L`` on the latent with the contrastive loss of the cond passes' maps (forward stopped after
  the last probed block, blocks checkpointed, see ``clora_probe``), then the sampler's prediction at the new latent,
  shifted by ``(z' − z)·σ_next/(σ − σ_next)`` so the sampler's step from z lands where a first-order step from z'
  lands (exact for Euler / first-order samplers, an approximation for higher-order ones).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import comfy.patcher_extension
import torch

from .progress import SamplingProgress
from ..block_weights import BlockWeights, block_of_module, parse_block_weights
from ..clora import (
    CLoraError,
    CLoraOptions,
    concept_masks,
    contrastive_loss,
    fuse_predictions,
    resize_masks,
    step_sizes,
)
from ..gates import step_of_sigma
from ..stack import StackEntry
from .clora_probe import (
    ConceptProbe,
    ProbeAttention,
    ProbeLayout,
    StopForward,
    checkpointed_blocks,
    gradient_scope,
    parse_probe_blocks,
    plain_copy,
    probe_stride,
)
from .clora_tokens import context_key, find_concept
from .regional_layers import layer_slots, unsupported_modules, wrap_linear

logger = logging.getLogger(__name__)

WRAPPER_KEY = "lora_loom.clora"
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


@dataclass(frozen=True)
class EncodedPrompt:
    """context ``[1, T, C]``, pooled ``[1, D]`` (or None) and concept index -> absolute token positions."""

    text: str
    context: torch.Tensor
    pooled: torch.Tensor | None
    positions: dict


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


def encode_clora_prompts(clip: Any, base_prompt: str, concepts: list[CLoraConcept]) -> tuple[EncodedPrompt, ...]:
    """Encode the base prompt and each LoRA's prompt; find every concept's tokens (base: all concepts, each
    LoRA prompt: its own concept required, the others where present)."""
    if clip is None:
        raise CLoraError("Loom CLoRA: a CLIP is required to encode the prompts")
    out = []
    for index, text in enumerate([base_prompt] + [c.prompt for c in concepts]):
        tokens = clip.tokenize(text)
        encoded = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        context = encoded["cond"]
        key = context_key(tokens, int(context.shape[1]))
        positions = {}
        for i, concept in enumerate(concepts):
            own = index == i + 1
            override = concept.base_tokens if index == 0 else concept.prompt_tokens if own else ""
            try:
                positions[i] = find_concept(clip.tokenizer, key, text, concept.concept, override, tokens)
            except ValueError as exc:
                if index == 0 or own:
                    where = "base prompt" if index == 0 else f"prompt of LoRA {i + 1}"
                    raise CLoraError(f"Loom CLoRA, {where}: {exc}") from exc
        out.append(EncodedPrompt(text, context, encoded.get("pooled_output"), positions))
    return tuple(out)


class CLoraComposition:
    """The live CLoRA state shared by the wrapped layers (``TokenWeights``), the probe override and the wrappers."""

    def __init__(self, concepts: list[CLoraConcept], prompts: tuple[EncodedPrompt, ...], options: CLoraOptions,
                 patch_size: int = 2):
        self.concepts = tuple(concepts)
        self.prompts = prompts
        self.options = options.validate()
        self.blocks = parse_probe_blocks(options.map_blocks)
        self.patch_size = patch_size
        self.weights: dict | None = None
        self.active: frozenset[int] = frozenset()
        self.probe: ConceptProbe | None = None
        self.record: MaskRecord | None = None
        self.losses: list[tuple[int, int, float]] = []
        self._masks: torch.Tensor | None = None
        self._progress = SamplingProgress()

    def __deepcopy__(self, memo: dict) -> CLoraComposition:
        return self

    # --- TokenWeights ----------------------------------------------------------------------------------------
    def stream_weights(self, stream: str) -> torch.Tensor | None:
        return None if self.weights is None else self.weights[stream]

    def active_regions(self) -> frozenset[int]:
        return self.active

    def percent_of(self, sigma: float, model_sampling: Any) -> float:
        """Sampling percent of ``sigma`` (cached per sigma)."""
        return self._progress.percent_of(sigma, model_sampling)

    # --- passes ----------------------------------------------------------------------------------------------
    def rows_for(self, chunks: list[int], c_crossattn: torch.Tensor, pooled: torch.Tensor | None,
                 batch: int) -> list[PassRow]:
        """1 + N passes per chunk; cond chunks (0) read the LoRA prompts and record concept maps."""
        rows = []
        for j, role in enumerate(chunks):
            part = slice(j * batch, (j + 1) * batch)
            own_pooled = None if pooled is None else pooled[part]
            base = self.prompts[0].positions if role == 0 else {}
            rows.append(PassRow(j, None, c_crossattn[part], own_pooled, dict(base)))
            for i in range(len(self.concepts)):
                if role == 0:
                    encoded = self.prompts[i + 1]
                    context = encoded.context.to(c_crossattn).expand(batch, -1, -1)
                    lora_pooled = own_pooled if encoded.pooled is None or pooled is None else \
                        encoded.pooled.to(pooled).expand(batch, -1)
                    rows.append(PassRow(j, i, context, lora_pooled, dict(encoded.positions)))
                else:
                    rows.append(PassRow(j, i, c_crossattn[part], own_pooled, {}))
        return rows

    def _weights(self, rows: list[PassRow], batch: int, image_tokens: int, text_length: int,
                 device: torch.device) -> dict:
        n = len(self.concepts)
        per_row = torch.zeros(len(rows) * batch, 1, n)
        for r, row in enumerate(rows):
            if row.lora is not None:
                per_row[r * batch:(r + 1) * batch, 0, row.lora] = 1.0
        img, txt = per_row.expand(-1, image_tokens, -1), per_row.expand(-1, text_length, -1)
        weights = {"img": img.to(device), "txt": txt.to(device)}
        weights["joint"] = torch.cat([weights["txt"], weights["img"]], dim=1)
        return weights

    def _run_group(self, executor: Any, rows: list[PassRow], x: torch.Tensor, t: torch.Tensor, batch: int,
                   c_concat: Any, control: Any, options: dict, kwargs: dict, track_grad: bool) -> torch.Tensor:
        """One model call for ``rows`` (same text length); returns ``[len(rows)·batch, C, H, W]``."""
        chunks = [r.chunk for r in rows]
        take = torch.cat([torch.arange(c * batch, (c + 1) * batch) for c in chunks]).to(x.device)
        call_kwargs = {k: _rows_of(v, take, x.shape[0]) for k, v in kwargs.items()}
        if rows[0].pooled is not None and "y" in kwargs:
            call_kwargs["y"] = torch.cat([r.pooled for r in rows])
        context = torch.cat([r.context for r in rows])
        p = self.patch_size
        grid = (-(-x.shape[-2] // p), -(-x.shape[-1] // p))
        extra = sum(-(-r.shape[-2] // p) * -(-r.shape[-1] // p) for r in (kwargs.get("ref_latents") or []))
        self.weights = self._weights(rows, batch, grid[0] * grid[1] + extra, int(context.shape[1]), x.device)
        self.active = frozenset(r.lora for r in rows if r.lora is not None)
        layout = ProbeLayout(int(context.shape[1]), grid, probe_stride(grid, self.options.map_size),
                             tuple(r.positions for r in rows for _ in range(batch)))
        self.probe = ConceptProbe(layout, self.blocks, track_grad=track_grad)
        roles = list(options.get("cond_or_uncond") or [0])
        call_options = {**options, "cond_or_uncond": [roles[min(r.chunk, len(roles) - 1)] for r in rows]}
        return executor(x.index_select(0, take), t.index_select(0, take), _rows_of(c_concat, take, x.shape[0]),
                        context, control, call_options, **call_kwargs)

    def _concept_maps(self, probe: ConceptProbe, rows: list[PassRow], offset: int, batch: int) -> dict:
        """(row index in ``rows``, concept) -> maps ``[batch, qh, qw]`` from a probe whose rows start at offset."""
        found = probe.maps()
        out = {}
        for r, row in enumerate(rows):
            for concept in row.positions:
                parts = [found.get(((offset + r) * batch + b, concept)) for b in range(batch)]
                if all(p is not None for p in parts):
                    out[(r, concept)] = torch.stack(parts)
        return out

    def _masks_of(self, rows: list[PassRow], maps: dict, batch: int) -> torch.Tensor | None:
        """Per cond chunk: concept i's map = mean of its maps in the base pass and LoRA i's pass -> ``[B, N, qh, qw]``."""
        per_concept = []
        for i in range(len(self.concepts)):
            seen = [maps[(r, i)] for r, row in enumerate(rows) if (r, i) in maps and row.lora in (None, i)]
            if not seen:
                return None
            per_concept.append(torch.stack(seen).mean(dim=0))
        return torch.stack(per_concept, dim=1).float()  # [batch, N, qh, qw]

    # --- wrappers ----------------------------------------------------------------------------------------------
    def apply_model_wrapper(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                            c_crossattn: torch.Tensor | None = None, control: Any = None,
                            transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
        """``WrappersMP.APPLY_MODEL``: x ``[B, C, H, W]`` (B = chunks × latent batch) -> fused denoised."""
        options = transformer_options if transformer_options is not None else {}
        gradient = options.get(GRADIENT_MARK)
        chunks = list(options.get("cond_or_uncond") or [0])
        batch = x.shape[0] // len(chunks)
        rows = self.rows_for(chunks, c_crossattn, kwargs.get("y"), batch)
        if gradient is not None:
            gradient.rows = rows
            return self._gradient_call(executor, x, t, c_concat, control, options, kwargs, gradient, batch)
        percent = self.percent_of(float(t.flatten()[0]), executor.class_obj.model_sampling)
        groups: dict[int, list[int]] = {}
        for r, row in enumerate(rows):
            groups.setdefault(int(row.context.shape[1]), []).append(r)
        outputs: dict[int, torch.Tensor] = {}
        maps: dict = {}
        try:
            for members in groups.values():
                group = [rows[r] for r in members]
                out = self._run_group(executor, group, x, t, batch, c_concat, control, options, kwargs, False)
                for slot, r in enumerate(members):
                    outputs[r] = out[slot * batch:(slot + 1) * batch]
                for (slot, concept), value in self._concept_maps(self.probe, group, 0, batch).items():
                    maps[(members[slot], concept)] = value
        finally:
            self.weights, self.active, self.probe = None, frozenset(), None
        return self._fuse(rows, outputs, maps, chunks, batch, x, percent)

    def _fuse(self, rows: list[PassRow], outputs: dict, maps: dict, chunks: list[int], batch: int,
              x: torch.Tensor, percent: float) -> torch.Tensor:
        n = len(self.concepts)
        per_chunk = 1 + n
        fused = []
        for j, role in enumerate(chunks):
            members = list(range(j * per_chunk, (j + 1) * per_chunk))
            if role == 0:
                chunk_maps = {(r - members[0], c): v for (r, c), v in maps.items() if r in members}
                masks = self._masks_of(rows[members[0]:members[-1] + 1], chunk_maps, batch)
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

    def _gradient_call(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any, control: Any,
                       options: dict, kwargs: dict, gradient: GradientRequest, batch: int) -> torch.Tensor:
        """The probing forward of a latent update: cond passes only, stopped after the last probed block."""
        diffusion = executor.class_obj.diffusion_model
        last = self.blocks.last(len(diffusion.double_blocks), len(diffusion.single_blocks))
        stopped = checkpointed_blocks(options, len(diffusion.double_blocks), last)
        try:
            self._run_group(executor, gradient.rows, x, t, batch, c_concat, control, stopped, kwargs, True)
            raise CLoraError("CLoRA latent update: the forward did not stop at the last probed block")
        except StopForward:
            pass
        gradient.probe = self.probe
        return x.new_zeros(x.shape)

    def predict_noise_wrapper(self, executor: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                              seed: Any = None) -> torch.Tensor:
        """``WrappersMP.PREDICT_NOISE``: latent updates in the first steps, then the sampler's prediction."""
        guider = executor.class_obj
        sigmas = (model_options.get("transformer_options") or {}).get("sample_sigmas")
        sigma = float(timestep.flatten()[0])
        model_sampling = guider.inner_model.model_sampling
        percent = self.percent_of(sigma, model_sampling)
        if self.options.iterations == 0 or percent >= self.options.update_end_percent or sigmas is None:
            return executor(x, timestep, model_options, seed)
        step = step_of_sigma(sigma, sigmas)
        sigma_next = float(sigmas[step + 1]) if step + 1 < len(sigmas) else 0.0
        size = step_sizes(self.options.step_size, max(1, len(sigmas) - 1))[min(step, max(0, len(sigmas) - 2))]
        updated = self.update_latent(guider.inner_model, x, timestep, model_options, size, step, guider)
        out = executor(updated, timestep, model_options, seed)
        if sigma - sigma_next <= 0:
            return out
        return out + (updated - x).to(out) * (sigma_next / (sigma - sigma_next))

    def update_latent(self, base_model: Any, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                      size: float, step: int = 0, guider: Any = None) -> torch.Tensor:
        """``iterations`` steps ``z <- z − size·∇z L`` (L: contrastive loss of the concept maps); returns z'."""
        guidance = _guidance_of(guider)
        with gradient_scope():
            z = plain_copy(x)
            for iteration in range(self.options.iterations):
                z.requires_grad_(True)
                loss = self.loss_at(base_model, z, timestep, model_options, guidance)
                if not loss.requires_grad:
                    logger.warning("CLoRA: fewer than two concepts seen; no latent update")
                    return x
                self.losses.append((step, iteration, float(loss.detach())))
                (grad,) = torch.autograd.grad(loss, [z])
                z = (z.detach() - size * grad).detach()
                self.weights, self.active = None, frozenset()
        return z

    def loss_at(self, base_model: Any, z: torch.Tensor, timestep: torch.Tensor, model_options: dict,
                guidance: float = 3.5) -> torch.Tensor:
        """Contrastive loss of the cond passes' concept maps at latent ``z [B, C, H, W]`` (with grad)."""
        base = self.prompts[0]
        request = GradientRequest()
        options = comfy.patcher_extension.copy_nested_dicts(model_options.get("transformer_options") or {})
        if WRAPPER_KEY not in options.setdefault("wrappers", {}).get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}):
            comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                                                         WRAPPER_KEY, self.apply_model_wrapper, options)
        options.update({GRADIENT_MARK: request, "cond_or_uncond": [0]})
        b = z.shape[0]
        kwargs = {"guidance": torch.full((b,), guidance, device=z.device)}
        if base.pooled is not None:
            kwargs["y"] = plain_copy(base.pooled).to(z.device).expand(b, -1)
        base_model.apply_model(z, plain_copy(timestep), c_crossattn=plain_copy(base.context).to(z.device).expand(
            b, -1, -1), transformer_options=options, **kwargs)
        if request.probe is None:
            raise CLoraError("CLoRA latent update: the model call did not reach the CLoRA wrapper")
        request.probe.recording = False  # a checkpoint recomputation repeats the probe's ops; keep nothing twice
        maps = self._concept_maps(request.probe, request.rows, 0, b)
        self.probe = request.probe
        stacked, labels = [], []
        for (r, concept), value in sorted(maps.items()):
            stacked.append(value)
            labels.append(concept)
        if len(set(labels)) < 2:
            return torch.zeros(())
        maps_t = torch.stack(stacked, dim=1)  # [B, M, qh, qw]
        label_t = torch.tensor(labels)
        return torch.stack([contrastive_loss(maps_t[i], label_t, self.options.temperature)
                            for i in range(b)]).mean()


@dataclass
class GradientRequest:
    """Passed through transformer options to the APPLY_MODEL wrapper: which rows ran and the probe they filled."""

    rows: list = field(default_factory=list)
    probe: ConceptProbe | None = None

    def __deepcopy__(self, memo: dict) -> GradientRequest:
        return self


def _rows_of(value: Any, take: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value.index_select(0, take.to(value.device))
    return value


def _guidance_of(guider: Any, default: float = 3.5) -> float:
    """Flux guidance of the sampler's positive conditioning (FluxGuidance), else ``default``."""
    try:
        cond = guider.conds["positive"][0]["model_conds"]["guidance"].cond
        return float(cond.flatten()[0])
    except (AttributeError, KeyError, IndexError, TypeError):
        return default


def install_clora(model: Any, composition: CLoraComposition) -> tuple[Any, list[str]]:
    """Clone ``model``; wrap layers, add the probe override and the two wrappers. The input is untouched."""
    clone = model.clone()
    diffusion = clone.get_model_object("diffusion_model")
    depth, depth_single = len(diffusion.double_blocks), len(diffusion.single_blocks)
    per_lora = []
    for concept in composition.concepts:
        items = []
        for entry in concept.entries:
            text = entry.row.blocks.strip()
            blocks = parse_block_weights(text, depth, depth_single) if text else \
                BlockWeights.uniform(1.0, depth, depth_single)
            items.append((entry.row.strength, lambda m, b=blocks: b.weight_for(block_of_module(m).block_type,
                                                                               block_of_module(m).index),
                          entry.adapter_set))
        per_lora.append(items)
    for module, slots in sorted(layer_slots(per_lora).items()):
        key = f"diffusion_model.{module}"
        try:
            original = clone.get_model_object(key)
        except AttributeError as exc:
            raise CLoraError(f"LoRA {slots[0].region + 1}: adapter module {module} does not exist in this model "
                             f"(a LoRA for a different Flux?)") from exc
        clone.add_object_patch(key, wrap_linear(original, module, tuple(slots), composition))
    options = clone.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = ProbeAttention(composition, options.get("optimized_attention_override"))
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                               composition.apply_model_wrapper)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY,
                               composition.predict_noise_wrapper)
    skipped = unsupported_modules([e.adapter_set for c in composition.concepts for e in c.entries])
    if skipped:
        logger.warning("CLoRA: %d adapter parts run once per sample and cannot be applied per pass; they are not "
                       "applied (e.g. %s)", len(skipped), skipped[0])
    return clone, skipped


@dataclass(frozen=True)
class CLoraResult:
    """The patched clone, the base prompt's CONDITIONING, the live composition (mask handle), what was skipped."""

    model: Any
    conditioning: list
    composition: CLoraComposition
    skipped: tuple[str, ...] = ()


def clora(model: Any, clip: Any, base_prompt: str, concepts: list[CLoraConcept],
          options: CLoraOptions = CLoraOptions()) -> CLoraResult:
    """Loom CLoRA's one function: MODEL, CLIP, base prompt and per-LoRA concepts -> clone + CONDITIONING."""
    if not concepts:
        raise CLoraError("Loom CLoRA: no LoRA concepts given (connect a Loom CLoRA Concept)")
    prompts = encode_clora_prompts(clip, base_prompt, concepts)
    patch = int(getattr(model.get_model_object("diffusion_model"), "patch_size", 2))
    composition = CLoraComposition(concepts, prompts, options, patch)
    clone, skipped = install_clora(model, composition)
    extra = {} if prompts[0].pooled is None else {"pooled_output": prompts[0].pooled}
    return CLoraResult(clone, [[prompts[0].context, extra]], composition, tuple(skipped))
