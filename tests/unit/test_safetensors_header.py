"""The one header validator: every malformed header is refused naming the file and the field, and every
header it accepts is one the safetensors library loads (checked against safetensors itself)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from lora_factory import safetensors_loads
from lora_loom.files.safetensors_header import HeaderError, UnsafeFileError, read_header

F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


def write(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


REFUSED = [
    ("gap between tensors", {"a": F32, "b": {**F32, "data_offsets": [8, 12]}}, b"\0" * 12,
     "tensor 'b' field 'data_offsets' starts at byte 8, leaving a gap of 4 bytes after tensor 'a'"),
    ("gap at the start", {"a": {**F32, "data_offsets": [4, 8]}}, b"\0" * 8, "gap of 4 bytes at the start"),
    ("overlap", {"a": F32, "b": F32}, b"\0" * 4, "overlaps tensor 'a'"),
    ("trailing bytes", {"a": F32}, b"\0" * 9, "5 trailing bytes after the last tensor"),
    ("truncated data", {"a": {**F32, "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated: tensor 'a'"),
    ("shape x dtype != bytes", {"a": {**F32, "shape": [2]}}, b"\0" * 4, "spans 4 bytes, shape [2] of F32 needs 8"),
    ("unknown dtype", {"a": {**F32, "dtype": "F4"}}, b"\0" * 4, "field 'dtype' is 'F4', not a safetensors dtype"),
    ("bool in shape", {"a": {**F32, "shape": [True]}}, b"\0" * 4, "field 'shape'"),
    ("float in shape", {"a": {**F32, "shape": [1.0]}}, b"\0" * 4, "field 'shape'"),
    ("negative offset", {"a": {**F32, "data_offsets": [-4, 0]}}, b"\0" * 4, "field 'data_offsets'"),
    ("reversed offsets", {"a": {**F32, "data_offsets": [4, 0]}}, b"\0" * 4, "field 'data_offsets'"),
    ("unknown field", {"a": {**F32, "extra": [[[]]]}}, b"\0" * 4, "unknown field(s) ['extra']"),
    ("missing field", {"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "missing field(s) ['data_offsets']"),
    ("entry not an object", {"a": [1, 2]}, b"", "entry is a list"),
    ("numeric metadata", {"__metadata__": {"ss_network_dim": 4}, "a": F32}, b"\0" * 4,
     "key 'ss_network_dim' holds 4 (int), not a string"),
    ("metadata a list", {"__metadata__": ["x"]}, b"", "'__metadata__' is a list"),
    ("header a list", [1, 2], b"", "header is a JSON list, not an object"),
    ("duplicate tensor", b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                         b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4,
     "key 'a' appears twice"),
    ("lone surrogate", b'{"__metadata__": {"k": "\\ud800"}}', b"", "lone UTF-16 surrogate"),
    ("not UTF-8", b'{"__metadata__": {"k": "\xff"}}', b"", "header is not UTF-8"),
    ("not JSON", b"{nope}", b"", "header is not valid JSON"),
    ("nested 100,000 deep", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"",
     "nests lists/objects too deeply"),
    ("nested 200 deep in a field", b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": '
                                   + b"[" * 200 + b"]" * 200 + b"}}", b"\0" * 4, "unknown field(s) ['x']"),
]


@pytest.mark.parametrize("name, header, data, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_malformed_headers_are_refused_naming_file_and_field(tmp_path: Path, name: str, header: object,
                                                             data: bytes, message: str) -> None:
    path = write(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(HeaderError) as caught:
        read_header(path)
    assert str(caught.value).startswith(f"{path}: ") and message in caught.value.reason
    assert not safetensors_loads(path) or name in ("duplicate tensor", "unknown field", "nested 200 deep"
                                                      " in a field")  # where we are stricter than safetensors


def test_length_field_checks(tmp_path: Path) -> None:
    with pytest.raises(HeaderError, match="file is 3 bytes, too short"):
        read_header((tmp_path / "s.safetensors").write_bytes(b"abc") and tmp_path / "s.safetensors")
    with pytest.raises(HeaderError, match="says 1099511627776 bytes but the file has only"):
        read_header(write(tmp_path / "l.safetensors", {"a": F32}, b"\0" * 4, length=1 << 40))
    path = write(tmp_path / "big.safetensors", {"__metadata__": {"k": "v" * 100}})
    with pytest.raises(HeaderError, match="over the 64-byte limit"):
        read_header(path, max_header_bytes=64)


@pytest.mark.parametrize("head, reason", [(b"PK\x03\x04" + b"\0" * 40, "zip archive"),
                                          (b"\x80\x04\x95" + b"\0" * 40, "pickle signature")])
def test_pickles_are_refused_by_their_bytes(tmp_path: Path, head: bytes, reason: str) -> None:
    path = tmp_path / "sneaky.safetensors"
    path.write_bytes(head)
    with pytest.raises(UnsafeFileError, match=reason):
        read_header(path)


def test_pickle_suffix_is_refused_without_opening(tmp_path: Path) -> None:
    with pytest.raises(UnsafeFileError, match=r"extension \.ckpt"):
        read_header(tmp_path / "does_not_even_exist.ckpt")


ACCEPTED = [
    ("empty header", {}, b""),
    ("metadata null", {"__metadata__": None}, b""),
    ("zero-size tensors", {"a": {**F32, "shape": [0], "data_offsets": [0, 0]}, "b": F32,
                           "c": {**F32, "shape": [0, 3], "data_offsets": [4, 4]}}, b"\0" * 4),
    ("scalar", {"a": {**F32, "shape": []}}, b"\0" * 4),
    ("out-of-order entries", {"b": {**F32, "data_offsets": [4, 8]}, "a": F32}, b"\0" * 8),
    ("padded header", b'{"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}      ', b"\0" * 4),
]


@pytest.mark.parametrize("name, header, data", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_what_is_accepted_safetensors_loads(tmp_path: Path, name: str, header: object, data: bytes) -> None:
    path = write(tmp_path / "good.safetensors", header, data)
    parsed = read_header(path)
    assert safetensors_loads(path)
    assert sum(e.end - e.begin for e in parsed.tensors.values()) == len(data)


def test_a_real_file_round_trips(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "real.safetensors"
    save_file({"x": torch.zeros(3, 2, dtype=torch.float16), "y": torch.ones(5)}, str(path), metadata={"k": "v"})
    header = read_header(path)
    assert header.metadata == {"k": "v"} and header.tensors["x"].shape == (3, 2)
    assert header.tensors["x"].dtype == "F16" and header.tensors["y"].end - header.tensors["y"].begin == 20
