"""Issue 16's failures, one test each: one bad file never breaks the library, a file that cannot load is never
indexed as ok, NaN weights and absurd numbers are refused naming the field, a pinned load hashes the file it
opens, and the CLI never overwrites a file (its input above all) without --force."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import library_factory as factory
import pytest
import torch
from lora_factory import FluxDims, build_lora, save_case
from lora_loom.cli import main
from lora_loom.composition import loading
from lora_loom.composition.adapter_gate import parse_keyframes
from lora_loom.composition.block_weights import BlockWeightsError, parse_block_weights
from lora_loom.composition.gates import GateError
from lora_loom.composition.plan import Plan, PlanError, Region
from lora_loom.composition.prompt_schedule import PromptSyntaxError, parse_prompt_schedule
from lora_loom.composition.stack import StackError, parse_rows
from lora_loom.retrieval.library import Library
from safetensors.torch import save_file

DIMS = FluxDims(hidden=32, double_blocks=2, single_blocks=2)


pytestmark = pytest.mark.usefixtures("fresh_lora_cache")


@pytest.fixture()
def library(tmp_path: Path) -> Library:
    (tmp_path / "loras").mkdir()
    return Library(tmp_path / "index.sqlite", [str(tmp_path / "loras")])


def _raw(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


BAD_ENTRIES = {  # file name: what to make there
    "loop.safetensors": lambda p: os.symlink(p, p),
    "loop_folder": lambda p: os.symlink(p, p),
    "deep.safetensors": lambda p: _raw(p, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "overlap.safetensors": lambda p: _raw(p, json.dumps({
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(), b"\0" * 4),
    "trailing.safetensors": lambda p: _raw(p, json.dumps({
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(), b"\0" * 12),
    "dtype.safetensors": lambda p: _raw(p, json.dumps({
        "a": {"dtype": "Q4_K", "shape": [1], "data_offsets": [0, 4]}}).encode(), b"\0" * 4),
    "nan_meta.safetensors": lambda p: factory.save_lora(p, metadata={"ss_network_dim": "inf",
                                                                     "ss_network_alpha": "1e999",
                                                                     "ss_tag_frequency": "[" * 50_000}),
    b"\xff\xfe.safetensors".decode("utf-8", "surrogateescape"): lambda p: factory.save_lora(
        p, {"lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)}),
}


def test_bad_entries_cost_one_error_each_never_the_scan(library: Library) -> None:
    root = Path(library.roots[0])
    factory.save_lora(root / "good.safetensors", metadata={"ss_output_name": "good one"})
    for name, make in BAD_ENTRIES.items():
        make(root / name)
    (root / "sub").mkdir()
    (root / "sub" / "info.civitai.info").write_text('{"model": ' + "[" * 50_000, encoding="utf-8")
    factory.save_lora(root / "sub" / "info.safetensors")
    (root / "sub" / "odd.civitai.info").write_text('{"name": "\\ud800", "trainedWords": ["\\udfff"]}')
    factory.save_lora(root / "sub" / "odd.safetensors")
    report = library.scan()
    errors = {e.relpath: e.reason for e in report.errors}
    assert set(errors) == {"loop.safetensors", "loop_folder", "deep.safetensors", "overlap.safetensors",
                           "trailing.safetensors", "dtype.safetensors", "??.safetensors"}, errors
    assert "nests lists/objects too deeply" in errors["deep.safetensors"]
    assert "overlaps tensor" in errors["overlap.safetensors"] and "trailing" in errors["trailing.safetensors"]
    assert "file name is not valid UTF-8" in errors["??.safetensors"]
    stats = library.stats()
    assert stats.adapters == 4 and stats.errors == 4  # good, nan_meta, info, odd are ok; 4 header errors
    assert [h.relpath for h in library.search("good")] == ["good.safetensors"]
    assert library.details("nan_meta.safetensors").network_dim is None
    assert any("ss_tag_frequency" in p for p in library.details("nan_meta.safetensors").problems)
    assert library.details("sub/info.safetensors").problems  # the sidecar's problem, not the LoRA's


def test_sidecar_links_leading_outside_are_not_read(library: Library, tmp_path: Path) -> None:
    root = Path(library.roots[0])
    factory.save_lora(root / "style.safetensors", metadata={"ss_output_name": "style"})
    secret = tmp_path / "secret.txt"
    secret.write_text("the password is hunter2", encoding="utf-8")
    os.symlink(secret, root / "style.txt")
    os.symlink(tmp_path / "index.sqlite", root / "style.preview.png")
    library.scan()
    details = library.details("style.safetensors")
    assert details.status == "ok" and "hunter2" not in details.notes and details.preview == ""


def test_every_ok_row_loads(library: Library) -> None:
    root = Path(library.roots[0])
    save_case(build_lora("kohya", "lora", DIMS), root / "fine.safetensors")
    for name in ("overlap.safetensors", "trailing.safetensors", "dtype.safetensors"):
        BAD_ENTRIES[name](root / name)
    library.scan()
    ok = [d for d in (library.details(p.name) for p in root.iterdir()) if d.status == "ok"]
    assert [d.relpath for d in ok] == ["fine.safetensors"]
    for details in ok:
        loading.load_adapter_set(Path(root) / details.relpath)


def test_nan_weights_are_refused_naming_file_and_key(tmp_path: Path) -> None:
    case = build_lora("kohya", "lora", DIMS)
    path = save_case(case, tmp_path / "nan.safetensors")
    tensors = {k: v.clone().contiguous() for k, v in case.state_dict.items()}
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(loading.CorruptTensorError, match=f"nan.safetensors: tensor '{key}' holds NaN"):
        loading.load_adapter_set(path)


def test_a_pinned_load_hashes_the_file_it_opens(tmp_path: Path) -> None:
    path = save_case(build_lora("kohya", "lora", DIMS, seed=1), tmp_path / "style.safetensors")
    sha = loading.file_sha256(path)
    assert loading.load_adapter_set(path, sha256=sha).sha256 == sha
    stat = path.stat()
    other = save_case(build_lora("kohya", "lora", DIMS, seed=2), tmp_path / "other.safetensors").read_bytes()
    assert len(other) == stat.st_size
    path.write_bytes(other)  # changed in place, size and mtime restored: the stat shortcut cannot see it
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert loading.cached_sha256(path) == sha  # the shortcut is fooled ...
    with pytest.raises(loading.PinnedHashError, match="refusing to use other content"):
        loading.load_adapter_set(path, sha256=sha)  # ... the pinned load is not


NUMBERS = [
    (lambda: parse_rows('[{"lora": "a", "strength": 1e30}]'), StackError, "stack row 0: field 'strength' must lie"),
    (lambda: parse_rows('[{"lora": "a", "strength": NaN}]'), StackError, "field 'strength' must be a finite"),
    (lambda: parse_rows('[{"lora": "a", "clip_strength": -Infinity}]'), StackError, "field 'clip_strength'"),
    (lambda: parse_rows("[" * 50_000 + "]" * 50_000), StackError, "stack rows nests lists/objects too deeply"),
    (lambda: parse_block_weights("default=1,double3=1e30"), BlockWeightsError, "block weight 1e30 is outside"),
    (lambda: parse_keyframes("0:1, 0.5:1e30"), GateError, "gate value 1e30 is outside"),
    (lambda: parse_prompt_schedule("<lora:x:1000>"), PromptSyntaxError, "a lora strength 1000 is outside"),
    (lambda: Plan("g", regions=(Region("a", box=(float("nan"), 0.0, 0.5, 0.5)),)).validate(), PlanError,
     r"plan.regions\[0\].box\[0\] must be a finite number"),
]


@pytest.mark.parametrize("make, error, message", NUMBERS)
def test_absurd_numbers_are_refused_naming_the_field(make, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make()


def _delta_inputs(tmp_path: Path) -> Path:
    return save_case(build_lora("kohya", "lora", DIMS), tmp_path / "a.safetensors")


def test_delta_never_overwrites_without_force(tmp_path: Path, capsys) -> None:
    lora = _delta_inputs(tmp_path)
    original = lora.read_bytes()
    assert main(["delta", str(lora), "--out", str(lora)]) == 1
    assert "is also this command's input" in capsys.readouterr().err and lora.read_bytes() == original
    assert main(["delta", str(lora), "--out", str(lora), "--force"]) == 1  # never its input, even with --force
    assert lora.read_bytes() == original
    out = tmp_path / "delta.safetensors"
    out.write_bytes(b"keep me")
    assert main(["delta", str(lora), "--out", str(out)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["delta", str(lora), "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors",
                                                                                           "delta.safetensors"]


@pytest.mark.parametrize("strength", ["nan", "inf", "1e30", "-1e3", "x"])
def test_delta_strength_must_be_a_sane_number(tmp_path: Path, capsys, strength: str) -> None:
    lora = _delta_inputs(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["delta", str(lora), "--out", str(tmp_path / "d.safetensors"), f"--strength={strength}"])
    assert exited.value.code == 2 and "argument --strength" in capsys.readouterr().err
    assert not (tmp_path / "d.safetensors").exists()


def test_delta_errors_are_one_line(tmp_path: Path, capsys) -> None:
    lora = _delta_inputs(tmp_path)
    nested = _raw(tmp_path / "model.safetensors", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert main(["delta", str(lora), "--out", str(tmp_path / "d.safetensors"), "--model", str(nested)]) == 1
    assert "model.safetensors: header nests lists/objects too deeply" in capsys.readouterr().err
    assert main(["delta", str(lora), "--out", str(tmp_path / "missing" / "d.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err
    for bad in ("overlap.safetensors", "trailing.safetensors"):
        BAD_ENTRIES[bad](tmp_path / bad)
        assert main(["inspect", str(tmp_path / bad)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"loom inspect: error: {tmp_path / bad}: ") and "Traceback" not in err


def test_library_scan_on_a_file_that_is_not_a_database(tmp_path: Path, capsys) -> None:
    (tmp_path / "loras").mkdir()
    db = tmp_path / "notes.txt"
    db.write_text("my notes, not an index\n" * 100)
    code = main(["library", "scan", "--roots", str(tmp_path / "loras"), "--db", str(db)])
    assert code == 1 and "is not a usable LoRA Loom index" in capsys.readouterr().err
    assert db.read_text() == "my notes, not an index\n" * 100
