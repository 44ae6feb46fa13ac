"""CLoRA on tiny ComfyUI Flux models: N+1 passes == plain LoRA sampling, CFG > 1, latent updates lower the loss and
separate the maps, inference tensors, no leaks; concept tokens with ComfyUI's real CLIP-L and T5 tokenizers."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.sd1_clip
import comfy.text_encoders.flux
import pytest
import torch
from comfy_models import tiny_flux

sys.path.insert(0, str(Path(__file__).parent))  # the regional mechanism tests' helpers
from lora_loom.composition.clora import CLoraError, CLoraOptions, map_overlap
from lora_loom.composition.comfy_bridge.clora import clora_controller, latent_updates
from lora_loom.composition.comfy_bridge.clora_masks import clora_masks
from lora_loom.composition.comfy_bridge.merged import apply_merged
from lora_loom.composition.comfy_bridge.runtime import install
from lora_loom.composition.comfy_bridge.tokens import find_concept, sd_tokenizer
from lora_loom.composition.concept_tokens import ConceptTokenError
from lora_loom.composition.prompts import EncodedPrompt
from lora_loom.composition.runtime.clora import CLoraConcept
from lora_loom.composition.runtime.probes import gradient_scope
from test_regional_mechanism import apply_model, entry, flux_modules, lora_set

T, CONTEXT, POOLED = 8, 48, 32
NO_UPDATES = dict(iterations=0)


def encoded(seed: int, positions: dict) -> EncodedPrompt:
    g = torch.Generator().manual_seed(seed)
    return EncodedPrompt(f"prompt {seed}", torch.randn(1, T, CONTEXT, generator=g),
                         {"pooled_output": torch.randn(1, POOLED, generator=g)}, None, positions)


def composed(flux, n: int, **options):
    """n LoRAs; the base prompt holds concept i at text position 1 + 2i, LoRA i's prompt at 2 + i."""
    sets = [lora_set(flux, flux_modules(flux), seed=i + 1, name=f"l{i}") for i in range(n)]
    base = encoded(100, {i: (1 + 2 * i,) for i in range(n)})
    prompts = (base,) + tuple(encoded(200 + i, {i: (2 + i,)}) for i in range(n))
    concepts = [CLoraConcept(p.text, f"c{i}", (entry(s),)) for i, (p, s) in enumerate(zip(prompts[1:], sets))]
    composition = clora_controller(concepts, prompts, CLoraOptions(**options), 2)
    clone = install(flux, composition).model
    return clone, composition, sets


def sample(patcher, positive, negative=None, cfg: float = 1.0, steps: int = 3, hw: int = 16) -> torch.Tensor:
    latent = torch.zeros(1, 16, hw, hw)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    negative = negative or [[torch.zeros(1, T, CONTEXT), {"pooled_output": torch.zeros(1, POOLED)}]]
    try:
        with torch.inference_mode():
            return comfy.sample.sample(patcher, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                                       seed=0, disable_pbar=True)
    finally:
        comfy.model_management.unload_all_models()  # leave no patched weights behind for the direct calls


def cond(prompt: EncodedPrompt) -> list:
    return [[prompt.context, {"pooled_output": prompt.pooled}]]


def test_one_lora_without_updates_equals_plain_lora_sampling(flux):
    """alpha 0 (the mask covers every pixel), no latent updates: the LoRA pass alone == the merged LoRA sampled
    with the LoRA's prompt; the base pass is computed but weighs nothing."""
    clone, composition, sets = composed(flux, 1, alpha=0.0, **NO_UPDATES)
    merged = apply_merged(flux, None, [entry(sets[0])]).model
    got = sample(clone, cond(composition.prompts[0]))
    want = sample(merged, cond(composition.prompts[1]))
    plain = sample(flux, cond(composition.prompts[1]))
    assert (want - plain).abs().max() > 1e-2  # the LoRA matters
    assert torch.allclose(got, want, atol=2e-4), float((got - want).abs().max())


def test_cfg_above_one_fuses_each_pass_with_its_own_negative(flux):
    """cond and uncond batched (cfg > 1): with full masks the cond chunk is LoRA i on its prompt, the uncond chunk
    LoRA i on the negative — CLoRA's per-pass CFG."""
    clone, composition, sets = composed(flux, 1, alpha=0.0, **NO_UPDATES)
    merged = apply_merged(flux, None, [entry(sets[0])]).model
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    negative = torch.randn(1, T, CONTEXT, generator=torch.Generator().manual_seed(5))
    base, lora = composition.prompts
    y = torch.cat([base.pooled, torch.zeros(1, POOLED)])
    both = apply_model(clone, torch.cat([x, x]), 0.9, torch.cat([base.context, negative]), y, cond_or_uncond=[0, 1])
    assert torch.allclose(both[:1], apply_model(merged, x, 0.9, lora.context, lora.pooled), atol=2e-5)
    assert torch.allclose(both[1:], apply_model(merged, x, 0.9, negative, torch.zeros(1, POOLED)), atol=2e-5)


def test_masks_split_the_canvas_and_uncovered_pixels_keep_the_base(flux):
    clone, composition, _ = composed(flux, 2, alpha=0.9, **NO_UPDATES)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    base = composition.prompts[0]
    fused = apply_model(clone, x, 0.9, base.context, base.pooled)
    masks = composition.record.masks  # [1, 2, 4, 4]
    assert masks.shape == (1, 2, 4, 4) and 0 < float(masks.sum()) < masks.numel()
    uncovered = masks.sum(dim=1)[0] == 0
    no_lora = apply_model(flux, x, 0.9, base.context, base.pooled)
    pixels = uncovered.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.allclose(fused[0][:, pixels], no_lora[0][:, pixels], atol=1e-5)
    result = clora_masks(composition, {"samples": x})
    assert result.masks.shape == (2, 64, 64) and result.preview.shape == (1, 64, 64, 3)
    assert [r.region.prompt for r in result.regions] == [c.prompt for c in composition.concepts]
    assert result.regions[1].entries == composition.concepts[1].entries


def test_latent_updates_lower_the_loss_and_separate_the_maps(flux):
    clone, composition, _ = composed(flux, 2, step_size=5.0, iterations=1)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(7))
    t = torch.full((1,), 0.9)
    updates = latent_updates(clone)
    clone.patch_model()
    try:
        options = copy.copy(clone.model_options)

        def measure(z):
            loss = updates.loss_at(clone.model, z, t, options).detach()
            maps = updates.probe.maps()
            overlap = map_overlap(torch.stack([maps[(0, 0)], maps[(0, 1)]]))  # base prompt's two concepts
            return float(loss), overlap
        with gradient_scope():
            before = measure(x.clone())
        z = x
        with torch.inference_mode():
            for _ in range(6):
                z = updates.update_latent(clone.model, z, t, options, 5.0)
        with gradient_scope():
            after = measure(z.clone())
    finally:
        clone.unpatch_model()
    losses = [loss for _, _, loss in composition.losses]
    assert losses[-1] < losses[0] and after[0] < before[0]
    assert after[1] < before[1], (before, after)


def test_sampling_in_inference_mode_leaves_no_gradients_and_the_input_untouched():
    with torch.inference_mode():
        flux = tiny_flux(seed=0)  # weights are inference tensors, as when ComfyUI loads a model in a node
    before = (copy.deepcopy(flux.model_options), dict(flux.object_patches), dict(flux.wrappers))
    clone, composition, _ = composed(flux, 2, update_end_percent=0.7, iterations=1)
    out = sample(clone, cond(composition.prompts[0]), steps=3, cfg=2.0)
    assert torch.isfinite(out).all() and len(composition.losses) >= 1
    assert all(p.grad is None for p in flux.model.parameters())
    assert flux.model_options.keys() == before[0].keys() and flux.object_patches == before[1]
    assert flux.wrappers == before[2]
    assert "optimized_attention_override" not in flux.model_options.get("transformer_options", {})


# --- concept tokens with ComfyUI's own tokenizers ---------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return comfy.text_encoders.flux.FluxTokenizer()


@pytest.mark.parametrize("key", ["l", "t5xxl"])
@pytest.mark.parametrize("text, concept, occurrences", [
    ("a photo of a tiramisu cake", "tiramisu", 1),                # several tokens for one word
    ("a cat next to a cat, and a dog", "cat", 2),                 # repeated word (one with a comma)
    ("a (red fox:1.3) in snow", "red fox", 1),                    # weight syntax, two words
    ("Schrödinger's CAT sleeps", "cat", 1),                       # case, accents before it
])
def test_concept_tokens_decode_to_the_concept(tokenizer, key, text, concept, occurrences):
    positions = find_concept(tokenizer, key, text, concept)
    sd_tok = sd_tokenizer(tokenizer, key)
    ids = [item[0] for chunk in tokenizer.tokenize_with_weights(text)[key] for item in chunk]
    decoded = sd_tok.tokenizer.decode([ids[p] for p in positions]).lower()
    assert decoded.count(concept.split()[-1].lower()) == occurrences, decoded
    end = 1 if sd_tok.tokenizer_adds_end_token else 0
    alone = len(sd_tok.tokenizer(concept)["input_ids"]) - sd_tok.tokens_start - end
    assert len(positions) >= alone * occurrences


@pytest.mark.parametrize("key", ["l", "t5xxl"])
def test_missing_concept_word_is_a_clear_error(tokenizer, key):
    with pytest.raises(ConceptTokenError, match="'dog' is not in the prompt 'a cat on a mat'"):
        find_concept(tokenizer, key, "a cat on a mat", "dog")


def test_clip_only_tokenizer_and_override(tokenizer):
    sd1 = comfy.sd1_clip.SD1Tokenizer()
    assert find_concept(sd1, "l", "a red fox", "fox") == find_concept(tokenizer, "l", "a red fox", "fox") == (3,)
    assert find_concept(sd1, "l", "a red fox", "", override="1") == (2,)


def test_bad_options_fail_before_installing(flux):
    with pytest.raises(CLoraError, match="alpha"):
        composed(flux, 1, alpha=2.0)


def test_clora_downstream_of_loom_compose_is_refused_with_a_clear_message(flux):
    from lora_loom.composition.plan import ComposeOptions
    from lora_loom.composition.runtime.layers import LayerError
    from test_regional_mechanism import box_region, compose_clone, prompts

    sets = [lora_set(flux, flux_modules(flux), seed=1, name="l0")]
    composed_model, _ = compose_clone(flux, [box_region((0, 0, 1, 1), [entry(sets[0])])],
                                      ComposeOptions(latent_reinit=False), prompts(flux, 4, [3]))
    with pytest.raises(LayerError, match="carries Loom Compose upstream.*connect Loom CLoRA first"):
        composed(composed_model, 1, **NO_UPDATES)
