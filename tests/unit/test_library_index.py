"""Library index: header fields, sidecars, errors, path safety, incremental rescans, resolve, stats."""
from __future__ import annotations

import json
import os
import sqlite3
import struct
from pathlib import Path

import library_factory as factory  # tests/ is on sys.path (tests/conftest.py)
import pytest
from lora_loom.retrieval import header as header_module
from lora_loom.retrieval import scan as scan_module
from lora_loom.retrieval.library import Library
from lora_loom.retrieval.store import LibraryError, require_fts5

SHA = "ab" * 32


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    return folder


def _library(tmp_path: Path, *roots: Path, **kwargs: object) -> Library:
    return Library(tmp_path / "index" / "library.sqlite", [str(r) for r in roots], **kwargs)


HEADER_CASES = [
    ({"ss_output_name": "inkwash_v2"}, "name", "inkwash_v2"),
    ({"ss_output_name": "inkwash_v2"}, "output_name", "inkwash_v2"),
    ({"ss_network_module": "networks.lora_flux"}, "network_module", "networks.lora_flux"),
    ({"ss_network_dim": "16"}, "network_dim", 16),
    ({"ss_network_alpha": "8.0"}, "network_alpha", 8.0),
    ({"ss_base_model_version": "flux1"}, "base_model", "flux1"),
    ({"modelspec.architecture": "flux-1-dev/lora"}, "architecture", "flux-1-dev/lora"),
    ({"modelspec.architecture": "flux-1-dev/lora"}, "base_model", "flux-1-dev/lora"),
    ({"modelspec.title": "Ink Wash"}, "title", "Ink Wash"),
    ({"modelspec.description": "<b>soft</b> ink &amp; wash"}, "description", "soft ink & wash"),
    ({"modelspec.trigger_phrase": "inkwash, sumi-e"}, "trigger_words", ("inkwash", "sumi-e")),
    ({"modelspec.tags": "style, ink"}, "tags", ("style", "ink")),
    ({"modelspec.thumbnail": "data:image/png;base64,AAAA"}, "has_thumbnail", True),
    ({"modelspec.hash_sha256": "0x" + SHA}, "declared_sha256", SHA),
    ({"ss_tag_frequency": json.dumps({"10_ink": {"ink": 3, "wash": 1}, "5_more": {"ink": 2}})},
     "tag_frequency", {"ink": 5, "wash": 1}),
]


@pytest.mark.parametrize(("metadata", "field", "expected"), HEADER_CASES)
def test_header_metadata_fields(tmp_path: Path, root: Path, metadata: dict, field: str, expected: object) -> None:
    factory.save_lora(root / "a.safetensors", metadata=metadata)
    library = _library(tmp_path, root)
    library.scan()
    details = library.details("a.safetensors")
    assert details is not None and details.status == "ok"
    assert getattr(details, field) == expected


def _civitai(path: Path) -> None:
    factory.write_json(path.with_suffix(".civitai.info"), factory.civitai_info(
        "Ink Wash Master", ["inkwash"], "Flux.1 D", ["style", "ink"], "<p>Soft brush</p>", SHA))


def _manager(path: Path) -> None:
    factory.write_json(path.with_suffix(".metadata.json"), factory.lora_manager_info(
        "Manager Name", "Flux.1 S", ["curated"], "my note", SHA,
        civitai={"trainedWords": ["mgrword"], "model": {"name": "ignored"}}))


def _rgthree(path: Path) -> None:
    factory.write_json(path.parent / (path.name + ".rgthree-info.json"), factory.rgthree_info(
        "Rg Name", "Flux.1 D", ["rgword"], "user note", SHA))


SIDECAR_CASES = [
    (_civitai, {"name": "Ink Wash Master", "trigger_words": ("inkwash",), "base_model": "Flux.1 D",
                "tags": ("style", "ink"), "description": "Soft brush", "declared_sha256": SHA,
                "sources": ("civitai.info", "header")}),
    (_manager, {"name": "Manager Name", "base_model": "Flux.1 S", "trigger_words": ("mgrword",),
                "tags": ("curated",), "notes": "my note", "description": "Manager & description",
                "declared_sha256": SHA}),
    (_rgthree, {"name": "Rg Name", "trigger_words": ("rgword",), "notes": "user note",
                "tags": ("from-rgthree-raw",), "declared_sha256": SHA}),
    (lambda p: p.with_suffix(".txt").write_text("use with low strength"), {"notes": "use with low strength"}),
    (lambda p: p.with_suffix(".sha256").write_text(SHA.upper() + "  a.safetensors\n"), {"declared_sha256": SHA}),
]


@pytest.mark.parametrize(("write_sidecar", "expected"), SIDECAR_CASES)
def test_sidecar_kinds(tmp_path: Path, root: Path, write_sidecar: object, expected: dict) -> None:
    model = factory.save_lora(root / "a.safetensors", metadata={"ss_output_name": "header name"})
    write_sidecar(model)
    library = _library(tmp_path, root)
    library.scan()
    details = library.details("a.safetensors")
    for field, value in expected.items():
        assert getattr(details, field) == value, field


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".jpeg", ".webp", ".preview.png"])
def test_preview_found_inside_roots(tmp_path: Path, root: Path, suffix: str) -> None:
    factory.save_lora(root / "sub" / "a.safetensors")
    (root / "sub" / ("a" + suffix)).write_bytes(factory.PNG_BYTES)
    library = _library(tmp_path, root)
    library.scan()
    assert library.preview_path("sub/a.safetensors") == root / "sub" / ("a" + suffix)


def test_bad_sidecar_is_a_problem_not_a_failure(tmp_path: Path, root: Path) -> None:
    factory.save_lora(root / "a.safetensors", metadata={"ss_output_name": "kept"})
    (root / "a.civitai.info").write_text("{not json")
    library = _library(tmp_path, root)
    report = library.scan()
    details = library.details("a.safetensors")
    assert report.errors == () and details.name == "kept"
    assert len(details.problems) == 1 and "a.civitai.info" in details.problems[0]


def _huge_length(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 2 ** 60) + b"{}" * 8)


def _not_json(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 6) + b"{nope}" + b"\0" * 4)


def _bad_offsets(path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


ERROR_CASES = [
    ("empty.safetensors", lambda p: p.write_bytes(b""), "too short"),
    ("zip.safetensors", lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 200), "zip archive"),
    ("huge.safetensors", _huge_length, "but the file has only"),
    ("text.safetensors", _not_json, "not valid JSON"),
    ("offsets.safetensors", _bad_offsets, "data_offsets"),
    ("old.ckpt", lambda p: p.write_bytes(b"\x80\x02pickle"), "pickle"),
    ("old.pt", lambda p: p.write_bytes(b"\x80\x02pickle"), "pickle"),
    ("old.bin", lambda p: p.write_bytes(b"\x80\x02pickle"), "pickle"),
    ("old.pth", lambda p: p.write_bytes(b"\x80\x02pickle"), "pickle"),
]


@pytest.mark.parametrize(("file_name", "write", "reason"), ERROR_CASES)
def test_bad_files_are_errors_and_scan_goes_on(tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch,
                                                file_name: str, write: object, reason: str) -> None:
    factory.save_lora(root / "good_a.safetensors")
    write(root / file_name)
    factory.save_lora(root / "zz_good_b.safetensors")
    opened: list[str] = []
    real_read, real_hash = header_module.read_header, scan_module.sha256_of
    monkeypatch.setattr(header_module, "read_header", lambda p, **k: (opened.append(str(p)), real_read(p, **k))[1])
    monkeypatch.setattr(scan_module, "sha256_of", lambda p: (opened.append(str(p)), real_hash(p))[1])
    library = _library(tmp_path, root)
    report = library.scan()
    assert [e.relpath for e in report.errors] == [file_name]
    assert reason in report.errors[0].reason
    assert library.stats().adapters == 2 and library.stats().errors == 1
    if reason == "pickle":
        assert not any(p.endswith(file_name) for p in opened)
    assert library.search("good") and all(h.relpath != file_name for h in library.search("old"))


def test_links_escaping_the_roots_are_never_opened(tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outside = tmp_path / "outside"
    factory.save_lora(outside / "secret.safetensors", metadata={"ss_output_name": "secret"})
    (outside / "secret.png").write_bytes(factory.PNG_BYTES)
    os.symlink(outside / "secret.safetensors", root / "link.safetensors")
    os.symlink(outside, root / "linked_folder")
    factory.save_lora(root / "inner.safetensors")
    os.symlink(tmp_path / "outside" / "secret.png", root / "inner.png")
    opened: list[str] = []
    real_read = header_module.read_header
    monkeypatch.setattr(header_module, "read_header", lambda p, **k: (opened.append(str(p)), real_read(p, **k))[1])
    library = _library(tmp_path, root)
    report = library.scan()
    reasons = {e.relpath: e.reason for e in report.errors}
    assert "outside the library roots" in reasons["link.safetensors"]
    assert "outside the library roots" in reasons["linked_folder"]
    assert opened == [str(root / "inner.safetensors")]
    assert library.preview_path("inner.safetensors") is None
    assert library.search("secret") == []


def test_links_inside_the_roots_are_followed(tmp_path: Path, root: Path) -> None:
    factory.save_lora(root / "real" / "a.safetensors", metadata={"ss_output_name": "alpha"})
    os.symlink(root / "real", root / "alias")
    library = _library(tmp_path, root)
    report = library.scan()
    assert report.errors == () and report.total == 1  # the real folder is visited once


@pytest.mark.parametrize("reference", ["../outside/a.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                       "C:/loras/x.safetensors"])
def test_escaping_references_are_refused(tmp_path: Path, root: Path, reference: str) -> None:
    library = _library(tmp_path, root)
    for call in (library.details, library.preview_path, lambda r: library.resolve(r)):
        with pytest.raises(ValueError, match="escapes the library roots"):
            call(reference)


def test_incremental_rescan_reads_only_changed_files(tmp_path: Path, root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(6):
        factory.save_lora(root / f"f{i}.safetensors", metadata={"ss_output_name": f"file {i}"})
    reads: list[str] = []
    real_read = header_module.read_header
    monkeypatch.setattr(header_module, "read_header", lambda p, **k: (reads.append(str(p)), real_read(p, **k))[1])
    library = _library(tmp_path, root)
    first = library.scan()
    assert (first.added, first.headers_read, first.hashed, len(reads)) == (6, 6, 6, 6)
    reads.clear()
    again = library.scan()
    assert (again.unchanged, again.headers_read, again.hashed, reads) == (6, 0, 0, [])
    factory.save_lora(root / "f1.safetensors", metadata={"ss_output_name": "renamed"})
    os.utime(root / "f1.safetensors", ns=(1, 1))
    (root / "f2.txt").write_text("new notes")
    third = library.scan()
    assert (third.updated, third.unchanged, third.headers_read, third.hashed) == (2, 4, 2, 1)
    assert library.details("f1.safetensors").name == "renamed"
    assert library.details("f2.safetensors").notes == "new notes"


def test_progress_reports_every_file(tmp_path: Path, root: Path) -> None:
    for i in range(3):
        factory.save_lora(root / f"f{i}.safetensors")
    calls: list[tuple[int, int, str]] = []
    library = _library(tmp_path, root)
    library.scan(progress=lambda done, total, path: calls.append((done, total, path)))
    assert calls == [(1, 3, "f0.safetensors"), (2, 3, "f1.safetensors"), (3, 3, "f2.safetensors")]
    calls.clear()
    library.scan(progress=lambda done, total, path: calls.append((done, total, path)))
    assert calls == [(3, 3, "")]


def test_deleted_files_leave_the_index(tmp_path: Path, root: Path) -> None:
    factory.save_lora(root / "keep.safetensors", metadata={"ss_output_name": "keeper"})
    factory.save_lora(root / "gone.safetensors", metadata={"ss_output_name": "goner"})
    library = _library(tmp_path, root)
    library.scan()
    (root / "gone.safetensors").unlink()
    report = library.scan()
    assert report.removed == 1 and library.details("gone.safetensors") is None
    assert library.search("goner") == [] and [h.relpath for h in library.search("keeper")] == ["keep.safetensors"]


def test_resolve_by_hash_never_picks_a_different_file(tmp_path: Path, root: Path) -> None:
    original = factory.save_lora(root / "styles" / "ink.safetensors")
    other = factory.save_lora(root / "ink_other.safetensors")
    renamed = root / "moved" / "my_ink.safetensors"
    renamed.parent.mkdir()
    renamed.write_bytes(original.read_bytes())
    factory.save_lora(root / "dup_a" / "same.safetensors")
    factory.save_lora(root / "dup_b" / "same.safetensors")
    library = _library(tmp_path, root)
    library.scan()
    sha = library.details("styles/ink.safetensors").sha256
    assert library.resolve("styles/ink.safetensors", sha) == original
    assert library.resolve("elsewhere/my_ink.safetensors", sha) == renamed  # same file name wins among copies
    original.unlink()
    assert library.resolve("styles/ink.safetensors", sha) == renamed
    assert library.resolve("styles/ink.safetensors", sha[:10]) == renamed  # civitai AutoV2 prefix
    assert library.resolve("ink_other.safetensors", "cd" * 32) is None  # name matches, content does not
    assert library.resolve("ink_other.safetensors") == other
    assert library.resolve("somewhere/same.safetensors") is None  # ambiguous file name
    other.write_bytes(other.read_bytes() + b" ")  # changed after the scan: its old hash no longer holds
    assert library.resolve("ink_other.safetensors", library.details("ink_other.safetensors").sha256) is None


def test_stats_and_removed_roots(tmp_path: Path, root: Path) -> None:
    second = tmp_path / "more"
    factory.save_lora(root / "a.safetensors", metadata={"ss_base_model_version": "flux1-dev"})
    factory.save_lora(second / "b.safetensors", metadata={"modelspec.architecture": "flux-1-schnell/lora"})
    (second / "c.pt").write_bytes(b"x")
    both = _library(tmp_path, root, second)
    both.scan()
    stats = both.stats()
    assert (stats.adapters, stats.errors, stats.hashed) == (2, 1, 2)
    assert stats.by_base_model == {"flux.1-dev": 1, "flux.1-schnell": 1}
    only_first = _library(tmp_path, root)
    only_first.scan()
    assert only_first.stats().adapters == 1 and only_first.details("b.safetensors") is None


def test_missing_fts5_is_a_clear_error() -> None:
    class NoFts:
        def execute(self, sql: str) -> None:
            raise sqlite3.OperationalError("no such module: fts5")

    with pytest.raises(LibraryError, match="lacks FTS5"):
        require_fts5(NoFts())  # type: ignore[arg-type]


def test_header_reader_limits(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    header = json.dumps({"__metadata__": {"k": "v"}}).encode() + b" " * 100
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(header_module.HeaderError, match="limit"):
        header_module.read_header(path, max_header_bytes=64)
    assert header_module.read_header(path).metadata == {"k": "v"}
