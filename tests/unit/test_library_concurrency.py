"""Several threads and processes scanning and searching one index leave it consistent."""
from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading
from pathlib import Path

import library_factory as factory  # tests/ is on sys.path (tests/conftest.py)
from lora_loom.retrieval.library import Library
from lora_loom.retrieval.text_encoders import HashedTextEncoder


def _populate(root: Path, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        factory.save_lora(root / f"f{i % 4}" / f"lora_{i:03d}.safetensors",
                          metadata={"ss_output_name": f"concept{i} style", "modelspec.tags": f"tag{i % 3}"})


def _assert_consistent(db_path: Path, root: Path) -> None:
    files = sorted(str(p) for p in root.rglob("*.safetensors"))
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.execute("INSERT INTO adapters_fts(adapters_fts) VALUES ('integrity-check')")  # raises when out of step
    assert sorted(r[0] for r in conn.execute("SELECT path FROM adapters")) == files
    assert conn.execute("SELECT COUNT(*) FROM adapters_fts").fetchone()[0] == len(files)
    for adapter_id, tags in conn.execute("SELECT id, tags FROM adapters"):
        stored = sorted(r[0] for r in conn.execute("SELECT tag FROM adapter_tags WHERE adapter_id = ?", (adapter_id,)))
        assert stored == sorted(t.lower() for t in json.loads(tags))
    assert conn.execute("SELECT COUNT(*) FROM vectors WHERE kind = 'text'").fetchone()[0] == len(files)
    conn.close()


def test_threads_scan_and_search_while_files_change(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    _populate(root, 40)
    library = Library(tmp_path / "index.sqlite", [root], text_encoder=HashedTextEncoder(64))
    failures: list[BaseException] = []
    stop = threading.Event()

    def guarded(work: object) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised in the main thread
            failures.append(exc)

    def scanner() -> None:
        for _ in range(4):
            library.scan()

    def searcher() -> None:
        while not stop.is_set():
            for hit in library.search("concept1 style", top_k=5):
                assert hit.relpath.endswith(".safetensors")

    def mutator() -> None:
        for i in range(40, 55):
            _populate(root, 1, start=i)
            (root / f"f{i % 4}" / f"lora_{i - 40:03d}.safetensors").unlink()

    workers = [threading.Thread(target=guarded, args=(w,)) for w in (scanner, scanner, mutator)]
    readers = [threading.Thread(target=guarded, args=(searcher,)) for _ in range(2)]
    for t in workers + readers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert failures == []
    library.scan()
    _assert_consistent(tmp_path / "index.sqlite", root)
    assert library.search("concept54", top_k=1)[0].relpath == "f2/lora_054.safetensors"


def _process_worker(db_path: str, root: str, rounds: int, errors: multiprocessing.Queue) -> None:
    try:
        library = Library(db_path, [root], text_encoder=HashedTextEncoder(64))
        for _ in range(rounds):
            library.scan()
            library.search("concept3", top_k=3)
            library.stats()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        errors.put(repr(exc))


def test_processes_scan_and_search_one_index(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    _populate(root, 30)
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    processes = [context.Process(target=_process_worker, args=(str(tmp_path / "index.sqlite"), str(root), 3, errors))
                 for _ in range(3)]
    for p in processes:
        p.start()
    _populate(root, 5, start=30)
    for p in processes:
        p.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    assert errors.empty(), errors.get()
    library = Library(tmp_path / "index.sqlite", [root], text_encoder=HashedTextEncoder(64))
    library.scan()
    _assert_consistent(tmp_path / "index.sqlite", root)
    assert library.stats().adapters == 35
