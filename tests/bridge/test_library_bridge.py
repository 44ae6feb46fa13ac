"""The library inside ComfyUI: the CLIP-L text encoder adapter on a real ComfyUI ``CLIP`` (the demo CLIP-L
file), the process-wide library over ComfyUI's loras folder, resolving by hash after a rename (never a file
with other content), and the search node's function end to end."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import folder_paths
import library_factory as factory
import pytest
import torch
from lora_loom.composition.loading import file_sha256
from lora_loom.retrieval import comfy_bridge as bridge
from lora_loom.retrieval.clip_text_encoder import ComfyClipTextEncoder
from lora_loom.retrieval.rescan import RescanScheduler
from lora_loom.retrieval.text_encoders import HashedTextEncoder
from lora_loom.retrieval.weight_encoder import (
    WeightEncoder,
    WeightEncoderConfig,
    save_weight_encoder,
)


@pytest.fixture(scope="module")
def clip_l_file() -> Path:
    from loomdev.fixtures import CLIP_FILE, ensure_fixtures

    return ensure_fixtures() / CLIP_FILE


@pytest.fixture(scope="module")
def clip_encoder(clip_l_file: Path) -> ComfyClipTextEncoder:
    return bridge.load_clip_l_file(clip_l_file)


@pytest.fixture()
def user_folder() -> Path:
    folder = Path(bridge.library_folder())
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    for name in ("library.json", "weight_encoder.json", "weight_encoder.safetensors"):
        (folder / name).unlink(missing_ok=True)


def test_clip_encoder_is_comfyuis_unprojected_pooled_clip_l(clip_encoder: ComfyClipTextEncoder) -> None:
    texts = ["a watercolor portrait", "a watercolor portrait", "an armored knight, ink drawing"]
    vectors = clip_encoder.encode(texts)
    assert vectors.shape == (3, 768) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(vectors[0], vectors[1]) and not torch.allclose(vectors[0], vectors[2], atol=1e-3)
    clip = clip_encoder.clip
    _, pooled = clip.encode_from_tokens(clip.tokenize(texts[2]), return_pooled="unprojected")
    assert torch.allclose(vectors[2], torch.nn.functional.normalize(pooled.float(), dim=-1)[0], atol=1e-4)
    assert ComfyClipTextEncoder(clip).name == clip_encoder.name and clip_encoder.name.startswith("comfy-clip-l:d768:")
    assert clip_encoder.encode([]).shape == (0, 768)


def test_clip_encoder_refuses_an_object_without_clip_l() -> None:
    with pytest.raises(ValueError, match="no CLIP-L text tower"):
        bridge.clip_text_encoder(object())


def test_default_text_encoder_is_the_configured_clip_l_else_hashed(user_folder: Path, clip_l_file: Path,
                                                                    clip_encoder: ComfyClipTextEncoder) -> None:
    assert isinstance(bridge.default_text_encoder(), HashedTextEncoder)
    (user_folder / "library.json").write_text(json.dumps({"clip_l": str(clip_l_file)}))
    assert bridge.default_text_encoder().name == clip_encoder.name
    (user_folder / "library.json").write_text(json.dumps({"clip_l": "not_there.safetensors"}))
    with pytest.raises(FileNotFoundError, match="not_there.safetensors"):
        bridge.default_text_encoder()


def test_trained_weight_encoder_is_used_only_for_its_text_space(user_folder: Path) -> None:
    hashed = HashedTextEncoder()
    config = WeightEncoderConfig(hidden=32, double_blocks=1, single_blocks=1, dim=hashed.dim, text_encoder=hashed.name)
    save_weight_encoder(WeightEncoder(config), bridge.weight_encoder_stem())
    assert bridge.trained_weight_encoder(hashed) is not None
    assert bridge.trained_weight_encoder(HashedTextEncoder(dim=64)) is None
    library = bridge.server_library(hashed)
    assert library.weight_encoder is not None and library.db_path == bridge.library_db_path()
    assert library.db_path.startswith(folder_paths.get_user_directory())


def test_resolve_by_hash_after_rename_and_never_a_different_file(loras_folder: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge, "_RESCANS", RescanScheduler(bridge._rescan_plain_library, min_interval=600))
    original = factory.save_lora(loras_folder / "portrait.safetensors")
    sha = file_sha256(original)
    bridge.scan_library(bridge.server_library(plain=True))
    assert bridge.resolve_lora("portrait.safetensors", sha) == str(original)

    renamed = loras_folder / "moved" / "portrait_v2.safetensors"
    renamed.parent.mkdir()
    original.rename(renamed)
    assert bridge.resolve_lora("portrait.safetensors", sha) == str(renamed)  # not indexed yet: scans, finds
    assert bridge._RESCANS.started == 1

    impostor = factory.save_lora(loras_folder / "portrait.safetensors",
                                 {"lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(3.0)})
    assert file_sha256(impostor) != sha
    assert bridge.resolve_lora("portrait.safetensors", sha) == str(renamed)

    outside = tmp_path / "portrait_v2.safetensors"
    shutil.move(renamed, outside)  # the only copy is now outside the loras folders
    with pytest.raises(ValueError, match="refusing to use a different LoRA"):
        bridge.resolve_lora("portrait.safetensors", sha)
    impostor.unlink()
    with pytest.raises(FileNotFoundError, match=sha):
        bridge.resolve_lora("portrait.safetensors", sha)
    assert bridge._RESCANS.started == 1  # the lookups right after shared the one throttled rescan


def test_pick_adapters_loads_hits_with_sha256_and_says_why(loras_folder: Path,
                                                           clip_encoder: ComfyClipTextEncoder) -> None:
    for name, words in (("watercolor_wash", "watercolor"), ("ink_knight", "knight"), ("neon_city", "cyberpunk")):
        factory.save_lora(loras_folder / "styles" / f"{name}.safetensors",
                          metadata={"ss_output_name": name, "modelspec.trigger_phrase": words})
    pick = bridge.pick_adapters("watercolor painting", top_k=2, strength=0.7, folder="styles",
                                clip=clip_encoder.clip, rescan=True)
    assert pick.hits[0].relpath == "styles/watercolor_wash.safetensors"
    assert pick.lora_stack[0] == ("styles/watercolor_wash.safetensors", 0.7, 0.7) and len(pick.lora_stack) == 2
    first = pick.entries[0]
    assert first.row.sha256 == file_sha256(loras_folder / "styles" / "watercolor_wash.safetensors")
    assert first.row.strength == 0.7
    assert os.path.samefile(first.path, loras_folder / "styles" / "watercolor_wash.safetensors")
    assert first.trigger_words == ("watercolor",)
    sources = {c.source for c in pick.hits[0].why.components}
    assert sources == {"text", "semantic"}
    assert pick.text.startswith("1. styles/watercolor_wash.safetensors")
    assert "why: matched name: watercolor" in pick.text
    stats = bridge.server_library(bridge.clip_text_encoder(clip_encoder.clip)).stats()
    assert stats.text_vectors == 3 and stats.signature_vectors == 3
