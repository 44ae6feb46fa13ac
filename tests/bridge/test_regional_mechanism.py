"""Regional composition on real ComfyUI Flux models (tiny, in-process): the mechanism invariants.

Helpers first (synthetic LoRAs, composed clones, a model call through ComfyUI's own ``BaseModel.apply_model``
with the clone's wrappers), then the invariants: full-region == merged LoRA, isolation is bit-exact, probed
probabilities respect the rules, grouped == dense, stacked kernel == per-adapter reference, no leakage,
mixed batches.
"""
from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
import zlib
from pathlib import Path

import folder_paths
import pytest
import torch
from comfy_models import flux_inputs, tiny_flux
from lora_loom.composition.adapters import AdapterSet, LoRA
from lora_loom.composition.adapters.common import Offset
from lora_loom.composition.comfy_bridge.merged import apply_merged
from lora_loom.composition.comfy_bridge.regional import build_plan, regional_controller
from lora_loom.composition.comfy_bridge.runtime import install, runtime_of
from lora_loom.composition.plan import ComposedRegion, ComposeOptions, Region, TextSpans
from lora_loom.composition.prompts import EncodedPrompt
from lora_loom.composition.regional import ActiveRules, allowed_groups
from lora_loom.composition.runtime.layers import LoomLinear
from lora_loom.composition.runtime.regional import RegionalState
from lora_loom.composition.stack import StackEntry, StackRow
from lora_loom.kernels.probes import attention_probabilities

IMAGE_MODULES = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin")
TEXT_MODULES = ("txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin")
SINGLE_MODULES = ("linear1", "linear2", "modulation.lin")


def model_shapes(patcher) -> dict[str, tuple[int, ...]]:
    return {k.removeprefix("diffusion_model."): tuple(v.shape)
            for k, v in patcher.model.state_dict().items() if k.startswith("diffusion_model.")}


def flux_modules(patcher, parts: str = "all") -> list[str]:
    """Canonical Linear modules of the tiny model: ``image`` (double img), ``all`` (double img+txt, single)."""
    diffusion = patcher.model.diffusion_model
    names = [f"double_blocks.{i}.{m}" for i in range(len(diffusion.double_blocks)) for m in IMAGE_MODULES]
    if parts == "all":
        names += [f"double_blocks.{i}.{m}" for i in range(len(diffusion.double_blocks)) for m in TEXT_MODULES]
        names += [f"single_blocks.{i}.{m}" for i in range(len(diffusion.single_blocks)) for m in SINGLE_MODULES]
    return names


def lora_set(patcher, modules: list[str], seed: int, rank: int = 4, scale: float = 0.5,
             split_qkv: bool = False, name: str = "test") -> AdapterSet:
    """A LoRA on every module (float32); ``split_qkv`` writes fused qkv as three offset slices."""
    shapes = model_shapes(patcher)
    adapters = {}
    for module in modules:
        out, inp = shapes[f"{module}.weight"]
        gen = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(module.encode()))
        parts = [(None, out)] if not (split_qkv and module.endswith("qkv")) else \
            [(Offset(0, i * out // 3, out // 3), out // 3) for i in range(3)]
        adapters[module] = tuple(
            LoRA(up=torch.randn(rows, rank, generator=gen) * scale / rank ** 0.5,
                 down=torch.randn(rank, inp, generator=gen) / inp ** 0.5, target_shape=(out, inp),
                 alpha=float(rank), offset=offset)
            for offset, rows in parts)
    return AdapterSet(source=name, format="test", adapters=adapters)


def entry(adapter_set: AdapterSet, strength: float = 1.0, blocks: str = "") -> StackEntry:
    return StackEntry(row=StackRow(lora=adapter_set.source, strength=strength, blocks=blocks),
                      adapter_set=adapter_set, path=adapter_set.source)


def prompts(patcher, global_length: int, region_lengths: list[int], seed: int = 5) -> EncodedPrompt:
    """Random text embeddings standing in for CLIP output, with the composed spans."""
    width = patcher.model.model_config.unet_config["context_in_dim"]
    spans = TextSpans.from_lengths(global_length, region_lengths)
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(1, spans.total, width, generator=gen)
    concepts = {k: tuple(range(s.start, s.end)) for k, s in enumerate(spans.region_spans)}
    return EncodedPrompt("composed", context, {}, None, concepts, spans)


def compose_clone(patcher, regions: list[ComposedRegion], options: ComposeOptions, encoded: EncodedPrompt):
    """(clone, regional controller) for ``regions`` over the composed prompt ``encoded``."""
    plan = build_plan("global", regions, options)
    controller = regional_controller(plan, encoded, regions, patcher.model.diffusion_model.patch_size)
    return install(patcher, controller).model, controller


@contextlib.contextmanager
def in_call(clone, layout, percent: float = 0.0):
    """The clone's runtime in a model call of one regional pass with ``layout`` (its only controller)."""
    runtime = runtime_of(clone)
    runtime.current = (RegionalState(layout.weights, layout.active, percent, layout),)
    try:
        yield runtime
    finally:
        runtime.current = None


def box_region(box, adapters=(), prompt: str = "region", **region_fields) -> ComposedRegion:
    return ComposedRegion(Region(prompt=prompt, box=tuple(box), **region_fields), tuple(adapters))


def apply_model(patcher, x: torch.Tensor, sigma: float, context: torch.Tensor, y: torch.Tensor,
                guidance: float = 3.5, cond_or_uncond: list[int] | None = None) -> torch.Tensor:
    """One denoised prediction through ComfyUI's ``BaseModel.apply_model`` with the patcher's object patches,
    transformer options and wrappers in place (patched for the call, unpatched after)."""
    import comfy.patcher_extension

    patcher.patch_model()
    try:
        options = comfy.patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
        comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), patcher.wrappers,
                                                   copy_dict1=False)
        options["cond_or_uncond"] = cond_or_uncond or [0] * 1
        batch = x.shape[0]
        with torch.inference_mode():
            return patcher.model.apply_model(x, torch.full((batch,), sigma), c_crossattn=context,
                                             transformer_options=options, y=y,
                                             guidance=torch.full((batch,), guidance)).clone()
    finally:
        patcher.unpatch_model()


# --------------------------------------------------------------------------------------------------------------
HIGH_SIGMA = 0.98  # early in sampling: inside the rules' default window
ALWAYS = dict(start_percent=0.0, end_percent=1.0)
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def inputs(flux):
    return flux_inputs(flux, latent_hw=(8, 8))


def two_regions(flux, options, strength_b: float = 1.0, with_b: bool = True, parts: str = "all"):
    a = lora_set(flux, flux_modules(flux, parts), seed=1, name="a", split_qkv=True)
    b = lora_set(flux, flux_modules(flux, parts), seed=2, name="b")
    regions = [box_region(LEFT, [entry(a)], prompt="left"),
               box_region(RIGHT, [entry(b, strength_b)] if with_b else [], prompt="right")]
    encoded = prompts(flux, 4, [3, 3])
    clone, composition = compose_clone(flux, regions, options, encoded)
    return clone, composition, encoded


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.bfloat16, 5e-2)])
def test_full_canvas_region_reproduces_the_merged_lora(dtype, tolerance):
    """One region covering the canvas, one image-stream LoRA, isolation on: the merged-LoRA prediction.

    Tolerance: max |diff| <= 2e-5 (fp32) / 5e-2 (bf16: ~3 ulps at the predictions' magnitude ~3) — per-token
    ``base(x) + x·Δᵀ`` vs merged ``(W + Δ)·x`` differ only by rounding."""
    flux = tiny_flux(seed=0, dtype=dtype)
    inputs = flux_inputs(flux, latent_hw=(8, 6))
    adapters = lora_set(flux, flux_modules(flux, "image"), seed=3, name="full")
    encoded = prompts(flux, 4, [3])
    options = ComposeOptions(injection=False, base_blend=False, latent_reinit=False, **ALWAYS)
    clone, _ = compose_clone(flux, [box_region((0, 0, 1, 1), [entry(adapters, 0.8)])], options, encoded)
    merged = apply_merged(flux, None, [entry(adapters, 0.8)]).model
    context = encoded.context.to(dtype)
    composed = apply_model(clone, inputs["x"], HIGH_SIGMA, context, inputs["y"])
    reference = apply_model(merged, inputs["x"], HIGH_SIGMA, context, inputs["y"])
    plain = apply_model(flux, inputs["x"], HIGH_SIGMA, context, inputs["y"])
    assert (reference - plain).abs().max() > 10 * tolerance  # the LoRA matters
    assert (composed - reference).abs().max() <= tolerance


def _record_blocks(clone, n_double: int, n_single: int, feed: dict | None = None) -> dict:
    """Install replace patches on ``clone`` that record each block's inputs and outputs; with ``feed`` the
    recorded inputs of another run are substituted, so every block sees identical inputs."""
    record = {}

    def make(kind, index):
        def patch(args, extra):
            key = (kind, index)
            if feed is not None:
                args = {**args, **{k: v.clone() for k, v in feed[key]["in"].items()}}
            inputs = {k: args[k].clone() for k in (("img", "txt") if kind == "double_block" else ("img",))}
            out = extra["original_block"](args)
            record[key] = {"in": inputs, "out": {k: v.clone() for k, v in out.items()}}
            return out
        return patch

    for i in range(n_double):
        clone.set_model_patch_replace(make("double_block", i), "dit", "double_block", i)
    for i in range(n_single):
        clone.set_model_patch_replace(make("single_block", i), "dit", "single_block", i)
    return record


@pytest.mark.parametrize("background", ["global", "isolated"])
def test_isolation_keeps_other_regions_bit_identical(flux, inputs, background):
    """Adapter b (right region) in or out of the plan: left/background image tokens' block outputs are equal
    bit for bit in every block (isolation active everywhere), given the same block inputs. Base-ratio blending
    is off: it mixes in a non-isolated base attention by design (Regional-Prompting-FLUX); so are global-text
    adapters: they read the shared global prompt with every region's adapters (the test below)."""
    options = ComposeOptions(background=background, base_blend=False, latent_reinit=False, isolation=True,
                             global_text_adapters=False, **ALWAYS)
    with_b, composition, encoded = two_regions(flux, options)
    without_b, _, _ = two_regions(flux, options, with_b=False)
    record = _record_blocks(with_b, 2, 2)
    apply_model(with_b, inputs["x"], HIGH_SIGMA, encoded.context, inputs["y"])
    replay = _record_blocks(without_b, 2, 2, feed=record)
    apply_model(without_b, inputs["x"], HIGH_SIGMA, encoded.context, inputs["y"])
    layout = composition.layout_for(8, 8, 1, 1, 0, (True,), torch.device("cpu"))
    right = layout.weights["img"][0, :, 1] > 0  # [L_img] tokens touched by region b
    t = encoded.spans.total
    compared = 0
    for key, value in record.items():
        img = value["out"]["img"] if key[0] == "double_block" else value["out"]["img"][:, t:]
        other = replay[key]["out"]["img"] if key[0] == "double_block" else replay[key]["out"]["img"][:, t:]
        assert torch.equal(img[:, ~right], other[:, ~right]), key
        assert not torch.equal(img[:, right], other[:, right]), key  # adapter b really acted
        compared += 1
    assert compared == 4


def test_global_text_adapters_read_the_global_prompt_with_every_region_adapter(flux):
    on, composition, encoded = two_regions(flux, ComposeOptions(latent_reinit=False, global_text_adapters=True,
                                                                **ALWAYS))
    off, strict, _ = two_regions(flux, ComposeOptions(latent_reinit=False, **ALWAYS))  # the default: off
    spans = encoded.spans
    shared = composition.layout_for(8, 8, 1, 1, 0, (True,), torch.device("cpu")).weights["txt"][0]
    alone = strict.layout_for(8, 8, 1, 1, 0, (True,), torch.device("cpu")).weights["txt"][0]
    assert shared[spans.global_span.start:spans.global_span.end].eq(1).all()
    assert alone[spans.global_span.start:spans.global_span.end].eq(0).all()
    for k, span in enumerate(spans.region_spans):  # region prompts: only their own region's adapters either way
        assert torch.equal(shared[span.start:span.end], alone[span.start:span.end])
        assert shared[span.start:span.end, k].eq(1).all() and shared[span.start:span.end].sum() == span.end - span.start


def test_probed_probabilities_obey_the_rules(flux, inputs):
    """Region-k image queries put exactly zero probability on region-j prompt tokens (j != k) and on other
    regions' image tokens; every row sums to one; the override's output is that distribution applied to v."""
    import comfy.ldm.modules.attention as attention

    options = ComposeOptions(base_blend=False, latent_reinit=False, isolation=True, **ALWAYS)
    clone, composition, encoded = two_regions(flux, options)
    seen = []

    class Probe:
        def observe(self, q, k, layout, block_type, block_index):
            seen.append((q.clone(), k.clone(), layout, block_type, block_index))

    composition.probe = Probe()
    apply_model(clone, inputs["x"], HIGH_SIGMA, encoded.context, inputs["y"])
    composition.probe = None
    assert len(seen) == 4
    allowed = allowed_groups(composition.plan, ActiveRules(True, True, False))
    spans = encoded.spans
    for q, k, layout, block_type, block_index in seen:
        labels = layout.chunks[0][1]
        image = torch.arange(spans.total, q.shape[2])
        region_of_image = (labels[spans.total:] - 3) // 2  # -1 = background
        for region, other in ((0, 1), (1, 0)):
            queries = image[region_of_image == region]
            forbidden = torch.cat([torch.arange(spans.region_spans[other].start, spans.region_spans[other].end),
                                   image[region_of_image == other]])
            probe = attention_probabilities(q, k, queries, forbidden, labels=labels, allowed=allowed)
            assert torch.count_nonzero(probe.probabilities) == 0
            assert torch.allclose(probe.row_sums, torch.ones_like(probe.row_sums), atol=1e-5)
        everything = torch.arange(q.shape[2])
        full = attention_probabilities(q, k, everything, everything, labels=labels, allowed=allowed)
        v = torch.randn(q.shape, generator=torch.Generator().manual_seed(block_index))
        with in_call(clone, layout):
            out = clone.model_options["transformer_options"]["optimized_attention_override"](
                attention.attention_pytorch, q, k, v, q.shape[1], skip_reshape=True, mask=None,
                transformer_options={"block_type": block_type, "block_index": block_index})
        expected = (full.probabilities @ v.float()).transpose(1, 2).reshape(out.shape)
        assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("base_blend, isolation", [(False, False), (True, False), (False, True), (True, True)])
def test_grouped_path_equals_dense_path(flux, inputs, base_blend, isolation):
    preds = []
    for path in ("grouped", "dense"):
        options = ComposeOptions(attention_path=path, base_blend=base_blend, isolation=isolation, latent_reinit=False,
                                 **ALWAYS)
        clone, _, encoded = two_regions(flux, options)
        preds.append(apply_model(clone, inputs["x"], HIGH_SIGMA, encoded.context, inputs["y"]))
    plain_clone, _, encoded = two_regions(flux, ComposeOptions(injection=False, isolation=False,
                                                               latent_reinit=False))
    plain = apply_model(plain_clone, inputs["x"], HIGH_SIGMA, encoded.context, inputs["y"])
    assert (preds[0] - plain).abs().max() > 1e-3  # the rules change the prediction
    assert torch.allclose(preds[0], preds[1], atol=1e-5, rtol=1e-5)


def _wrapped(clone, module: str):
    return clone.object_patches[f"diffusion_model.{module}"]


@pytest.mark.parametrize("module", ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0",
                                    "single_blocks.0.linear1", "single_blocks.1.modulation.lin",
                                    "double_blocks.0.img_mod.lin"])
def test_stacked_adapters_equal_the_per_adapter_reference(flux, inputs, module):
    """The wrapped layer == base + Σ_i strength_i · weight_i[token] · bypass_i(x), adapters one by one."""
    options = ComposeOptions(latent_reinit=False)
    clone, composition, encoded = two_regions(flux, options, strength_b=0.6)
    layer = _wrapped(clone, module)
    assert isinstance(layer, LoomLinear)
    layout = composition.layout_for(8, 8, 1, 1, 0, (True,), torch.device("cpu"))
    weights = layout.weights[layer.loom_stream]  # [1, L, 2]
    per_sample = module.endswith("mod.lin") or module.endswith("modulation.lin")
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 1 if per_sample else weights.shape[1], layer.weight.shape[1], generator=gen)
    with in_call(clone, layout):
        out = layer(x)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    expected = base.expand(1, weights.shape[1], -1).clone()
    for slot in layer.loom_cache["slots"]:
        y = slot.adapter.bypass_delta(x)
        rows = slice(slot.adapter.offset.start, slot.adapter.offset.stop) if slot.adapter.offset else slice(None)
        expected[..., rows] += slot.strength * weights[..., slot.group:slot.group + 1] * y
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    untouched = weights.sum(-1) == 0  # global text tokens: exactly the base layer
    if untouched.any():
        assert torch.equal(out[untouched], base.expand_as(out)[untouched])


_FRESH = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import conftest  # loads the pack and puts tests/ on sys.path
from lora_loom.comfy_env import find_comfyui, import_comfy
import tempfile
import_comfy(find_comfyui({comfy!r}), cpu=True, base_directory=tempfile.mkdtemp())
from comfy_models import flux_inputs, tiny_flux
flux = tiny_flux(seed=0)
inputs = flux_inputs(flux, latent_hw=(8, 8))
context = torch.load({context!r})
flux.patch_model()
with torch.inference_mode():
    out = flux.model.apply_model(inputs["x"], torch.full((1,), {sigma}), c_crossattn=context,
                                 transformer_options={{}}, y=inputs["y"], guidance=torch.full((1,), 3.5))
torch.save(out.clone(), {target!r})
"""


def test_no_leakage_into_the_original_patcher_or_later_runs(flux, inputs, tmp_path):
    before_options = copy.deepcopy(flux.model_options)
    before_modules = {n: type(m) for n, m in flux.model.named_modules()}
    clone, _, encoded = two_regions(flux, ComposeOptions(latent_reinit=False, **ALWAYS))
    apply_model(clone, inputs["x"], HIGH_SIGMA, encoded.context, inputs["y"])
    assert flux.object_patches == {} and flux.wrappers == {}
    assert "optimized_attention_override" not in flux.model_options["transformer_options"]
    assert flux.model_options.keys() == before_options.keys()
    assert {n: type(m) for n, m in flux.model.named_modules()} == before_modules
    after = apply_model(flux, inputs["x"], HIGH_SIGMA, encoded.context, inputs["y"])
    torch.save(encoded.context, tmp_path / "context.pt")
    tests = Path(__file__).resolve().parents[1]
    script = _FRESH.format(tests=str(tests), comfy=str(Path(folder_paths.__file__).parent),  # this ComfyUI
                           context=str(tmp_path / "context.pt"), sigma=HIGH_SIGMA,
                           target=str(tmp_path / "fresh.pt"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(tmp_path / "fresh.pt")
    assert torch.equal(after, fresh)


def test_mixed_batch_runs_rules_only_for_the_composed_entry(flux, inputs):
    """cond (the composed prompt) and a zeroed uncond batched together == each run alone."""
    clone, _, encoded = two_regions(flux, ComposeOptions(latent_reinit=False, **ALWAYS))
    zero = torch.zeros_like(encoded.context)
    x2 = torch.cat([inputs["x"]] * 2)
    y2 = torch.cat([inputs["y"]] * 2)
    both = apply_model(clone, x2, HIGH_SIGMA, torch.cat([encoded.context, zero]), y2, cond_or_uncond=[0, 1])
    alone_cond = apply_model(clone, inputs["x"], HIGH_SIGMA, encoded.context, inputs["y"])
    alone_uncond = apply_model(clone, inputs["x"], HIGH_SIGMA, zero, inputs["y"])
    assert torch.allclose(both[:1], alone_cond, atol=1e-5)
    assert torch.allclose(both[1:], alone_uncond, atol=1e-5)
    no_rules, _, _ = two_regions(flux, ComposeOptions(injection=False, isolation=False, latent_reinit=False))
    assert torch.allclose(alone_uncond, apply_model(no_rules, inputs["x"], HIGH_SIGMA, zero, inputs["y"]),
                          atol=1e-6)


def test_uncond_of_another_text_length_runs_plain_in_its_own_call(flux, inputs):
    """ComfyUI runs a negative of a different length in its own call: no rules, adapters on image tokens only."""
    clone, _, encoded = two_regions(flux, ComposeOptions(latent_reinit=False, **ALWAYS))
    short = torch.randn(1, 5, encoded.context.shape[-1], generator=torch.Generator().manual_seed(3))
    out = apply_model(clone, inputs["x"], HIGH_SIGMA, short, inputs["y"])
    no_rules, _, _ = two_regions(flux, ComposeOptions(injection=False, isolation=False, latent_reinit=False))
    assert torch.allclose(out, apply_model(no_rules, inputs["x"], HIGH_SIGMA, short, inputs["y"]), atol=1e-6)
    assert not torch.allclose(out, apply_model(flux, inputs["x"], HIGH_SIGMA, short, inputs["y"]), atol=1e-3)
