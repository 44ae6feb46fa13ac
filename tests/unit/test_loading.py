"""Safe loading: round trip through safetensors, header validation, pickle refusal, hash cache."""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lora_factory import FluxDims, build_lora, save_case
from lora_loom.composition import loading
from lora_loom.composition.adapters import merged_delta
from lora_loom.composition.loading import HeaderError, UnsafeFileError, file_sha256, load_adapter_set, read_header

DIMS = FluxDims()


pytestmark = pytest.mark.usefixtures("fresh_lora_cache")


@pytest.fixture()
def lora_file(tmp_path: Path) -> Path:
    return save_case(build_lora("kohya", "lora", DIMS), tmp_path / "style.safetensors")


def test_round_trip_matches_the_known_delta(lora_file: Path) -> None:
    case = build_lora("kohya", "lora", DIMS)
    adapter_set = load_adapter_set(lora_file)
    assert adapter_set.source == "style.safetensors" and adapter_set.leftovers == ()
    assert adapter_set.metadata == case.metadata
    assert adapter_set.sha256 == hashlib.sha256(lora_file.read_bytes()).hexdigest()
    for key, delta in case.expected.items():
        got = merged_delta(adapter_set.adapters[key], delta.shape)
        assert torch.allclose(got, delta, atol=1e-5)


def test_dtype_casts_floating_tensors(lora_file: Path) -> None:
    adapter_set = load_adapter_set(lora_file, dtype=torch.bfloat16)
    adapter = adapter_set.adapters["double_blocks.0.img_attn.qkv"][0]
    assert adapter.up.dtype == torch.bfloat16 and adapter.alpha == pytest.approx(2.0)


def test_same_file_is_parsed_once(lora_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = loading.read_adapter_set
    monkeypatch.setattr(loading, "read_adapter_set", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    first = load_adapter_set(lora_file)
    assert load_adapter_set(lora_file) is first
    assert calls == ["style.safetensors"]
    copy = lora_file.with_name("copy.safetensors")
    copy.write_bytes(lora_file.read_bytes())
    assert load_adapter_set(copy) is first  # same content hash


def test_read_header_reads_metadata_and_index(lora_file: Path) -> None:
    header = read_header(lora_file)
    assert header.metadata == {"ss_network_dim": "4"} and header.path == str(lora_file)
    entry = header.tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert entry.dtype == "F32" and entry.shape == (3 * DIMS.hidden, 4)
    assert entry.end - entry.begin == 3 * DIMS.hidden * 4 * 4


def test_sha256_is_streamed_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "_CHUNK", 7)
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 3)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def _header_file(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _truncated(tmp_path: Path) -> Path:
    good = save_case(build_lora("comfyui", "lora", DIMS), tmp_path / "cut.safetensors")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - 100])
    return good


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_FILES: list[tuple[str, Callable[[Path], Path], type, str]] = [
    ("pickle bytes", lambda d: (d / "p.safetensors").write_bytes(b"\x80\x04\x95pickle") and d / "p.safetensors",
     UnsafeFileError, "p.safetensors: .*pickles can execute code and are never loaded"),
    ("zip archive", lambda d: (d / "z.safetensors").write_bytes(b"PK\x03\x04zipzipzip") and d / "z.safetensors",
     UnsafeFileError, "zip archive.*pickles can execute code"),
    ("ckpt extension", lambda d: _header_file(d / "m.ckpt", {"a": ENTRY}, b"\0" * 8),
     UnsafeFileError, r"m.ckpt: .*extension \.ckpt.*never loaded"),
    ("too short", lambda d: (d / "s.safetensors").write_bytes(b"\x01\x00") and d / "s.safetensors",
     HeaderError, "s.safetensors: file is 2 bytes"),
    ("absurd length", lambda d: _header_file(d / "a.safetensors", {"a": ENTRY}, length=1 << 40),
     HeaderError, "a.safetensors: header length field says 1099511627776 bytes"),
    ("length past end", lambda d: _header_file(d / "e.safetensors", {"a": ENTRY}, length=5000),
     HeaderError, "e.safetensors: header length field says 5000 bytes but the file has only"),
    ("corrupt json", lambda d: _header_file(d / "j.safetensors", b"{not json"),
     HeaderError, "j.safetensors: header is not valid JSON"),
    ("truncated data", _truncated, HeaderError, "cut.safetensors: truncated: tensor .* field 'data_offsets'"),
    ("bad dtype", lambda d: _header_file(d / "t.safetensors", {"a": {**ENTRY, "dtype": "F99"}}, b"\0" * 8),
     HeaderError, "t.safetensors: tensor 'a' field 'dtype'"),
    ("offsets vs shape", lambda d: _header_file(d / "o.safetensors", {"a": {**ENTRY, "shape": [3]}}, b"\0" * 8),
     HeaderError, "o.safetensors: tensor 'a' field 'data_offsets' spans 8 bytes"),
]


@pytest.mark.parametrize("name, make, error, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_fail_fast_naming_file_and_field(tmp_path: Path, name: str, make: Callable[[Path], Path],
                                                   error: type, message: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = make(tmp_path)
    monkeypatch.setattr(loading, "file_sha256", lambda p: pytest.fail("hashed a bad file"))
    with pytest.raises(error, match=message):
        load_adapter_set(path)


def test_truncated_check_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _truncated(tmp_path)
    reads: list[int] = []
    real_open = Path.open

    def counting_open(self: Path, *args: object, **kwargs: object):  # noqa: ANN202
        handle = real_open(self, *args, **kwargs)
        real_read = handle.read
        handle.read = lambda n=-1: reads.append(n) or real_read(n)  # type: ignore[method-assign]
        return handle

    monkeypatch.setattr(Path, "open", counting_open)
    with pytest.raises(HeaderError):
        read_header(path)
    assert all(n >= 0 for n in reads) and sum(reads) < path.stat().st_size


def test_foreign_lora_file_is_named(tmp_path: Path) -> None:
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"
    path = tmp_path / "sdxl_style.safetensors"
    from safetensors.torch import save_file
    save_file({key: torch.zeros(2, 4)}, str(path))
    with pytest.raises(ValueError, match=f"sdxl_style.safetensors is a LoRA for SDXL, not Flux \\(key {key}\\)"):
        load_adapter_set(path)
