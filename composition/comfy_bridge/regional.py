"""Regional composition (LoRA-Composer on Flux) installed on a cloned ModelPatcher.

``compose(model, clip, global_prompt, regions, options)``:

1. encodes the global prompt and every region prompt with the workflow's CLIP and concatenates them along the
   token axis (Flux text position ids are zero, so this is RoPE-neutral); the spans land in :class:`TextSpans`;
2. wraps every targeted Flux Linear (image stream of double blocks, single-block linears, text stream for each
   region prompt's own tokens, and the per-sample modulations expanded per token) through ``add_object_patch``;
3. installs the joint-attention rules as ``transformer_options["optimized_attention_override"]`` (chained with any
   override already there, see ``regional_attention.py``);
4. adds an ``APPLY_MODEL`` wrapper that, once per model call, computes the per-token region weights, labels and
   sampling percent from the latent's size and sigma (masks are resized at sampling time);
5. optionally adds a ``SAMPLER_SAMPLE`` wrapper for latent re-initialisation (``reinit.py``).

Gates: an entry (a row of a region's stack) with a gate attached (``StackEntry.gate``) is scaled inside the
wrapped layers by its schedule at (block, sampling percent) — :meth:`RegionalComposition.adapter_gates` — and,
with a learned gate, mixed by AutoLoRA's formula. Nothing is re-patched during sampling.

Which batch entries are regional: those whose text conditioning *is* the composed prompt (same length and
values). Other entries (an uncond, a zeroed negative, another prompt batched alongside) run plain attention and
get the region adapters on image tokens only (as a merged LoRA would give the uncond its LoRA).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

import comfy.patcher_extension

from .progress import SamplingProgress
from ..adapter_gate import GateBook
from ..block_weights import BlockWeights, block_of_module, parse_block_weights
from ..plan import MethodOptions, Plan, PlanError, Region, RuleSchedule, TextSpans, region_token_masks
from ..regional import label_joint_sequence, region_text_weights
from ..stack import StackEntry
from .regional_attention import RegionalAttention
from .regional_layers import AdapterSlot, SlotGate, layer_slots, unsupported_modules, wrap_linear

logger = logging.getLogger(__name__)

WRAPPER_KEY = "lora_loom.regional"
_NON_CONTENT_IDS = {"l": {49406, 49407}, "g": {49406, 49407}, "t5xxl": {0, 1}, "playground": {0, 1}}


@dataclass(frozen=True)
class ComposedRegion:
    """What ``LOOM_REGIONS`` carries per region: the plan region and the loaded adapters that paint it."""

    region: Region
    entries: tuple[StackEntry, ...] = ()


@dataclass(frozen=True)
class ComposeOptions:
    """Loom Compose's switches. Rules apply in ``double_blocks``/``single_blocks`` (None = all) for sampling
    percent ``[start_percent, end_percent)``; ``attention_path`` "grouped" (no L×L mask) or "dense";
    ``trim_region_padding``: region prompts keep their start, words and end token but not the padding after
    (the padding of every region prompt would otherwise run through every block: 4 CLIP-L region prompts add 308
    text tokens, trimmed ~40; the global prompt keeps its full length); ``global_text_adapters``: the global
    prompt's tokens are read with every region's adapters (text stream), as a merged stack reads them — without
    it a concept word in the global prompt is a word the base model never learned (measured on the playground:
    regional presence 0.16 -> 0.44, ``loom bench quality``); ``regions_see_global``: while injection applies a
    region's image tokens also read the global prompt (off: only their own prompt; see plan.MethodOptions)."""

    background: str = "global"
    base_ratio: float = 0.2
    injection: bool = True
    isolation: bool = True
    base_blend: bool = True
    double_blocks: frozenset[int] | None = None
    single_blocks: frozenset[int] | None = None
    start_percent: float = 0.0
    end_percent: float = 1.0
    latent_reinit: bool = True
    refinement: bool = False
    attention_path: str = "grouped"
    region_threshold: float = 0.5
    trim_region_padding: bool = True
    global_text_adapters: bool = True
    regions_see_global: bool = False

    def rules(self) -> tuple[RuleSchedule, ...]:
        names = [n for n, on in (("injection", self.injection), ("isolation", self.isolation),
                                 ("base_blend", self.base_blend and self.base_ratio > 0)) if on]
        return tuple(RuleSchedule(n, self.double_blocks, self.single_blocks, self.start_percent, self.end_percent)
                     for n in names)


def parse_rule_blocks(text: str) -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """Blocks where the attention rules apply: ``""``/``"all"`` -> every block; otherwise items like
    ``d0-18 s0-9 s12`` (or ``double0-18, single3``), 0-based inclusive, as ComfyUI's ``block_index``. A block
    type not named gets no rules. Returns ``(double_blocks, single_blocks)``."""
    cleaned = text.strip().lower()
    if cleaned in ("", "all"):
        return None, None
    chosen: dict[str, set[int]] = {"d": set(), "s": set()}
    for item in cleaned.replace(",", " ").replace(";", " ").split():
        kind = "d" if item.startswith("d") else "s" if item.startswith("s") else None
        numbers = item.lstrip("doublesingle")
        try:
            low, _, high = numbers.partition("-")
            first, last = int(low), int(high or low)
        except ValueError as exc:
            raise PlanError(f"rule blocks {text!r}: cannot read {item!r} (write e.g. 'd0-18 s0-37')") from exc
        if kind is None or first < 0 or last < first:
            raise PlanError(f"rule blocks {text!r}: bad item {item!r} (write e.g. 'd0-18 s0-37')")
        chosen[kind].update(range(first, last + 1))
    return frozenset(chosen["d"]), frozenset(chosen["s"])


@dataclass(frozen=True)
class EncodedPrompts:
    """context ``[1, T, C]`` = global prompt then each region prompt; ``extra``: the global prompt's pooled
    output etc.; ``concept_positions[k]``: absolute text positions of region k's content tokens (no padding)."""

    context: torch.Tensor
    extra: dict
    spans: TextSpans
    concept_positions: tuple[tuple[int, ...], ...]


def _content_positions(tokens: Any, length: int) -> list[int] | None:
    """Positions of real (non start/end/pad) tokens of one encoded prompt, if the tokenizer output tells."""
    if not isinstance(tokens, dict):
        return None
    for key, chunks in tokens.items():
        flat = [item for chunk in chunks for item in chunk]
        if len(flat) != length:
            continue
        skip = _NON_CONTENT_IDS.get(key, set())
        ids = [item[0] for item in flat]
        return [i for i, t in enumerate(ids) if not (isinstance(t, int) and t in skip)]
    return None


def _trimmed_length(positions: list[int] | None, length: int) -> int:
    """Tokens kept of a region prompt: up to one past its last content token (the end token), else all."""
    return min(length, max(positions) + 2) if positions else length


def encode_prompts(clip: Any, global_prompt: str, region_prompts: list[str],
                   trim_padding: bool = False) -> EncodedPrompts:
    """Encode with the workflow's CLIP and concatenate ``[global | region_0 | ...]`` along the token axis; with
    ``trim_padding`` each region prompt loses the padding after its end token."""
    if clip is None:
        raise PlanError("Loom Compose: a CLIP is required to encode the global and region prompts")
    conds, positions, extra = [], [], {}
    for i, text in enumerate([global_prompt] + list(region_prompts)):
        tokens = clip.tokenize(text)
        out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        if i == 0:
            extra = {k: v for k, v in out.items() if k != "attention_mask"}
        content = _content_positions(tokens, int(cond.shape[1]))
        if i > 0 and trim_padding:
            cond = cond[:, :_trimmed_length(content, int(cond.shape[1]))]
        conds.append(cond)
        positions.append(content)
    spans = TextSpans.from_lengths(int(conds[0].shape[1]), [int(c.shape[1]) for c in conds[1:]])
    concept = []
    for k, span in enumerate(spans.region_spans):
        rel = positions[k + 1] or list(range(span.end - span.start))
        concept.append(tuple(span.start + p for p in (rel or range(span.end - span.start))))
    return EncodedPrompts(torch.cat(conds, dim=1), extra, spans, tuple(concept))


def build_plan(global_prompt: str, regions: list[ComposedRegion], options: ComposeOptions) -> Plan:
    """The serialisable plan of a composition (rules from the options)."""
    if not regions:
        raise PlanError("Loom Compose: no regions given (connect a Loom Region)")
    method = MethodOptions(base_ratio=options.base_ratio, latent_reinit=options.latent_reinit,
                           region_threshold=options.region_threshold, regions_see_global=options.regions_see_global)
    method = replace(method, refinement=replace(method.refinement, enabled=options.refinement))
    return Plan(global_prompt=global_prompt, regions=tuple(r.region for r in regions),
                background=options.background, rules=options.rules(), options=method).validate()


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
class CallState:
    """One model call: its layout and sampling percent (0 = start, 1 = end)."""

    layout: CallLayout
    percent: float


class RegionalComposition:
    """The live composition shared by the wrapped layers, the attention override and the wrappers of one clone.

    Holds no ComfyUI objects; ``current`` is set only inside a model call (``apply_model_wrapper``).
    """

    def __init__(self, plan: Plan, prompts: EncodedPrompts, options: ComposeOptions, patch_size: int = 2):
        self.plan = plan
        self.prompts = prompts
        self.options = options
        self.patch_size = patch_size
        self.current: CallState | None = None
        self.probe: Any = None
        self.gate_book: GateBook | None = None
        self._layouts: dict = {}
        self._progress = SamplingProgress()
        self._contexts: dict = {}
        self._gate_values: dict = {}

    def __deepcopy__(self, memo: dict) -> "RegionalComposition":
        return self  # model_options are deep-copied on clone; the composition is shared, not copied

    # --- what wrapped layers read -------------------------------------------------------------------------
    def stream_weights(self, stream: str) -> torch.Tensor | None:
        return None if self.current is None else self.current.layout.weights[stream]

    def active_regions(self) -> frozenset[int]:
        return frozenset() if self.current is None else self.current.layout.active

    def adapter_gates(self, block_type: str, block_index: int) -> tuple[float, ...] | None:
        """Gate of every gated entry for a layer of this block at the current percent (None: no gates)."""
        if self.gate_book is None or self.current is None:
            return None
        key = (block_type, block_index, self.current.percent)
        values = self._gate_values.get(key)
        if values is None:
            values = self.gate_book.values(block_type, block_index, self.current.percent)
            if len(self._gate_values) > 4096:
                self._gate_values.clear()
            self._gate_values[key] = values
        return values

    # --- per call ---------------------------------------------------------------------------------------
    def percent_of(self, sigma: float, model_sampling: Any) -> float:
        return self._progress.percent_of(sigma, model_sampling)

    def composed_entries(self, context: torch.Tensor) -> tuple[bool, ...]:
        """Which batch entries of ``context [B, T, C]`` are the composed prompt."""
        mine = self.prompts.context
        if context is None or context.shape[1] != mine.shape[1] or context.shape[2] != mine.shape[2]:
            return (False,) * (0 if context is None else context.shape[0])
        key = (str(context.device), context.dtype)
        cast = self._contexts.get(key)
        if cast is None:
            cast = mine[0].to(device=context.device, dtype=context.dtype)
            self._contexts[key] = cast
        return tuple(bool(torch.equal(context[b], cast)) for b in range(context.shape[0]))

    def layout_for(self, h: int, w: int, batch: int, chunks: int, extra_tokens: int, composed: tuple[bool, ...],
                   device: torch.device, text_length: int | None = None) -> CallLayout:
        """Layout of one call; ``text_length`` is this call's context length (the plan's when None): an
        uncond of another length runs in its own call with no composed entry."""
        spans = self.prompts.spans
        text_length = spans.total if text_length is None else int(text_length)
        if any(composed) and text_length != spans.total:
            raise PlanError(f"composed entries with text length {text_length}, the plan has {spans.total}")
        key = (h, w, batch, chunks, extra_tokens, composed, str(device), text_length)
        cached = self._layouts.get(key)
        if cached is not None:
            return cached
        p = self.patch_size
        latent_batch = max(1, batch // max(1, chunks))
        masks = region_token_masks(self.plan, h, w, p, latent_batch)  # [N, Bl, grid]
        n, grid = masks.shape[0], masks.shape[2]
        latent_index = torch.arange(batch) % latent_batch
        img = masks.permute(1, 2, 0)[latent_index]  # [B, grid, N]
        img = torch.cat([img, torch.zeros(batch, extra_tokens, n)], dim=1)
        txt = torch.zeros(batch, text_length, n)
        groups: dict[bytes, list[int]] = {}
        labels_of: dict[bytes, torch.Tensor] = {}
        plain = [b for b in range(batch) if not composed[b]]
        text_weights = region_text_weights(self.plan, spans, self.options.global_text_adapters)
        for b in range(batch):
            if not composed[b]:
                continue
            txt[b] = text_weights
            labels = label_joint_sequence(self.plan, masks[:, int(latent_index[b])], spans,
                                          n_image_tokens=grid + extra_tokens)
            sig = labels.numpy().tobytes()
            groups.setdefault(sig, []).append(b)
            labels_of[sig] = labels
        chunk_list: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        if plain:
            chunk_list.append((torch.tensor(plain, device=device), None))
        for sig, members in groups.items():
            chunk_list.append((torch.tensor(members, device=device), labels_of[sig].to(device)))
        if len(chunk_list) == 1:
            chunk_list = [(None, chunk_list[0][1])]
        weights = {"img": img.to(device), "txt": txt.to(device)}
        weights["joint"] = torch.cat([weights["txt"], weights["img"]], dim=1)
        active = frozenset(k for k in range(n) if float(masks[k].max()) > 0.0)
        layout = CallLayout(text_length, grid + extra_tokens, (-(-h // p), -(-w // p)), weights,
                            tuple(chunk_list), active, composed)
        if len(self._layouts) > 16:
            self._layouts.clear()
        self._layouts[key] = layout
        return layout

    def apply_model_wrapper(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None,
                            c_crossattn: torch.Tensor | None = None, control: Any = None,
                            transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
        """``WrappersMP.APPLY_MODEL``: set the per-call state (x ``[B, C, H, W]``, t = sigma ``[B]``), run, clear."""
        base_model = executor.class_obj
        transformer_options = transformer_options if transformer_options is not None else {}
        composed = self.composed_entries(c_crossattn)
        if not any(composed):
            logger.debug("regional composition: no batch entry carries the composed prompt; adapters on image "
                         "tokens only, plain attention")
        p = self.patch_size
        extra = sum((-(-r.shape[-2] // p)) * (-(-r.shape[-1] // p)) for r in (kwargs.get("ref_latents") or []))
        chunks = len(transformer_options.get("cond_or_uncond") or [1])
        text_length = int(c_crossattn.shape[1]) if c_crossattn is not None else self.prompts.spans.total
        layout = self.layout_for(int(x.shape[-2]), int(x.shape[-1]), int(x.shape[0]), chunks, extra,
                                 composed or (False,) * x.shape[0], x.device, text_length)
        previous = self.current
        self.current = CallState(layout, self.percent_of(float(t.flatten()[0]), base_model.model_sampling))
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self.current = previous


def _entry_block_weights(entry: StackEntry, depth: int, depth_single: int) -> BlockWeights:
    text = entry.row.blocks.strip()
    return parse_block_weights(text, depth, depth_single) if text else BlockWeights.uniform(1.0, depth, depth_single)


@dataclass(frozen=True)
class ComposeResult:
    """The patched clone, the composed CONDITIONING and what was left out (module.parameter names)."""

    model: Any
    conditioning: list
    composition: RegionalComposition
    skipped: tuple[str, ...] = field(default_factory=tuple)


def install(model: Any, composition: RegionalComposition, regions: list[ComposedRegion]) -> tuple[Any, list[str]]:
    """Clone ``model`` and install layers, attention override and wrappers; the input patcher is untouched."""
    clone = model.clone()
    diffusion = clone.get_model_object("diffusion_model")
    depth, depth_single = len(diffusion.double_blocks), len(diffusion.single_blocks)
    per_region, gates_by_region, schedules = [], [], []
    for region in regions:
        items, gates = [], []
        for entry in region.entries:
            blocks = _entry_block_weights(entry, depth, depth_single)
            weight_of = (lambda module, b=blocks: b.weight_for(block_of_module(module).block_type,
                                                                 block_of_module(module).index))
            items.append((entry.row.strength, weight_of, entry.adapter_set))
            gate = getattr(entry, "gate", None)
            if gate is None:
                gates.append(SlotGate())
                continue
            gates.append(SlotGate(-1 if gate.schedule is None else len(schedules), gate.learned))
            if gate.schedule is not None:
                schedules.append(gate.schedule)
        per_region.append(items)
        gates_by_region.append(gates)
    composition.gate_book = GateBook(tuple(schedules)) if schedules else None
    slots = layer_slots(per_region, gates_by_region)
    for module, module_slots in sorted(slots.items()):
        key = f"diffusion_model.{module}"
        try:
            original = clone.get_model_object(key)
        except AttributeError as exc:
            source = module_slots[0]
            raise PlanError(f"region {source.region}: adapter module {module} does not exist in this model "
                            f"(a LoRA for a different Flux?)") from exc
        clone.add_object_patch(key, wrap_linear(original, module, tuple(module_slots), composition))
    options = clone.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = RegionalAttention(
        composition, options.get("optimized_attention_override"))
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                               composition.apply_model_wrapper)
    if composition.options.latent_reinit and any(r.region.box is not None for r in regions):
        from .reinit import ReinitWrapper
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY,
                                   ReinitWrapper(composition))
    skipped = unsupported_modules([e.adapter_set for r in regions for e in r.entries])
    if skipped:
        logger.warning("regional composition: %d adapter parts run once per sample and cannot be regional; "
                       "they are not applied (e.g. %s)", len(skipped), skipped[0])
    return clone, skipped


def compose(model: Any, clip: Any, global_prompt: str, regions: list[ComposedRegion],
            options: ComposeOptions = ComposeOptions()) -> ComposeResult:
    """Loom Compose's one function: MODEL, CLIP, prompts and regions -> patched MODEL clone + CONDITIONING."""
    plan = build_plan(global_prompt, regions, options)
    if options.attention_path not in ("grouped", "dense"):
        raise PlanError(f"options.attention_path: {options.attention_path!r} is not 'grouped' or 'dense'")
    prompts = encode_prompts(clip, global_prompt, [r.region.prompt for r in regions], options.trim_region_padding)
    patch = int(getattr(model.get_model_object("diffusion_model"), "patch_size", 2))
    composition = RegionalComposition(plan, prompts, options, patch)
    clone, skipped = install(model, composition, regions)
    if options.refinement:  # LoRA-Composer latent refinement: one gradient step on the latent per early step
        from .refine import WRAPPER_KEY as REFINE_KEY
        from .refine import RefineWrapper

        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, REFINE_KEY,
                                   RefineWrapper(composition))
    conditioning = [[prompts.context, dict(prompts.extra)]]
    return ComposeResult(clone, conditioning, composition, tuple(skipped))


__all__ = ["AdapterSlot", "CallLayout", "CallState", "ComposeOptions", "ComposeResult", "ComposedRegion",
           "EncodedPrompts", "RegionalComposition", "WRAPPER_KEY", "build_plan", "compose", "encode_prompts",
           "install", "parse_rule_blocks"]
