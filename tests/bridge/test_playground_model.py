"""The committed playground model in real ComfyUI objects: it loads as MODEL + CLIP, ComfyUI's sampler draws what
the prompt asks (scored by the exact detector), the trainer's sampler agrees with ComfyUI's, and the concept
LoRAs load through ComfyUI's own LoRA loader with every key used."""
import json

import comfy.lora
import comfy.model_patcher
import comfy.sample
import comfy.sd
import numpy as np
import pytest
import torch
from lora_loom.nodes import playground as playground_nodes
from lora_loom.playground import detector, latent, scoring, text, train, world
from lora_loom.playground.model import (
    LORA_DIR,
    META_VOCABULARY,
    MODEL_FILE,
    PlaygroundLatentFormat,
    load_playground,
    lora_path,
    read_base_for_new_vocabulary,
    read_playground,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HALF = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0)}
PROMPTS = [("red", "circle", "left"), ("blue", "square", "right"), ("green", "triangle", "left"),
           ("yellow", "circle", "right"), ("blue", "triangle", "right"), ("red", "square", "left")]


@pytest.fixture(scope="module")
def playground():
    return load_playground()


def comfy_images(patcher, clip, prompts: list[str], seed: int, steps: int = 12, cfg: float = 1.0) -> np.ndarray:
    """KSampler (euler / simple, empty negative) for each prompt, decoded: ``[N, 64, 64, 3]``."""
    images = []
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    for prompt in prompts:
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        empty = latent.empty(1, 64, 64)
        noise = comfy.sample.prepare_noise(empty, seed)
        samples = comfy.sample.sample(patcher, noise, steps, cfg, "euler", "simple", positive, negative, empty,
                                      seed=seed, disable_pbar=True)
        images.append(latent.decode(samples)[0].numpy())
    return np.stack(images)


def test_loads_as_real_comfy_model_and_clip(playground):
    assert MODEL_FILE.stat().st_size < 12_000_000
    assert isinstance(playground.patcher, comfy.model_patcher.ModelPatcher)
    assert isinstance(playground.clip, comfy.sd.CLIP)
    latent_format = playground.patcher.get_model_object("latent_format")
    assert isinstance(latent_format, PlaygroundLatentFormat) and latent_format.latent_channels == 48
    conditioning = playground.clip.encode_from_tokens_scheduled(playground.clip.tokenize("a red circle"))
    cond, extras = conditioning[0]
    assert cond.shape == (1, text.TEXT_LENGTH, text.TEXT_WIDTH)
    assert extras["pooled_output"].shape == (1, text.TEXT_WIDTH)


def test_comfy_sampler_draws_the_prompted_object_in_the_prompted_half(playground):
    prompts = [f"a {colour} {shape} on the {side}" for colour, shape, side in PROMPTS]
    images = comfy_images(playground.patcher, playground.clip, prompts, seed=5, steps=20, cfg=3.0)
    hits = [detector.detect(image, HALF[side]).matches(shape=shape, colour=colour, texture="solid")
            for image, (colour, shape, side) in zip(images, PROMPTS)]
    # chance: 1/4 colours x 1/3 shapes per prompt, and only when an object lands in the prompted half at all
    assert sum(hits) >= 5, hits


@pytest.mark.parametrize("concept", world.CONCEPTS, ids=lambda c: c.name)
def test_concept_lora_teaches_what_the_base_cannot_draw(playground, concept):
    """Through ComfyUI's own LoRA loader: without the LoRA the base never draws the concept; with it, it does."""
    shape = concept.value if concept.kind == "shape" else "square"
    wanted = {"shape": shape, "texture": concept.value if concept.kind == "texture" else "solid"}
    cases = [(colour, side) for colour, side in (("red", "left"), ("blue", "right"), ("green", "left"),
                                                 ("yellow", "right"))]
    prompts = [scoring.region(HALF[side], side, colour, wanted["texture"], shape, (concept.name,)).prompt
               for colour, side in cases]
    patched, _ = comfy.sd.load_lora_for_models(playground.patcher, None, load_file(str(lora_path(concept.name))),
                                               1.0, 0.0)

    def hits(model) -> list[bool]:
        images = comfy_images(model, playground.clip, prompts, seed=9, steps=20, cfg=3.0)
        return [detector.detect(image, HALF[side]).matches(colour=colour, **wanted)
                for image, (colour, side) in zip(images, cases)]

    assert sum(hits(playground.patcher)) == 0
    # star_toy is the weakest LoRA (0.75 on its 16 training-log prompts; 2 of these 4 at seed 9): it still draws
    # what the base never does; the others draw it 3 times or more
    assert sum(hits(patched)) >= (2 if concept.name == "star_toy" else 3)


def test_trainer_sampler_matches_comfy_ksampler():
    # a model of its own: the trainer calls the module directly, and ComfyUI may have left a LoRA clone's
    # patches on the shared fixture's weights
    playground = load_playground()
    prompt = "a green square on the right"
    ours = train.sample(playground.patcher.model.diffusion_model, playground.clip.cond_stage_model.encoder,
                        [prompt], steps=6, seed=11)
    theirs = comfy_images(playground.patcher, playground.clip, [prompt], seed=11, steps=6)
    difference = np.abs(ours.numpy() - theirs)  # float noise only: a wrong time/velocity convention gives O(1)
    assert difference.max() < 1e-2 and difference.mean() < 1e-3, (difference.max(), difference.mean())


@pytest.mark.parametrize("concept", world.CONCEPTS, ids=lambda c: c.name)
def test_concept_lora_is_kohya_and_loads_every_key_through_comfy(playground, concept):
    path = lora_path(concept.name)
    assert path.parent == LORA_DIR and path.stat().st_size < 1_000_000
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert header.get("modelspec.trigger_phrase") == (concept.trigger or None)  # a style has none
    assert header["modelspec.architecture"] == "flux-1-dev/lora"
    assert header["ss_output_name"] == f"playground_{concept.name}"
    tags = json.loads(header["ss_tag_frequency"])[f"1_{concept.name}"]
    assert list(tags) == ([concept.trigger] if concept.trigger else [])
    state = load_file(str(path))
    assert all(k.startswith("lora_unet_") for k in state)
    key_map = comfy.lora.model_lora_keys_unet(playground.patcher.model, {})
    loaded = comfy.lora.load_lora(state, key_map)
    modules = {k.rsplit(".", 2)[0] for k in state}
    assert len(loaded) == len(modules) > 0
    patched, _ = comfy.sd.load_lora_for_models(playground.patcher, None, state, 1.0, 0.0)
    assert len(patched.patches) == len(modules)


def test_a_base_saved_before_words_were_appended_trains_on(tmp_path):
    """``--reuse-base``: a model file whose vocabulary and table are a prefix of today's gives the same weights;
    one whose table differs is refused, naming the file."""
    diffusion, tables, config = read_playground()
    old_words = list(text.VOCABULARY[:-len(world.CLASS_WORDS)])
    with safe_open(str(MODEL_FILE), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = dict(handle.metadata())
    state["text_encoder.embedding"] = state["text_encoder.embedding"][: len(old_words)].contiguous()
    old = tmp_path / "old.safetensors"
    save_file(state, str(old), metadata={**metadata, META_VOCABULARY: json.dumps(old_words)})
    with pytest.raises(ValueError, match="differs from playground/text.py"):
        read_playground(old)
    reused, reused_config = read_base_for_new_vocabulary(old, text.text_tables())
    assert reused_config == config and reused.keys() == diffusion.keys()
    assert all(torch.equal(reused[k], diffusion[k]) for k in diffusion)
    state["text_encoder.embedding"] = state["text_encoder.embedding"] + 1.0
    save_file(state, str(old), metadata={**metadata, META_VOCABULARY: json.dumps(old_words)})
    with pytest.raises(ValueError, match="old.safetensors: text table 'embedding' differs"):
        read_base_for_new_vocabulary(old, text.text_tables())


def test_model_node_returns_model_and_clip_and_every_schema_builds():
    assert [node.define_schema().node_id for node in playground_nodes.NODES] == [
        "LoomPlaygroundModel", "LoomPlaygroundLatent", "LoomPlaygroundDecode", "LoomPlaygroundEncode"]
    patcher, clip = playground_nodes.LoomPlaygroundModel.execute().result
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher) and isinstance(clip, comfy.sd.CLIP)


def test_latent_and_decode_nodes_round_trip():
    empty = playground_nodes.LoomPlaygroundLatent.execute(64, 32, 2).result[0]["samples"]
    assert empty.shape == (2, 48, 8, 16) and not empty.any()
    image = torch.from_numpy(world.scene_batch(seed=4, count=1)[0])
    encoded = playground_nodes.LoomPlaygroundEncode.execute(image).result[0]
    decoded = playground_nodes.LoomPlaygroundDecode.execute(encoded).result[0]
    assert decoded.shape == (1, 64, 64, 3)
    assert torch.allclose(decoded, image, atol=1e-6)
