"""The methods a benchmark row compares, each set up the way its users run it, as (model, positive CONDITIONING).

* ``base`` — the model alone; ``merged`` — every LoRA merged through ComfyUI's patch system (``apply_merged``);
* ``regional`` — Loom regional composition (per-token adapters + grouped attention rules, one pass) over the global
  prompt and the *trimmed* region prompts (Loom Compose drops a region prompt's padding after its end token);
* ``dense_per_head`` — the same composition with the global-patch peers' attention layout: a dense mask
  materialised per head, ``[B, H, L, L]``, rebuilt at every attention call (what replacing Flux's attention globally
  with a masked one costs). It models a peer, so its region prompts are *full length*, as the peers' users encode
  them (none trims);
* ``hooks`` — ComfyUI core hook LoRAs with masks, built with ComfyUI's *real* hook nodes: ``CreateHookLora``
  (chained per region) and ``ConditioningSetProperties`` (mask + hooks) from ``comfy_extras/nodes_hooks.py``;
  ComfyUI's sampler then runs one pass per hook group and blends the predictions by mask; full-length region
  prompts (hook conditioning is not trimmed);
* ``gates`` — Loom gated LoRA stack (per-token adapters on the whole canvas, gates in the layers, one pass);
* ``clora`` — Loom CLoRA (1 + N passes batched, attention probes, masked fusion; latent updates early on);
  full-length prompts (CLoRA does not trim);
* ``composite`` — LoRA Composite (Zhong et al.): one pass per LoRA, predictions averaged, expressed with the same
  hook nodes (one unmasked conditioning per LoRA; ComfyUI averages equal-strength conds).

LoRA files for the hook nodes are written as ComfyUI-format safetensors into a folder registered under ``loras``.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import folder_paths
import torch
from comfy_extras.nodes_hooks import ConditioningSetProperties, CreateHookLora
from safetensors.torch import save_file

from ..composition.adapters import LoRA
from ..composition.clora import CLoraOptions
from ..composition.comfy_bridge.clora import clora_controller
from ..composition.comfy_bridge.merged import apply_merged
from ..composition.comfy_bridge.regional import build_plan, regional_controller
from ..composition.comfy_bridge.runtime import install
from ..composition.comfy_bridge.stack import install_gated
from ..composition.plan import ComposedRegion, ComposeOptions, Region, TextSpans
from ..composition.prompts import EncodedPrompt
from ..composition.runtime.clora import CLoraConcept
from ..composition.runtime.gated import GatedOptions
from ..composition.stack import StackEntry

logger = logging.getLogger(__name__)

PEER_METHODS = ("hooks", "dense_per_head", "composite")


class BaselineError(ValueError):
    """A baseline cannot be built from what was given; the message names the method and field."""


@dataclass(frozen=True)
class MethodSetup:
    """What one method samples with: ``model`` (a ModelPatcher clone), ``positive`` CONDITIONING, ``passes`` per
    step, and the regional ``composition`` when there is one."""

    method: str
    model: Any
    positive: list
    passes: int
    composition: Any = None


@dataclass(frozen=True)
class Scene:
    """Prompts and layout shared by every method of one row: ``global_context [1, T, C]``, ``region_contexts``
    (one full-length ``[1, T, C]`` each, what the peers sample), ``pooled [1, V]``, region boxes ``(x0, y0, x1, y1)``
    as fractions, the adapters each region paints, and ``region_tokens``: how much of each region prompt Loom
    Compose keeps once it trims the padding (None = all of it)."""

    global_context: torch.Tensor
    region_contexts: tuple[torch.Tensor, ...]
    pooled: torch.Tensor
    boxes: tuple[tuple[float, float, float, float], ...]
    painters: tuple[tuple[StackEntry, ...], ...]
    region_tokens: int | None = None

    @property
    def trimmed_region_contexts(self) -> tuple[torch.Tensor, ...]:
        """Loom's region prompts: the first ``region_tokens`` of each (trimming keeps the words and the end token,
        a prefix), ``[1, region_tokens, C]`` each."""
        if self.region_tokens is None:
            return self.region_contexts
        return tuple(c[:, :self.region_tokens] for c in self.region_contexts)


def strip_boxes(n_regions: int) -> tuple[tuple[float, float, float, float], ...]:
    """``n_regions`` vertical strips of equal width covering the image."""
    return tuple((k / n_regions, 0.0, (k + 1) / n_regions, 1.0) for k in range(n_regions))


def make_scene(entries: Sequence[StackEntry], n_regions: int, prompt_tokens: int, context_dim: int, vec_dim: int,
               seed: int = 1, region_tokens: int | None = None) -> Scene:
    """Random prompts, each ``prompt_tokens`` long; Loom's regional method keeps the first ``region_tokens`` of
    each region prompt (None = all; Loom Compose trims a region prompt after its end token, so a few-word CLIP-L
    region prompt keeps words + 2 tokens), the peers sample them whole. Adapter ``i`` paints region
    ``i % n_regions`` (as ``run_compose_bench`` does)."""
    if n_regions < 1 or not entries:
        raise BaselineError(f"scene: need >= 1 region and >= 1 adapter, got {n_regions} and {len(entries)}")
    if prompt_tokens < 1 or (region_tokens is not None and not 1 <= region_tokens <= prompt_tokens):
        raise BaselineError(f"scene: need prompt_tokens >= 1 and 1 <= region_tokens <= prompt_tokens (a trimmed "
                            f"prompt is never longer), got {prompt_tokens} and {region_tokens}")
    gen = torch.Generator().manual_seed(seed)
    contexts = [torch.randn(1, prompt_tokens, context_dim, generator=gen) for _ in range(1 + n_regions)]
    painters = tuple(tuple(e for i, e in enumerate(entries) if i % n_regions == k) for k in range(n_regions))
    return Scene(contexts[0], tuple(contexts[1:]), torch.randn(1, vec_dim, generator=gen), strip_boxes(n_regions),
                 painters, region_tokens)


def _cond(context: torch.Tensor, pooled: torch.Tensor) -> list:
    return [[context, {"pooled_output": pooled, "guidance": 3.5}]]


def base_setup(patcher: Any, scene: Scene) -> MethodSetup:
    return MethodSetup("base", patcher.clone(), _cond(scene.global_context, scene.pooled), 1)


def merged_setup(patcher: Any, scene: Scene) -> MethodSetup:
    entries = [e for group in scene.painters for e in group]
    merged = apply_merged(patcher, None, entries).model
    return MethodSetup("merged", merged, _cond(scene.global_context, scene.pooled), 1)


def regional_setup(patcher: Any, scene: Scene, attention_path: str = "grouped", method: str = "regional",
                   options: ComposeOptions | None = None, trimmed: bool = True) -> MethodSetup:
    """Loom regional composition with its rules active for the whole run (``end_percent=1``), over the global prompt
    and the region prompts — trimmed as Loom Compose trims them, or full length (``trimmed=False``)."""
    regions = [ComposedRegion(Region(prompt=f"region {k}", box=box), scene.painters[k])
               for k, box in enumerate(scene.boxes)]
    region_contexts = scene.trimmed_region_contexts if trimmed else scene.region_contexts
    lengths = [int(c.shape[1]) for c in region_contexts]
    spans = TextSpans.from_lengths(int(scene.global_context.shape[1]), lengths)
    context = torch.cat([scene.global_context, *region_contexts], dim=1)
    prompt = EncodedPrompt("bench", context, {"pooled_output": scene.pooled}, None,
                           {k: tuple(range(s.start, s.end)) for k, s in enumerate(spans.region_spans)}, spans)
    options = options or ComposeOptions(latent_reinit=False, attention_path=attention_path, end_percent=1.0)
    patch = int(getattr(patcher.get_model_object("diffusion_model"), "patch_size", 2))
    controller = regional_controller(build_plan("bench", regions, options), prompt, regions, patch)
    return MethodSetup(method, install(patcher, controller).model, _cond(context, scene.pooled), 1, controller)


class PerHeadMaskAttention:
    """An ``optimized_attention_override`` that turns every broadcast mask ``[1, 1, L, L]`` into a materialised
    per-head ``[B, H, L, L]`` copy, rebuilt at each call — the memory layout of peers that patch attention globally."""

    def __init__(self, previous: Callable | None = None) -> None:
        self.previous = previous
        self.calls = 0

    def __deepcopy__(self, memo: dict) -> PerHeadMaskAttention:
        return self

    def __call__(self, func: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        mask = kwargs.get("mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 4 and q.ndim == 4:
            kwargs = {**kwargs, "mask": mask.expand(q.shape[0], q.shape[1], *mask.shape[-2:]).clone()}
            self.calls += 1
        if self.previous is not None:
            return self.previous(func, q, k, v, heads, *args, **kwargs)
        return func(q, k, v, heads, *args, **kwargs)


def dense_per_head_setup(patcher: Any, scene: Scene) -> MethodSetup:
    """Regional composition on the dense path, with a per-head mask materialised downstream of its rules: the
    global-patch peers' layout. It models a peer, so it composes the peers' prompts — full-length region prompts
    (``prompt_tokens`` each, as their users encode them), not Loom Compose's trimmed ones."""
    clone = patcher.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = PerHeadMaskAttention(options.get("optimized_attention_override"))
    return regional_setup(clone, scene, attention_path="dense", method="dense_per_head", trimmed=False)


def gates_setup(patcher: Any, scene: Scene) -> MethodSetup:
    """Loom gated LoRA stack (mode ``gated``): every adapter per token on the whole canvas, gates evaluated in the
    layers, global prompt; one pass."""
    entries = [e for group in scene.painters for e in group]
    result = install_gated(patcher, entries, GatedOptions(mode="gated"))
    return MethodSetup("gates", result.model, _cond(scene.global_context, scene.pooled), 1)


def clora_setup(patcher: Any, scene: Scene) -> MethodSetup:
    """Loom CLoRA with its default options: one concept per adapter (concept token ``1 + i`` of the global prompt
    and of adapter i's own prompt, the full-length region prompt of its region — CLoRA does not trim), 1 + N
    passes per step."""
    entries = [e for group in scene.painters for e in group]
    n = len(entries)
    region_of = {e.path: k for k, group in enumerate(scene.painters) for e in group}
    pooled = {"pooled_output": scene.pooled}
    base = EncodedPrompt("bench", scene.global_context, pooled, None, {i: (1 + i,) for i in range(n)})
    prompts = (base,) + tuple(EncodedPrompt(f"bench {i}", scene.region_contexts[region_of[e.path]], pooled, None,
                                            {i: (1 + i,)}) for i, e in enumerate(entries))
    concepts = [CLoraConcept("bench", f"c{i}", (e,)) for i, e in enumerate(entries)]
    patch = int(getattr(patcher.get_model_object("diffusion_model"), "patch_size", 2))
    controller = clora_controller(concepts, prompts, CLoraOptions(), patch)
    return MethodSetup("clora", install(patcher, controller).model, _cond(scene.global_context, scene.pooled), 1 + n,
                       controller)


def lora_state_dict(entry: StackEntry) -> dict[str, torch.Tensor]:
    """One bench LoRA as a ComfyUI-format file: ``diffusion_model.<module>.lora_up/lora_down.weight`` + ``alpha``."""
    out: dict[str, torch.Tensor] = {}
    for module, adapters in entry.adapter_set.adapters.items():
        for a in adapters:
            if not isinstance(a, LoRA) or a.offset is not None or a.mid is not None:
                raise BaselineError(f"hooks: {entry.path}: {module} is not a plain LoRA; hook files need plain LoRAs")
            out[f"diffusion_model.{module}.lora_up.weight"] = a.up.contiguous()
            out[f"diffusion_model.{module}.lora_down.weight"] = a.down.contiguous()
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(a.alpha if a.alpha is not None
                                                                        else a.down.shape[0]))
    return out


def write_hook_loras(entries: Sequence[StackEntry], folder: Path) -> dict[str, str]:
    """Write each entry as ``<name>.safetensors`` in ``folder`` (see :func:`hook_loras_folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for entry in entries:
        name = f"{entry.path}.safetensors"
        if not (folder / name).exists():
            save_file(lora_state_dict(entry), str(folder / name))
        names[entry.path] = name
    return names


@contextlib.contextmanager
def hook_loras_folder(folder: Path) -> Iterator[None]:
    """``folder`` is one of ComfyUI's ``loras`` folders only while the hook nodes load their files (they read
    them at creation); the previous folder list is restored after, so nothing outlives the baseline set-up."""
    before = list(folder_paths.folder_names_and_paths["loras"][0])
    folder_paths.add_model_folder_path("loras", str(folder))
    try:
        yield
    finally:
        folder_paths.folder_names_and_paths["loras"][0][:] = before


def _hooks_for(entries: Sequence[StackEntry], names: dict[str, str], strength: Callable[[StackEntry], float]) -> Any:
    hooks = None
    node = CreateHookLora()
    for entry in entries:
        (hooks,) = node.create_hook(lora_name=names[entry.path], strength_model=strength(entry), strength_clip=0.0,
                                    prev_hooks=hooks)
    return hooks


def region_mask(box: tuple[float, float, float, float], height: int, width: int) -> torch.Tensor:
    """A hard ``[1, H, W]`` MASK covering ``box`` (fractions), at latent resolution (ComfyUI resizes it anyway)."""
    mask = torch.zeros(1, height, width)
    x0, y0, x1, y1 = box
    mask[:, round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = 1.0
    return mask


def hooks_setup(patcher: Any, scene: Scene, folder: Path, latent_hw: tuple[int, int]) -> MethodSetup:
    """ComfyUI hook LoRAs with masks: per region ``CreateHookLora`` (its painters, chained) then
    ``ConditioningSetProperties(mask, hooks)`` on the full-length region prompt (hook conditioning is not trimmed);
    the conds are combined (a list concat, as ``ConditioningCombine``). One pass per hook group per step."""
    names = write_hook_loras([e for group in scene.painters for e in group], folder)
    positive: list = []
    setter = ConditioningSetProperties()
    for k, (box, painters) in enumerate(zip(scene.boxes, scene.painters)):
        with hook_loras_folder(folder):
            hooks = _hooks_for(painters, names, lambda e: e.row.strength)
        (cond,) = setter.set_properties(cond_NEW=_cond(scene.region_contexts[k], scene.pooled), strength=1.0,
                                        set_cond_area="default", mask=region_mask(box, *latent_hw), hooks=hooks)
        positive += cond
    return MethodSetup("hooks", patcher.clone(), positive, len(scene.boxes))


def composite_setup(patcher: Any, scene: Scene, folder: Path) -> MethodSetup:
    """LoRA Composite: one unmasked conditioning per LoRA (full strength, its own hook group), averaged by
    ComfyUI's cond blending — ``mean_i model_{W + ΔW_i}(x, global prompt)``. One pass per LoRA per step."""
    entries = [e for group in scene.painters for e in group]
    names = write_hook_loras(entries, folder)
    positive: list = []
    setter = ConditioningSetProperties()
    for entry in entries:
        with hook_loras_folder(folder):
            hooks = _hooks_for([entry], names, lambda e: 1.0)
        (cond,) = setter.set_properties(cond_NEW=_cond(scene.global_context, scene.pooled), strength=1.0,
                                        set_cond_area="default", mask=None, hooks=hooks)
        positive += cond
    return MethodSetup("composite", patcher.clone(), positive, len(entries))


__all__ = ["PEER_METHODS", "BaselineError", "MethodSetup", "PerHeadMaskAttention", "Scene", "base_setup",
           "clora_setup", "composite_setup", "dense_per_head_setup", "gates_setup", "hooks_setup", "lora_state_dict",
           "hook_loras_folder", "make_scene", "merged_setup", "region_mask", "regional_setup", "strip_boxes",
           "write_hook_loras"]
