"""Library search: BM25 ranking, filters, the ``why`` of each hit, semantic search, fusion."""
from __future__ import annotations

from pathlib import Path

import library_factory as factory  # tests/ is on sys.path (tests/conftest.py)
import pytest
import torch
from lora_loom.retrieval.library import Library
from lora_loom.retrieval.search import SearchFilters, fuse
from lora_loom.retrieval.text_encoders import (
    HashedTextEncoder,
    TextEncoder,
    adapter_caption,
)

# relpath, header metadata, civitai sidecar (or None)
FILES = [
    ("styles/anime/ink.safetensors", {"ss_output_name": "inkwash", "ss_base_model_version": "flux1-dev",
                                      "modelspec.tags": "style, ink"}, None),
    ("styles/anime/cel.safetensors", {"ss_output_name": "cel shade", "modelspec.architecture": "flux-1-dev/lora"},
     ("Cel Shading Pro", ["celshade"], "Flux.1 D", ["style", "anime"], "flat anime colours")),
    ("styles/photo/film.safetensors", {"ss_output_name": "film grain", "modelspec.tags": "style, photo",
                                       "ss_base_model_version": "flux1-schnell"}, None),
    ("characters/knight.safetensors", {"ss_output_name": "knight", "modelspec.trigger_phrase": "ohwx knight",
                                       "ss_base_model_version": "flux1-dev"},
     ("Armored Knight", ["ohwx knight"], "Flux.1 D", ["character"], "a knight in <b>ink</b> armour")),
    ("characters/witch.safetensors", {"ss_output_name": "witch",
                                      "ss_tag_frequency": '{"1_witch": {"pointy hat": 9, "broom": 4}}'}, None),
]


@pytest.fixture()
def library(tmp_path: Path) -> Library:
    root = tmp_path / "loras"
    for relpath, metadata, civitai in FILES:
        path = factory.save_lora(root / relpath, metadata=metadata)
        if civitai:
            factory.write_json(path.with_suffix(".civitai.info"), factory.civitai_info(*civitai, sha256="ab" * 32))
    lib = Library(tmp_path / "index.sqlite", [root], text_encoder=HashedTextEncoder())
    lib.scan()
    return lib


SEARCH_CASES = [
    ("inkwash", SearchFilters(), ["styles/anime/ink.safetensors"]),
    # name beats description
    ("ink", SearchFilters(), ["styles/anime/ink.safetensors", "characters/knight.safetensors"]),
    ("celshade", SearchFilters(), ["styles/anime/cel.safetensors"]),  # civitai trained word
    ("broom", SearchFilters(), ["characters/witch.safetensors"]),  # tag frequency
    ("armour", SearchFilters(), ["characters/knight.safetensors"]),  # civitai description, HTML stripped
    ("style", SearchFilters(base_model="Flux.1 D"), {"styles/anime/cel.safetensors", "styles/anime/ink.safetensors"}),
    ("style", SearchFilters(base_model="flux schnell"), ["styles/photo/film.safetensors"]),
    ("style", SearchFilters(folder="styles/photo"), ["styles/photo/film.safetensors"]),
    ("", SearchFilters(folder="styles"), ["styles/anime/cel.safetensors", "styles/photo/film.safetensors",
                                          "styles/anime/ink.safetensors"]),
    ("", SearchFilters(folder="characters/"), ["characters/knight.safetensors", "characters/witch.safetensors"]),
    ("style", SearchFilters(tags_include=("Style", "anime")), ["styles/anime/cel.safetensors"]),
    ("style", SearchFilters(tags_exclude=("anime", "photo")), ["styles/anime/ink.safetensors"]),
    ("", SearchFilters(tags_include=("character",), base_model="flux-1-dev"), ["characters/knight.safetensors"]),
    ("style", SearchFilters(folder="style"), []),  # folder is a path prefix by segments, not by characters
]


@pytest.mark.parametrize(("query", "filters", "expected"), SEARCH_CASES)
def test_text_search_and_filters(library: Library, query: str, filters: SearchFilters,
                                 expected: list[str] | set[str]) -> None:
    """A list expects that order (ranking or, for an empty query, names); a set expects those hits in any order."""
    library.text_encoder = None  # BM25 only
    found = [h.relpath for h in library.search(query, top_k=10, filters=filters)]
    assert (set(found) if isinstance(expected, set) else found) == expected


def test_why_names_fields_terms_and_components(library: Library) -> None:
    hit = library.search("ohwx armour", top_k=1)[0]
    assert hit.relpath == "characters/knight.safetensors"
    fields = {m.field: m.terms for m in hit.why.fields}
    assert fields["trigger words"] == ("ohwx",) and fields["description"] == ("armour",)
    sources = {c.source: c for c in hit.why.components}
    assert sources["text"].rank == 1 and sources["text"].score > 0 and "semantic" in sources
    assert hit.trigger_words == ("ohwx knight",) and hit.sha256 and hit.score > 0


def test_semantic_search_finds_spelling_variants(library: Library) -> None:
    """``celshading`` is no FTS word or prefix of any field, but its character n-grams meet ``celshade``."""
    library_text = library.search("celshading", top_k=3)
    assert library_text[0].relpath == "styles/anime/cel.safetensors"
    assert [c.source for c in library_text[0].why.components] == ["semantic"]


def test_text_vectors_follow_metadata_changes(library: Library, tmp_path: Path) -> None:
    assert library.stats().text_vectors == len(FILES)
    witch = tmp_path / "loras" / "characters" / "witch.txt"
    witch.write_text("now also a sorceress")
    library.scan()
    hit = library.search("sorceress", top_k=1)[0]
    assert hit.relpath == "characters/witch.safetensors"
    assert {(c.source, c.rank) for c in hit.why.components} == {("text", 1), ("semantic", 1)}
    assert library.stats().text_vectors == len(FILES)


def test_fusion_adds_reciprocal_ranks() -> None:
    fused = fuse({"text": [(1, 9.0), (2, 5.0)], "semantic": [(2, 0.9), (3, 0.8)]}, k=60)
    assert [f[0] for f in fused] == [2, 1, 3]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert [(c.source, c.rank) for c in fused[0][2]] == [("text", 2), ("semantic", 1)]


def test_hashed_encoder_is_a_deterministic_text_encoder() -> None:
    encoder = HashedTextEncoder(dim=64)
    assert isinstance(encoder, TextEncoder)
    a = encoder.encode(["Watercolor portrait", "watercolour portrait", "steel robot", ""])
    assert a.shape == (4, 64) and a.dtype == torch.float32
    assert torch.allclose(a[:3].norm(dim=-1), torch.ones(3)) and not a[3].any()
    assert float(a[0] @ a[1]) > float(a[0] @ a[2]) + 0.3
    assert torch.equal(a, HashedTextEncoder(dim=64).encode(["Watercolor portrait", "watercolour portrait",
                                                             "steel robot", ""]))


def test_caption_carries_every_field() -> None:
    caption = adapter_caption({"name": "ink", "title": "Ink Wash", "trigger_words": ["inkw"], "tags": ["style"],
                               "tag_frequency": {"brush": 3}, "description": "soft"})
    assert caption == "ink. Ink Wash. trigger words: inkw. tags: style. dataset tags: brush. soft"


def test_benchmark_runs_on_a_small_library(tmp_path: Path) -> None:
    from lora_loom.bench.library import format_table, run_benchmark

    rows = run_benchmark(count=60, folder=tmp_path / "bench", queries=10)
    by_metric = {row.metric: row for row in rows}
    assert by_metric["headers read by rescan"].value == 0
    assert by_metric["files"].value == 60 and len(list((tmp_path / "bench").rglob("*.safetensors"))) == 60
    assert all(row.value >= 0 for row in rows) and "search p95, hybrid" in format_table(rows)
