"""The pure guards: path confinement, safe output files, the bounded cache, the throttled rescan."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from lora_loom.bounded_cache import BoundedCache, clear_all, tensor_bytes
from lora_loom.files.folders import OutsideFoldersError, confine, find_in_folders, relative_name
from lora_loom.files.writing import OutputFileError, check_output, write_file
from lora_loom.retrieval.rescan import RescanScheduler


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """``loras`` with a LoRA, a sub-folder and links of every kind; ``outside`` with a secret LoRA."""
    loras, outside = tmp_path / "loras", tmp_path / "outside"
    (loras / "styles").mkdir(parents=True)
    outside.mkdir()
    (loras / "styles" / "ink.safetensors").write_bytes(b"lora")
    (outside / "secret.safetensors").write_bytes(b"secret")
    (loras / "old.ckpt").write_bytes(b"\x80\x02")
    os.symlink(outside / "secret.safetensors", loras / "escape.safetensors")
    os.symlink(outside, loras / "escape_folder")
    os.symlink(loras / "styles" / "ink.safetensors", loras / "alias.safetensors")
    os.symlink(loras / "old.ckpt", loras / "pickle_alias.safetensors")
    os.symlink(loras / "loop.safetensors", loras / "loop.safetensors")
    return loras, outside


ESCAPES = [
    ("/etc/passwd", "must be a path relative"),
    ("../outside/secret.safetensors", "must be a path relative"),
    ("styles/../../outside/secret.safetensors", "must be a path relative"),
    ("C:\\Windows\\win.ini", "must be a path relative"),
    ("escape.safetensors", "is outside the configured folders"),
    ("escape_folder/secret.safetensors", "is outside the configured folders"),
    ("old.ckpt", "pickles can execute code"),
    ("pickle_alias.safetensors", "pickles can execute code"),
]


@pytest.mark.parametrize("name, message", ESCAPES)
def test_names_leading_outside_or_to_pickles_are_refused(folders: tuple[Path, Path], name: str,
                                                          message: str) -> None:
    loras, _ = folders
    with pytest.raises(OutsideFoldersError, match=message):
        find_in_folders(name, [loras])


def test_the_refusal_does_not_tell_whether_an_outside_path_exists(folders: tuple[Path, Path]) -> None:
    loras, outside = folders
    answers = []
    for target in (outside / "secret.safetensors", outside / "no_such.safetensors"):
        with pytest.raises(OutsideFoldersError) as caught:
            find_in_folders(str(target), [loras])
        answers.append(str(caught.value).replace(str(target), "<path>"))
    assert answers[0] == answers[1]


def test_names_inside_are_found(folders: tuple[Path, Path]) -> None:
    loras, _ = folders
    assert find_in_folders("styles/ink.safetensors", [loras]) == str(loras / "styles" / "ink.safetensors")
    assert find_in_folders("styles\\ink.safetensors", [loras]) == str(loras / "styles" / "ink.safetensors")
    assert find_in_folders("alias.safetensors", [loras]) == str(loras / "alias.safetensors")  # link inside
    assert find_in_folders("missing.safetensors", [loras]) is None
    with pytest.raises(FileNotFoundError):
        find_in_folders("loop.safetensors", [loras])
    with pytest.raises(OutsideFoldersError, match="only .safetensors, .sft"):
        confine(loras / "styles", [loras])


def test_relative_names_are_normalised() -> None:
    assert relative_name("./styles//ink.safetensors") == "styles/ink.safetensors"
    for bad in ("", "/", "..", "a/../..", "x\0y"):
        with pytest.raises(OutsideFoldersError):
            relative_name(bad)


def test_outputs_never_replace_inputs_or_existing_files(tmp_path: Path) -> None:
    source = tmp_path / "a.safetensors"
    source.write_bytes(b"input")
    with pytest.raises(OutputFileError, match="also this command's input"):
        check_output(source, force=True, inputs=[source])
    with pytest.raises(OutputFileError, match="already exists; pass --force"):
        check_output(source)
    with pytest.raises(OutputFileError, match="does not exist"):
        check_output(tmp_path / "no" / "x.safetensors")
    with pytest.raises(OutputFileError, match="is a folder"):
        check_output(tmp_path, force=True)
    assert check_output(source, force=True) == str(source)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def fails(temporary: str) -> None:
        Path(temporary).write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_file(target, fails, force=True)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    write_file(target, lambda temporary: Path(temporary).write_bytes(b"new"), force=True)
    assert target.read_bytes() == b"new" and oct(target.stat().st_mode & 0o777) != oct(0o600)


def test_cache_evicts_least_recently_used_by_entries_and_bytes() -> None:
    cache: BoundedCache[str, torch.Tensor] = BoundedCache("test", max_entries=3, max_bytes=100, weigh=tensor_bytes)
    for name in "abc":
        cache.put(name, torch.zeros(5))  # 20 bytes each
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(5))
    assert list(cache.keys()) == ["c", "a", "d"] and cache.bytes == 60
    cache.put("e", torch.zeros(15))  # 60 bytes: 120 > 100, so the least recent (c) goes
    assert list(cache.keys()) == ["a", "d", "e"] and cache.bytes == 100
    cache.put("f", torch.zeros(10))  # 40 bytes: a and d go
    assert list(cache.keys()) == ["e", "f"] and cache.bytes == 100
    huge = torch.zeros(100)
    assert cache.put("huge", huge) is huge and "huge" not in cache and cache.bytes == 100
    clear_all()
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError, match="give max_entries"):
        BoundedCache("unbounded")


def test_tensor_bytes_counts_each_storage_once() -> None:
    base = torch.zeros(10, 10)
    assert tensor_bytes({"a": base, "b": (base[0], base.T), "c": [torch.zeros(4, dtype=torch.float16)]}) == 408
    module = torch.nn.Linear(3, 2)
    assert tensor_bytes(module) == (6 + 2) * 4


def test_rescans_are_shared_and_throttled() -> None:
    now = [0.0]
    started = threading.Event()
    release = threading.Event()
    scans: list[int] = []

    def scan() -> None:
        started.set()
        release.wait(5)
        scans.append(1)

    scheduler = RescanScheduler(scan, min_interval=5.0, clock=lambda: now[0])
    assert scheduler.request() is False  # started, not finished yet
    assert started.wait(5)
    for _ in range(50):
        assert scheduler.request() is False  # joined the running one
    release.set()
    assert scheduler.request(wait=5) is True and scans == [1]  # shares the same scan
    assert scheduler.request(wait=5) is False and scheduler.started == 1  # throttled
    now[0] = 6.0
    assert scheduler.request(wait=5) is True and scheduler.started == 2 and scans == [1, 1]
