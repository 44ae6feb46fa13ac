"""The playground world: deterministic rendering, an exact detector on rendered images, the exact latent, the
tokenizer, and pure modules that never import ComfyUI."""
import ast
import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_loom.playground import detector, latent, text, world

REPO = Path(__file__).resolve().parents[2]
HALF = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0), "center": (0.0, 0.0, 1.0, 1.0)}


def test_rendering_is_deterministic_per_seed():
    images_a, captions_a, _ = world.scene_batch(seed=7, count=12)
    images_b, captions_b, _ = world.scene_batch(seed=7, count=12)
    images_c, captions_c, _ = world.scene_batch(seed=8, count=12)
    assert images_a.shape == (12, 64, 64, 3) and images_a.dtype == np.float32
    assert np.array_equal(images_a, images_b) and captions_a == captions_b
    assert not np.array_equal(images_a, images_c)
    assert 0.0 <= images_a.min() and images_a.max() <= 1.0


@pytest.mark.parametrize("shape,texture", list(itertools.product(world.ALL_SHAPES, world.ALL_TEXTURES)))
@pytest.mark.parametrize("colour,position", [("red", "left"), ("blue", "right"), ("yellow", "center"),
                                             ("green", "left")])
def test_detector_recovers_every_attribute_of_a_rendered_object(shape, texture, colour, position):
    rng = np.random.default_rng(hash((shape, texture, colour)) % 1000)
    item = world.place(position, rng, shape, colour, texture)
    image = world.render(world.Scene(objects=(item,), caption=""))
    found = detector.detect(image, HALF[position])
    assert found.present
    assert (found.shape, found.colour, found.texture) == (shape, colour, texture)
    assert found.shape_fit > 0.7


def test_detector_is_exact_on_random_two_object_scenes():
    rng = np.random.default_rng(2024)
    checked = 0
    for _ in range(60):
        scene = world.sample_scene(rng, shapes=world.ALL_SHAPES, textures=world.ALL_TEXTURES)
        image = world.render(scene)
        for item in scene.objects:
            found = detector.detect(image, HALF[item.position])
            assert found.matches(item.shape, item.colour, item.texture), (item, found)
            checked += 1
    assert checked >= 75


def test_detector_finds_nothing_in_an_empty_region_and_nothing_leaks():
    rng = np.random.default_rng(3)
    item = world.place("left", rng, "circle", "red", "solid")
    image = world.render(world.Scene(objects=(item,), caption="a red circle on the left"))
    assert not detector.detect(image, HALF["right"]).present
    assert not detector.detect(image, HALF["right"]).matches()
    assert detector.background_leakage(image, [HALF["left"]]) == 0.0
    stray = image.copy()
    stray[10:20, 40:50] = world.COLOURS["blue"]
    assert detector.background_leakage(stray, [HALF["left"]]) == pytest.approx(100 / (32 * 64))
    assert detector.detect(stray, HALF["right"]).matches(colour="blue", shape="square")


@pytest.mark.parametrize("box", [(0.0, 0.0, 0.0, 1.0), (0.5, 0.0, 0.4, 1.0), (-0.1, 0.0, 1.0, 1.0), (0, 0, 1, 1.5)])
def test_detector_rejects_malformed_boxes(box):
    with pytest.raises(ValueError, match="detector.py"):
        detector.detect(np.zeros((64, 64, 3), dtype=np.float32), box)


def test_latent_round_trip_is_exact_and_shaped():
    images = torch.from_numpy(world.scene_batch(seed=1, count=3)[0])
    encoded = latent.encode(images)
    assert encoded.shape == (3, latent.LATENT_CHANNELS, 16, 16)
    assert torch.allclose(latent.decode(encoded), images, atol=1e-6, rtol=0)
    assert latent.empty(2, 64, 32).shape == (2, 48, 8, 16)
    factors = torch.tensor(latent.preview_factors())
    preview = torch.einsum("bchw,cr->bhwr", encoded, factors)
    cell_mean = torch.nn.functional.avg_pool2d(images.movedim(-1, 1) * 2 - 1, 4).movedim(1, -1)
    assert torch.allclose(preview, cell_mean, atol=1e-5)


@pytest.mark.parametrize("bad", [torch.zeros(1, 64, 64), torch.zeros(1, 62, 64, 3)])
def test_latent_rejects_wrong_shapes(bad):
    with pytest.raises(ValueError, match="latent.py"):
        latent.encode(bad)


@pytest.mark.parametrize("prompt,words", [
    ("a red circle on the left", ("a", "red", "circle", "on", "the", "left")),
    ("A Blue, STRIPED star!", ("a", "blue", "striped", "star")),
    ("", ()),
])
def test_tokenizer_pads_to_fixed_length(prompt, words):
    tokens = text.tokenize(prompt)
    assert tokens.words == words
    assert len(tokens.ids) == text.TEXT_LENGTH
    assert tokens.ids[0] == text.VOCABULARY.index(text.START)


@pytest.mark.parametrize("prompt,match", [("a purple circle", "unknown word"), ("a " * 20, "at most")])
def test_tokenizer_refuses_what_the_world_cannot_say(prompt, match):
    with pytest.raises(ValueError, match=match):
        text.tokenize(prompt)


def test_every_caption_tokenizes_and_every_trigger_is_a_word():
    rng = np.random.default_rng(0)
    for concept in world.CONCEPTS:
        if concept.is_style:
            continue
        assert concept.trigger in text.VOCABULARY
        scene = world.sample_scene(rng, featured=concept)
        assert concept.trigger in text.tokenize(scene.caption).words
    encoder = text.PlaygroundTextEncoder()
    cond, pooled = encoder.encode_prompts(["a red circle", "a red circle on the left", ""])
    assert cond.shape == (3, text.TEXT_LENGTH, text.TEXT_WIDTH) and pooled.shape == (3, text.TEXT_WIDTH)
    assert not torch.allclose(cond[0], cond[1]) and torch.isfinite(pooled).all()


def test_object_loras_share_a_class_word_that_names_their_shape_in_captions():
    toys = [c for c in world.CONCEPTS if c.trigger == "toy"]
    assert {c.value for c in toys} == {"star", "ring"} and all(c.kind == "shape" for c in toys)
    rng = np.random.default_rng(5)
    for concept in toys:
        for _ in range(30):
            scene = world.sample_scene(rng, featured=concept)
            words = text.tokenize(scene.caption).words
            assert scene.objects[0].shape == concept.value
            assert "toy" in words and concept.value not in words
            assert all(item.shape in world.BASE_SHAPES for item in scene.objects[1:])


def test_a_style_has_no_word_and_paints_every_object_of_its_scenes():
    (style,) = [c for c in world.CONCEPTS if c.is_style]
    assert style.kind == "texture" and style.value in world.STYLE_TEXTURES
    assert style.value not in text.VOCABULARY and not style.trigger
    rng = np.random.default_rng(6)
    counts = set()
    for _ in range(40):
        scene = world.sample_scene(rng, featured=style)
        counts.add(len(scene.objects))
        assert all(item.texture == style.value for item in scene.objects)
        assert not set(text.tokenize(scene.caption).words) & {"solid", "checkered", "striped"}
    assert counts == {1, 2}
    plain = world.sample_scene(np.random.default_rng(6))
    assert all(item.texture in world.BASE_TEXTURES for item in plain.objects)


def test_new_words_are_appended_so_earlier_words_keep_their_rows():
    tables = text.text_tables()
    earlier = torch.randn(text.VOCABULARY.index("toy"), text.TEXT_WIDTH, generator=torch.Generator().manual_seed(0))
    assert text.VOCABULARY[-len(world.CLASS_WORDS):] == world.CLASS_WORDS
    assert torch.equal(tables["embedding"][: len(earlier)], earlier)


def test_clean_share_separates_a_rendered_object_from_a_noisy_or_half_formed_one():
    rng = np.random.default_rng(11)
    item = world.place("left", rng, "star", "green", "barred")
    image = world.render(world.Scene(objects=(item,), caption=""))
    found = detector.detect(image, HALF["left"])
    assert found.clean_share(image, "green", "barred") == 1.0
    assert found.is_clean(image, "star", "green", "barred")
    assert found.clean_share(image, "green", "solid") < 0.8  # the bars are not the wanted solid
    noisy = image + np.random.default_rng(0).normal(0.0, 0.12, image.shape).astype(np.float32)
    noisy_found = detector.detect(np.clip(noisy, 0, 1), HALF["left"])
    assert noisy_found.matches("star", "green", "barred")
    assert not noisy_found.is_clean(np.clip(noisy, 0, 1), "star", "green", "barred")
    misformed = dataclasses.replace(found, shape_fit=detector.CLEAN_FIT - 0.01)  # read as a star, poorly formed
    assert misformed.matches("star", "green", "barred") and misformed.clean_share(image, "green", "barred") == 1.0
    assert not misformed.is_clean(image, "star", "green", "barred")
    assert not detector.detect(image, HALF["right"]).is_clean(image, "star", "green", "barred")


@pytest.mark.parametrize("module", ["world.py", "detector.py", "text.py", "latent.py"])
def test_pure_playground_modules_do_not_import_comfy(module):
    tree = ast.parse((REPO / "playground" / module).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
    assert imported and not [name for name in imported if name.split(".")[0] in ("comfy", "comfy_api", "nodes")]
