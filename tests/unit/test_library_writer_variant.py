"""The library index stores the tool that wrote each file and the Flux variant it targets, filters on both, and
upgrades an index of schema 2 in place (the next scan re-reads headers, hashing nothing again)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import library_factory as factory
import pytest
import torch
from layout_corpus import build_layout, load_corpus
from lora_loom.cli import main
from lora_loom.retrieval.explain import details_json, hit_json
from lora_loom.retrieval.library import Library
from lora_loom.retrieval.search import SearchFilters
from lora_loom.retrieval.store import SCHEMA_VERSION

CORPUS = {e.id: e for e in load_corpus()}
PICKS = {"kontext.safetensors": "ai-toolkit/flux-kontext-lora", "fill.safetensors": "onetrainer/fill-dev-diffusers",
         "gym.safetensors": "fluxgym/12G-single-blocks", "canny.safetensors": "bfl/FLUX.1-Canny-dev-lora",
         "plain.safetensors": "x-flux/double-blocks"}


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    for name, entry_id in PICKS.items():
        build_layout(CORPUS[entry_id]).save(folder / name)
    return folder


def _library(tmp_path: Path, root: Path) -> Library:
    return Library(tmp_path / "index" / "library.sqlite", [str(root)])


def test_scan_stores_writer_and_variant_from_the_header(tmp_path: Path, root: Path) -> None:
    library = _library(tmp_path, root)
    library.scan()
    got = {name: (library.details(name).writer, library.details(name).flux_variant) for name in PICKS}
    assert got == {"kontext.safetensors": ("ai-toolkit", "kontext"), "fill.safetensors": ("onetrainer", "fill"),
                   "gym.safetensors": ("fluxgym", "dev"), "canny.safetensors": ("bfl", "canny-or-depth"),
                   "plain.safetensors": ("xlabs", "")}
    stats = library.stats()
    assert stats.by_writer["ai-toolkit"] == 1 and stats.by_flux_variant[""] == 1
    details = details_json(library.details("fill.safetensors"))
    assert details["writer"] == "onetrainer" and details["flux_variant"] == "fill"


@pytest.mark.parametrize("filters, expected", [
    (SearchFilters(writer="ai-toolkit"), ["kontext.safetensors"]),
    (SearchFilters(flux_variant="Fill"), ["fill.safetensors"]),
    (SearchFilters(flux_variant="dev"), ["gym.safetensors"]),
    (SearchFilters(writer="bfl", flux_variant="canny-or-depth"), ["canny.safetensors"]),
    (SearchFilters(writer="bfl", flux_variant="dev"), []),
])
def test_search_filters_on_writer_and_variant(tmp_path: Path, root: Path, filters: SearchFilters,
                                              expected: list[str]) -> None:
    library = _library(tmp_path, root)
    library.scan()
    hits = library.search("", top_k=20, filters=filters)
    assert sorted(h.relpath for h in hits) == expected
    for hit in hits:
        body = hit_json(hit)
        assert body["writer"] == hit.writer and body["flux_variant"] == hit.flux_variant


def test_cli_search_filters_by_variant(tmp_path: Path, root: Path, capsys) -> None:
    where = ["--db", str(tmp_path / "cli.sqlite"), "--roots", str(root), "--text-encoder", "hashed"]
    assert main(["library", "scan", *where, "--no-weights"]) == 0
    capsys.readouterr()
    assert main(["library", "search", "", *where, "--variant", "kontext", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert [(h["lora"], h["writer"], h["flux_variant"]) for h in hits] == [("kontext.safetensors", "ai-toolkit",
                                                                            "kontext")]


def _downgrade_to_schema_2(db: Path) -> None:
    """Make ``db`` look like an index written before schema 3: no writer / flux_variant columns."""
    conn = sqlite3.connect(db)
    try:
        for column in ("writer", "flux_variant"):
            conn.execute(f"ALTER TABLE adapters DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 2")
        conn.commit()
    finally:
        conn.close()


def test_an_index_of_schema_2_is_upgraded_and_filled_on_the_next_scan(tmp_path: Path, root: Path) -> None:
    db = tmp_path / "index" / "library.sqlite"
    first = Library(db, [str(root)])
    first.scan()
    sha = first.details("fill.safetensors").sha256
    del first
    _downgrade_to_schema_2(db)

    library = Library(db, [str(root)])
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    finally:
        conn.close()
    assert library.details("fill.safetensors").flux_variant == ""  # kept, not yet re-read
    report = library.scan()
    assert report.headers_read == len(PICKS) and report.hashed == 0 and report.unchanged == 0
    details = library.details("fill.safetensors")
    assert (details.writer, details.flux_variant, details.sha256) == ("onetrainer", "fill", sha)
    again = library.scan()
    assert again.headers_read == 0 and again.unchanged == len(PICKS)


def test_a_file_without_provenance_is_indexed_with_empty_fields(tmp_path: Path, root: Path) -> None:
    factory.save_lora(root / "bare.safetensors", tensors={"some.layer.lora_down.weight": torch.zeros(2, 4),
                                                          "some.layer.lora_up.weight": torch.zeros(4, 2)})
    library = _library(tmp_path, root)
    library.scan()
    details = library.details("bare.safetensors")
    assert details.status == "ok" and (details.writer, details.flux_variant) == ("", "")
