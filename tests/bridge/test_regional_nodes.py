"""Loom Region / Regions / Compose / Region Preview in-process, sampling through ComfyUI's own samplers, and
LoRA-Composer latent re-initialisation (window search, renormalisation, the probing pass)."""
from __future__ import annotations

import inspect
import types
import zlib

import comfy.sample
import pytest
import torch
from lora_loom.composition.adapters import AdapterSet, LoRA
from lora_loom.composition.comfy_bridge.regional import compose
from lora_loom.composition.comfy_bridge.reinit import (
    ConceptMaps,
    ReinitWrapper,
    TokenBox,
    best_window,
    reinitialise_noise,
)
from lora_loom.composition.comfy_bridge.runtime import runtime_of
from lora_loom.composition.plan import ComposeOptions, PlanError, parse_rule_blocks
from lora_loom.composition.stack import StackEntry, StackRow
from lora_loom.nodes.regions import LoomCompose, LoomRegion, LoomRegionPreview, LoomRegionsCombine


class StubClip:
    """Tokenize/encode like a CLIP-L: 8 tokens (start, words, end, padding) -> ``[1, 8, context_in_dim]``; its
    tokenizer tells its special tokens as ComfyUI's ``SDTokenizer`` does."""

    tokenizer = types.SimpleNamespace(clip_l=types.SimpleNamespace(tokenizer=None, start_token=49406, end_token=49407,
                                                                   pad_token=49407))

    def __init__(self, width: int = 48, pooled: int = 32):
        self.width, self.pooled = width, pooled

    def tokenize(self, text: str) -> dict:
        words = [zlib.crc32(w.encode()) % 40000 + 2 for w in text.split()][:6]
        ids = [49406] + words + [49407] * (7 - len(words))
        return {"l": [[(i, 1.0) for i in ids]]}

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False) -> dict:
        ids = [t for t, _ in tokens["l"][0]]
        gen = torch.Generator().manual_seed(sum(i * (n + 1) for n, i in enumerate(ids)) % 2**31)
        table = torch.randn(len(ids), self.width, generator=gen)
        return {"cond": table[None], "pooled_output": torch.randn(1, self.pooled, generator=gen)}


def _entry(patcher, seed: int, name: str) -> StackEntry:
    adapters = {}
    for key, value in patcher.model.state_dict().items():
        module = key.removeprefix("diffusion_model.").removesuffix(".weight")
        if not key.endswith(".weight") or value.ndim != 2 or not module.startswith(("double_blocks", "single_blocks")):
            continue
        gen = torch.Generator().manual_seed(seed + zlib.crc32(module.encode()))
        out, inp = value.shape
        adapters[module] = (LoRA(up=torch.randn(out, 4, generator=gen) * 0.3, down=torch.randn(4, inp, generator=gen)
                                 / inp ** 0.5, target_shape=(out, inp), alpha=4.0),)
    return StackEntry(StackRow(lora=name), AdapterSet(source=name, format="test", adapters=adapters), name)


@pytest.fixture(scope="module")
def regions(flux):
    (left,) = LoomRegion.execute("a red fox", 0.0, 0.0, 0.5, 1.0, adapters=(_entry(flux, 1, "fox.safetensors"),)).args
    (chained,) = LoomRegion.execute("a blue bird", 0.5, 0.0, 1.0, 1.0, adapters=(_entry(flux, 2, "bird.safetensors"),),
                                    regions=left).args
    return chained


def test_compose_node_defaults_are_the_options_defaults():
    """The schema's defaults, ``execute``'s keyword defaults and :class:`ComposeOptions` agree (a default changed in
    one place only would make a workflow built in the UI and one run from Python compose differently)."""
    options = ComposeOptions()
    schema = {spec.id: spec.default for spec in LoomCompose.define_schema().inputs
              if getattr(spec, "default", None) is not None and spec.id != "global_prompt"}
    signature = {name: p.default for name, p in inspect.signature(LoomCompose.execute).parameters.items()
                 if p.default is not inspect.Parameter.empty}
    assert schema == signature
    field_of = {"rules_end_percent": "end_percent", "regions_see_global_prompt": "regions_see_global"}
    for name, default in schema.items():
        if name != "rule_blocks":
            assert getattr(options, field_of.get(name, name)) == default, name
    assert parse_rule_blocks(schema["rule_blocks"]) == (options.double_blocks, options.single_blocks)
    assert not options.isolation and not options.global_text_adapters  # chosen on the tune split (BENCHMARKS.md)


def test_regions_chain_combine_and_mask_overrides_box(regions):
    assert [r.region.prompt for r in regions] == ["a red fox", "a blue bird"]
    assert regions[1].entries[0].name == "bird.safetensors"
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:8, 4:12] = 1.0
    (masked,) = LoomRegion.execute("sky", 0.1, 0.1, 0.2, 0.2, mask=mask).args
    assert masked[0].region.box is None and masked[0].region.mask.shape == (1, 16, 16)
    (combined,) = LoomRegionsCombine.execute(regions_1=regions, regions_3=masked).args
    assert [r.region.prompt for r in combined] == ["a red fox", "a blue bird", "sky"]
    with pytest.raises(PlanError, match="at least one"):
        LoomRegionsCombine.execute()
    with pytest.raises(PlanError, match="zero or negative area"):
        LoomRegion.execute("bad", 0.6, 0.0, 0.4, 1.0)


def test_preview_draws_each_region_in_its_colour(regions):
    (image,) = LoomRegionPreview.execute(regions, 128, 64).args
    assert image.shape == (1, 64, 128, 3) and image.dtype == torch.float32
    left, right = image[0, 40, 20], image[0, 40, 100]  # inside each box, below the labels
    assert not torch.allclose(left, right)
    assert left[0] > left[2] and right[1] > right[0]  # red-ish vs green-ish tints


@pytest.mark.parametrize("text,expected", [("all", (None, None)), ("", (None, None)),
                                           ("d0-2 s1", (frozenset({0, 1, 2}), frozenset({1}))),
                                           ("double1, single0-1", (frozenset({1}), frozenset({0, 1})))])
def test_rule_blocks(text, expected):
    assert parse_rule_blocks(text) == expected


def test_region_prompt_padding_is_trimmed_only_when_asked(flux, regions):
    trimmed = LoomCompose.execute(flux, StubClip(), "a meadow", regions, latent_reinit=False).args[1]
    full = compose(flux, StubClip(), "a meadow", list(regions),
                   ComposeOptions(latent_reinit=False, trim_region_padding=False)).conditioning
    assert full[0][0].shape == (1, 24, 48)
    kept = torch.cat([full[0][0][:, :8], full[0][0][:, 8:13], full[0][0][:, 16:21]], dim=1)
    assert torch.equal(trimmed[0][0], kept)


def test_rule_blocks_errors_name_the_item():
    with pytest.raises(PlanError, match="'x3'"):
        parse_rule_blocks("d0 x3")


def _sample(model, positive, negative, cfg: float, seed: int = 0) -> torch.Tensor:
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, 3, cfg, "euler", "simple", positive, negative, latent,
                                   disable_pbar=True, seed=seed)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_compose_samples_with_ksampler_and_leaves_the_model_untouched(flux, regions, cfg):
    model, conditioning = LoomCompose.execute(flux, StubClip(), "a meadow", regions, latent_reinit=False).args
    # the global prompt keeps its 8 tokens; each 3-word region prompt keeps start + words + end (padding trimmed)
    assert conditioning[0][0].shape == (1, 8 + 5 + 5, 48) and "pooled_output" in conditioning[0][1]
    negative = [[torch.zeros_like(conditioning[0][0]), dict(conditioning[0][1])]]
    composed = _sample(model, conditioning, negative, cfg)
    plain = _sample(flux, conditioning, negative, cfg)
    assert torch.isfinite(composed).all()
    assert (composed - plain).abs().max() > 1e-3
    assert flux.object_patches == {} and "optimized_attention_override" not in flux.model_options["transformer_options"]
    assert torch.equal(plain, _sample(flux, conditioning, negative, cfg))


def test_best_window_and_reinitialised_noise_keep_statistics():
    attention = torch.zeros(4, 6)
    attention[2:4, 4:6] = 1.0
    assert best_window(attention, 2, 2) == (2, 4)
    noise = torch.randn(1, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    maps = attention[None, None]  # one region
    out = reinitialise_noise(noise, maps, [TokenBox(0, 0, 0, 2, 2)], patch=2)
    copied = noise.clone()
    copied[:, :, 0:4, 0:4] = noise[:, :, 4:8, 8:12]  # the best window now sits in the box
    expected = (copied - copied.mean()) / copied.std() * noise.std() + noise.mean()
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(out.mean(), noise.mean(), atol=1e-6) and torch.allclose(out.std(), noise.std(), atol=1e-5)
    untouched = reinitialise_noise(noise, maps, [TokenBox(0, 2, 4, 4, 6)], patch=2)
    assert torch.allclose(untouched, noise, atol=1e-6)  # the box already holds the best window


def test_latent_reinit_probes_once_and_changes_the_sample(flux, regions):
    model, conditioning = LoomCompose.execute(flux, StubClip(), "a meadow", regions, latent_reinit=True).args
    wrappers = model.wrappers["sampler_sample"]
    (reinit,) = [w for group in wrappers.values() for w in group if isinstance(w, ReinitWrapper)]
    seen = []
    original = ConceptMaps.observe

    def counting(self, q, k, layout, block_type, block_index):
        seen.append((block_type, block_index))
        return original(self, q, k, layout, block_type, block_index)

    ConceptMaps.observe = counting
    try:
        with_reinit = _sample(model, conditioning, conditioning, 1.0)
    finally:
        ConceptMaps.observe = original
    assert reinit.controller.probe is None
    assert [s for s in seen if s[0] == "double"] == [("double", 0), ("double", 1)]  # one probing pass
    without, _ = LoomCompose.execute(flux, StubClip(), "a meadow", regions, latent_reinit=False).args
    assert torch.isfinite(with_reinit).all()
    assert not torch.allclose(with_reinit, _sample(without, conditioning, conditioning, 1.0))


def test_bench_compose_gives_one_row_per_combination():
    from lora_loom.bench.compose import bench_model, run_compose_bench

    rows = run_compose_bench(bench_model(depth=1, depth_single_blocks=1), adapter_counts=(1, 2),
                             region_counts=(1, 2), latent_hw=(8, 8), prompt_tokens=4, rank=2, repeats=1)
    assert [(r.adapters, r.regions) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r.merged_ms > 0 and r.composed_ms > 0 and r.ratio > 0 for r in rows)


def test_refinement_switch_installs_the_refine_wrapper_on_the_clone_only(flux, regions):
    import comfy.patcher_extension
    from lora_loom.composition.comfy_bridge.refine import RefineWrapper

    def refiners(model):
        kind = comfy.patcher_extension.WrappersMP.PREDICT_NOISE
        return [w for group in model.wrappers.get(kind, {}).values() for w in group if isinstance(w, RefineWrapper)]

    refined, _ = LoomCompose.execute(flux, StubClip(), "a meadow", regions, refinement=True).args
    plain, _ = LoomCompose.execute(flux, StubClip(), "a meadow", regions, refinement=False).args
    (wrapper,) = refiners(refined)
    assert wrapper.runtime is runtime_of(refined) and wrapper.options == ComposeOptions().refine
    assert refiners(plain) == [] and refiners(flux) == []


def test_composing_an_already_composed_model_chains_on_one_runtime(flux, regions):
    """Loom Compose on a composed MODEL: one runtime with both compositions, every layer wrapped once (re-viewed),
    the upstream MODEL unchanged; its attention override is replaced, not stacked."""
    once, conditioning = LoomCompose.execute(flux, StubClip(), "a meadow", regions, latent_reinit=False).args
    twice, _ = LoomCompose.execute(once, StubClip(), "a meadow", regions, latent_reinit=False).args
    upstream, chained = runtime_of(once), runtime_of(twice)
    assert len(upstream.controllers) == 1 and chained.controllers[0] is upstream.controllers[0]
    assert len(chained.controllers) == 2 and chained.group_offsets == [0, 2]
    key = "diffusion_model.double_blocks.0.img_attn.qkv"
    layer = twice.object_patches[key]
    assert layer.loom_source is chained and {s.group for s in layer.loom_cache["slots"]} == {0, 1, 2, 3}
    assert layer.__dict__ is flux.get_model_object(key).__dict__
    override = twice.model_options["transformer_options"]["optimized_attention_override"]
    assert override.runtime is chained and override.previous is None
    negative = [[torch.zeros_like(conditioning[0][0]), dict(conditioning[0][1])]]
    single, double = _sample(once, conditioning, negative, 1.0), _sample(twice, conditioning, negative, 1.0)
    assert torch.isfinite(double).all() and (double - single).abs().max() > 1e-4  # the second composition acts
    assert torch.equal(_sample(once, conditioning, negative, 1.0), single)
