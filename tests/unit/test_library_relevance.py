"""What the library panel relies on before Run: what each LoRA targets (from its header) and whether it fits a
model, the index upgraded in place from schema 1, the relevance floor (nothing matched is an empty answer),
byte-identical copies as one hit, and base-model spellings of Civitai / LoRA Manager / kohya meeting."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import library_factory as factory
import pytest
import torch
from lora_loom.retrieval.library import Library
from lora_loom.retrieval.metadata import normalise_base_model
from lora_loom.retrieval.search import SearchFilters
from lora_loom.retrieval.store import SCHEMA_VERSION, connect
from lora_loom.retrieval.targets import Targets, fit, lora_targets, model_targets
from lora_loom.retrieval.text_encoders import HashedTextEncoder


def kohya(hidden: int, double: int = 1, single: int = 0, rank: int = 2) -> dict[str, torch.Tensor]:
    """A kohya LoRA on qkv (reads hidden) and mlp.2 (reads 4*hidden) of ``double`` blocks and linear1 of
    ``single`` blocks."""
    out = {}
    for i in range(double):
        for module, d_in, d_out in (("img_attn_qkv", hidden, 3 * hidden), ("img_mlp_2", 4 * hidden, hidden)):
            out[f"lora_unet_double_blocks_{i}_{module}.lora_down.weight"] = torch.zeros(rank, d_in)
            out[f"lora_unet_double_blocks_{i}_{module}.lora_up.weight"] = torch.zeros(d_out, rank)
    for j in range(single):
        out[f"lora_unet_single_blocks_{j}_linear1.lora_down.weight"] = torch.zeros(rank, hidden)
        out[f"lora_unet_single_blocks_{j}_linear1.lora_up.weight"] = torch.zeros(7 * hidden, rank)
    out["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(rank, 768)
    return out


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize(("tensors", "expected"), [
    (kohya(192, double=2, single=2), Targets("flux", 192, 2, 2)),
    (kohya(3072, double=1), Targets("flux", 3072, 1, 0)),
    ({"transformer.transformer_blocks.4.attn.to_q.lora_A.weight": torch.zeros(4, 64),
      "transformer.transformer_blocks.4.attn.to_q.lora_B.weight": torch.zeros(64, 4),
      "transformer.single_transformer_blocks.9.proj_out.lora_A.weight": torch.zeros(4, 320),
      "transformer.single_transformer_blocks.9.attn.to_k.lora_A.weight": torch.zeros(4, 64)},
     Targets("flux", 64, 5, 10)),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)}, Targets()),
])
def test_lora_targets_from_names_and_shapes(tensors, expected) -> None:
    assert lora_targets(shapes(tensors)) == expected


def test_fit_says_why_in_words() -> None:
    playground = model_targets({"img_in.weight": (192, 48), "double_blocks.1.img_attn.qkv.weight": (576, 192),
                                "single_blocks.1.linear1.weight": (1344, 192)})
    assert playground == Targets("flux", 192, 2, 2)
    assert fit(Targets("flux", 192, 2, 2), playground).ok is True
    wrong_width = fit(Targets("flux", 3072, 1, 0), playground)
    assert wrong_width.ok is False and "width 3072" in wrong_width.reason and "192" in wrong_width.reason
    too_deep = fit(Targets("flux", 192, 19, 38), playground)
    assert too_deep.ok is False and "19 double" in too_deep.reason
    assert fit(Targets(), playground).ok is None
    assert model_targets({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}) == Targets()


def test_index_records_targets_and_width_mismatch_is_no_problem(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    factory.save_lora(root / "narrow.safetensors", kohya(32, double=2, single=1))
    factory.save_lora(root / "wide.safetensors", kohya(64, double=1))
    from lora_loom.retrieval.factors import FluxLayout
    from lora_loom.retrieval.weight_vectors import SignatureSpace

    library = Library(tmp_path / "db.sqlite", [root],
                      weight_signatures=SignatureSpace(layout=FluxLayout(hidden=64, double_blocks=2, single_blocks=2)))
    report = library.scan()
    assert not report.errors
    narrow = library.details("narrow.safetensors")
    assert narrow.targets == Targets("flux", 32, 2, 1)
    assert narrow.problems == ()  # another width: no raw "factors give ΔW ..." error
    assert library.details("wide.safetensors").targets == Targets("flux", 64, 1, 0)
    assert {h.relpath: h.targets.hidden for h in library.search("")} == {"narrow.safetensors": 32,
                                                                          "wide.safetensors": 64}


def test_schema_1_index_upgrades_in_place_and_rescan_fills_targets(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    factory.save_lora(root / "a.safetensors", kohya(48), metadata={"ss_output_name": "alpha"})
    db = tmp_path / "db.sqlite"
    Library(db, [root]).scan()
    with sqlite3.connect(db) as conn:  # make it an index written by schema 1: no target (2), writer (3) columns
        for column in ("target_arch", "target_hidden", "target_double", "target_single", "writer", "flux_variant"):
            conn.execute(f"ALTER TABLE adapters DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 1")
    library = Library(db, [root])
    assert connect(str(db)).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert library.details("a.safetensors").name == "alpha"  # kept
    report = library.scan()
    assert report.hashed == 0 and report.updated == 1  # headers re-read, nothing re-hashed
    assert library.details("a.safetensors").targets == Targets("flux", 48, 1, 0)


@pytest.fixture()
def words_library(tmp_path: Path) -> Library:
    root = tmp_path / "loras"
    for name, title in (("watercolor_cat", "Watercolor cat"), ("pixel_robot", "Pixel robot"),
                        ("ink_castle", "Ink castle")):
        factory.save_lora(root / f"{name}.safetensors", metadata={"ss_output_name": name, "modelspec.title": title})
    library = Library(tmp_path / "db.sqlite", [root], text_encoder=HashedTextEncoder())
    library.scan()
    return library


def test_nothing_matched_is_empty_and_closest_ranks_anyway(words_library: Library) -> None:
    assert words_library.search("xyzzyqq") == []
    assert words_library.search("a the of") == []  # stop words alone match nothing
    assert [h.relpath for h in words_library.search("a watercolour cat")] == ["watercolor_cat.safetensors"]
    closest = words_library.search("xyzzyqq", top_k=3, floor=False)
    assert len(closest) == 3 and all(h.score > 0 for h in closest)


def test_byte_identical_copies_are_one_hit(words_library: Library) -> None:
    root = Path(words_library.roots[0])
    (root / "copies").mkdir()
    shutil.copy(root / "pixel_robot.safetensors", root / "copies" / "robot_again.safetensors")
    words_library.scan()
    hits = words_library.search("pixel robot")
    assert [h.relpath for h in hits] == ["pixel_robot.safetensors"]
    assert hits[0].copies == ("copies/robot_again.safetensors",)


@pytest.mark.parametrize(("spelling", "family"), [
    ("Flux.1 D", "flux.1-dev"), ("flux1-dev", "flux.1-dev"), ("FLUX.1 [dev]", "flux.1-dev"),
    ("flux-1-dev/lora", "flux.1-dev"), ("fluxdev", "flux.1-dev"), ("flux1", "flux.1"), ("Flux.1 S", "flux.1-schnell"),
    ("flux1-schnell", "flux.1-schnell"), ("Flux.1 Kontext", "flux.1-kontext"), ("Flux.1 Krea", "flux.1-krea"),
    ("Flux.2 D", "flux.2"), ("SDXL 1.0", "sdxl"),
])
def test_base_model_spellings(spelling: str, family: str) -> None:
    assert normalise_base_model(spelling) == family


def test_base_model_filter_matches_variant_and_bare_family(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    for name, base in (("dev", "Flux.1 D"), ("bare", "flux1"), ("schnell", "flux1-schnell"), ("xl", "SDXL 1.0")):
        factory.save_lora(root / f"{name}.safetensors", metadata={"ss_base_model_version": base})
    library = Library(tmp_path / "db.sqlite", [root])
    library.scan()

    def names(base_model: str) -> set[str]:
        return {Path(h.relpath).stem for h in library.search("", filters=SearchFilters(base_model=base_model))}

    assert names("flux1-dev") == {"dev", "bare"}
    assert names("Flux.1 D") == {"dev", "bare"}
    assert names("flux") == {"dev", "bare", "schnell"}
    assert names("sdxl") == {"xl"}
