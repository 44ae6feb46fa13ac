"""Malformed safetensors files, generated with hypothesis from two real LoRAs, through every reader a user's
file meets: ``loom inspect``, the library index and the stack loader (``Loom LoRA Stack``'s, pinned by sha256).

Every case must end in a result or in a clear error naming the file: never a traceback or another exception
type, never a hang (pytest-timeout), never an index row ``ok`` for a file safetensors cannot load. Mutations:
every header field replaced by arbitrary JSON, dtype/shape mismatches, offset permutations and shifts,
truncations, length-field values, deep nesting (up to 200,000 levels), huge metadata (up to 4 MB) and many
keys, invalid UTF-8 and lone surrogates, random header bytes, random data bytes (NaN/inf weights), and pairs
of these. Why hypothesis: it draws structured values (JSON of any shape, permutations, sizes) from one
description, runs a fixed derandomized sequence in CI (``--fuzz-seed`` for others) and shrinks a failure to a
minimal file, printed with the seed blob to replay it.

Budget (``--fuzz-cases``, default 10,000): 92 % single files through the three readers, 8 % in batches of 40
through a real scan into SQLite.
"""
from __future__ import annotations

import io
import json
import math
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import library_factory as factory
import torch
from hypothesis import given, seed
from hypothesis import strategies as st
from lora_factory import FluxDims, build_lora, safetensors_loads, save_case
from lora_loom.cli import build_parser
from lora_loom.composition import loading
from lora_loom.composition.comfy_bridge.stack import load_entries
from lora_loom.composition.stack import StackRow
from lora_loom.retrieval.library import Library
from lora_loom.retrieval.scan import describe, walk_roots

BATCH = 40
SLOW_CASE_S = 10.0
DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3",
          "F8_E5M2", "F8_E8M0", "F4", "C64", "Q4_K", "f32", "")


@dataclass(frozen=True, repr=False)
class Base:
    """A valid file split into its header dict and data section."""

    header: dict
    data: bytes

    def __repr__(self) -> str:  # hypothesis prints strategies; keep failure reports readable
        return f"Base({len(self.header)} header keys, {len(self.data)} data bytes)"


def _split(path: Path) -> Base:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return Base(json.loads(raw[8:8 + length]), raw[8 + length:])


def _bases() -> tuple[Base, ...]:
    """The two valid files every case starts from: a 3-tensor kohya LoRA with metadata, and a 60-tensor one."""
    folder = Path(tempfile.mkdtemp(prefix="loom-fuzz-bases-"))
    try:
        tiny = factory.save_lora(folder / "tiny.safetensors", metadata={
            "ss_output_name": "tiny", "ss_network_dim": "2", "ss_tag_frequency": '{"d": {"cat": 3}}'})
        case = build_lora("kohya", "lora", FluxDims(hidden=8, num_heads=1), include_text_encoders=False)
        return _split(tiny), _split(save_case(case, folder / "small.safetensors"))
    finally:
        shutil.rmtree(folder)


BASES = _bases()


# ------------------------------------------------------------------------------------------ strategies
JSON_LEAVES = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.integers(-3, 64)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
               | st.sampled_from(DTYPES))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _encode(header: object) -> bytes:
    return json.dumps(header).encode()


def _pack(raw_header: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(raw_header) if length is None else length) + raw_header + data


def _tensor_names(base: Base) -> list[str]:
    return sorted(k for k in base.header if k != "__metadata__")


@st.composite
def field_mutation(draw: st.DrawFn, base: Base) -> bytes:
    header = json.loads(json.dumps(base.header))
    name = draw(st.sampled_from(_tensor_names(base)))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "drop", "entry", "key"]))
    if field == "drop":
        header[name].pop(draw(st.sampled_from(sorted(header[name]))))
    elif field == "entry":
        header[name] = draw(JSON_VALUES)
    elif field == "key":
        header[draw(st.text(max_size=20))] = header.pop(name)
    else:
        header[name][field] = draw(JSON_VALUES)
    return _pack(_encode(header), base.data)


@st.composite
def dtype_shape_mismatch(draw: st.DrawFn, base: Base) -> bytes:
    header = json.loads(json.dumps(base.header))
    for name in draw(st.lists(st.sampled_from(_tensor_names(base)), min_size=1, max_size=3, unique=True)):
        if draw(st.booleans()):
            header[name]["dtype"] = draw(st.sampled_from(DTYPES))
        if draw(st.booleans()):
            header[name]["shape"] = draw(st.lists(st.integers(0, 2 ** 66) | st.integers(0, 64), max_size=4))
    return _pack(_encode(header), base.data)


@st.composite
def offset_permutation(draw: st.DrawFn, base: Base) -> bytes:
    header = json.loads(json.dumps(base.header))
    names = _tensor_names(base)
    how = draw(st.sampled_from(["permute", "shift", "swap", "stretch"]))
    if how == "permute":
        order = draw(st.permutations(names))
        offsets = [header[n]["data_offsets"] for n in names]
        for name, value in zip(order, offsets):
            header[name]["data_offsets"] = value
    else:
        name = draw(st.sampled_from(names))
        begin, end = header[name]["data_offsets"]
        delta = draw(st.integers(-64, 64) | st.integers(-2 ** 64, 2 ** 64))
        header[name]["data_offsets"] = {"shift": [begin + delta, end + delta], "swap": [end, begin],
                                        "stretch": [begin, end + delta]}[how]
    return _pack(_encode(header), base.data)


@st.composite
def truncation(draw: st.DrawFn, base: Base) -> bytes:
    whole = _pack(_encode(base.header), base.data)
    return whole[:draw(st.integers(0, len(whole) - 1))]


@st.composite
def length_field(draw: st.DrawFn, base: Base) -> bytes:
    raw = _encode(base.header)
    length = draw(st.sampled_from([0, 1, 2, len(raw) - 1, len(raw) + 1, 2 ** 64 - 1, 100_000_001])
                  | st.integers(0, 2 ** 64 - 1) | st.integers(0, len(raw) + len(base.data) + 16))
    return _pack(raw, base.data, length)


@st.composite
def deep_nesting(draw: st.DrawFn, base: Base) -> bytes:
    depth = draw(st.integers(1, 300) | st.integers(300, 200_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nested = opener * depth + "1" + closer * depth
    where = draw(st.sampled_from(["metadata", "entry field", "tensor", "whole", "shape"]))
    name = json.dumps(_tensor_names(base)[0])
    text = _encode(base.header).decode()
    if where == "whole":
        text = nested
    elif where == "metadata":
        text = text.replace('"__metadata__": {', f'"__metadata__": {{"deep": {nested}, ', 1)
    elif where == "entry field":
        text = text.replace(f"{name}: {{", f'{name}: {{"deep": {nested}, ', 1)
    elif where == "shape":
        text = text.replace(f"{name}: {{", f'{name}: {{"shape": {nested}, ', 1)
    else:
        text = f'{{"nested": {nested}, ' + text[1:]
    return _pack(text.encode(), base.data)


@st.composite
def huge_metadata(draw: st.DrawFn, base: Base) -> bytes:
    header = json.loads(json.dumps(base.header))
    meta = header.setdefault("__metadata__", {})
    how = draw(st.sampled_from(["long value", "many keys", "non-string", "long key"]))
    size = draw(st.integers(0, 4_000_000) | st.integers(0, 5000))
    if how == "long value":
        meta[draw(st.sampled_from(["ss_tag_frequency", "modelspec.description", "ss_network_dim", "x"]))] = \
            draw(st.sampled_from(["x", "[", "{", "9", "é"])) * size
    elif how == "many keys":
        meta.update({f"k{i}": str(i) for i in range(min(size, 20_000))})
    elif how == "long key":
        meta["k" * min(size, 1_000_000)] = "v"
    else:
        meta[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    return _pack(_encode(header), base.data)


@st.composite
def bad_text(draw: st.DrawFn, base: Base) -> bytes:
    raw = bytearray(_encode(base.header))
    junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\\ud800", b"\\udfff", b"\x00",
                                 b'"', b"\\", b"\xf4\x90\x80\x80"]))
    at = draw(st.integers(1, len(raw) - 2))
    raw[at:at] = junk
    return _pack(bytes(raw), base.data)


@st.composite
def header_bytes(draw: st.DrawFn, base: Base) -> bytes:
    raw = bytearray(_encode(base.header))
    for _ in range(draw(st.integers(1, 8))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return _pack(bytes(raw), base.data)


@st.composite
def data_bytes(draw: st.DrawFn, base: Base) -> bytes:
    data = bytearray(base.data)
    how = draw(st.sampled_from(["flip", "nan", "grow", "shrink"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 16))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif how == "nan":
        at = draw(st.integers(0, len(data) // 4 - 1)) * 4
        data[at:at + 4] = struct.pack("<f", draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    elif how == "grow":
        data += bytes(draw(st.integers(1, 64)))
    else:
        del data[-draw(st.integers(1, min(64, len(data)))):]
    return _pack(_encode(base.header), bytes(data))


MUTATIONS: dict[str, Callable[[Base], st.SearchStrategy[bytes]]] = {
    "field": field_mutation, "dtype/shape": dtype_shape_mismatch, "offsets": offset_permutation,
    "truncation": truncation, "length": length_field, "nesting": deep_nesting, "metadata": huge_metadata,
    "text": bad_text, "header bytes": header_bytes, "data bytes": data_bytes,
}


@st.composite
def malformed_file(draw: st.DrawFn, bases: tuple[Base, ...]) -> tuple[str, bytes]:
    """``(what was done, file bytes)``: one mutation of a base file, sometimes two in a row."""
    base = draw(st.sampled_from(bases))
    kind = draw(st.sampled_from(sorted(MUTATIONS)))
    content = draw(MUTATIONS[kind](base))
    if draw(st.integers(0, 9)) == 0:  # a second mutation on top, when the first left a parsable file
        try:
            again = _split_bytes(content)
        except (ValueError, struct.error, RecursionError):
            return kind, content
        second = draw(st.sampled_from(sorted(MUTATIONS)))
        return f"{kind} + {second}", draw(MUTATIONS[second](again))
    return kind, content


def _split_bytes(content: bytes) -> Base:
    (length,) = struct.unpack("<Q", content[:8])
    header = json.loads(content[8:8 + length])
    if not isinstance(header, dict) or len([k for k in header if k != "__metadata__"]) < 1:
        raise ValueError("not reusable")
    for name, value in header.items():
        if not isinstance(value, dict):
            raise ValueError("not reusable")
        offsets = value.get("data_offsets")
        if name != "__metadata__" and not (isinstance(offsets, list) and len(offsets) == 2
                                           and all(type(v) is int for v in offsets)):
            raise ValueError("not reusable")  # the mutations read each tensor's [begin, end]
    return Base(header, content[8 + length:])


# ------------------------------------------------------------------------------------------ properties
LOOM = build_parser()  # built once: building it imports every command (~30 ms)


def check_inspect(path: Path) -> None:
    """``loom inspect`` exits 0, or 1 with one line naming the file; nothing escapes the command."""
    out, err = io.StringIO(), io.StringIO()
    args = LOOM.parse_args(["inspect", str(path), "--json"])
    with redirect_stdout(out), redirect_stderr(err):
        code = args.run(args)
    if code == 0:
        assert json.loads(out.getvalue())["file"] == str(path)
    else:
        text = err.getvalue()
        assert code == 1 and text.startswith("loom inspect: error: ") and path.name in text, text[:500]
        assert "Traceback" not in text and text.count("\n") == 1, text[:500]


def check_stack_loader(path: Path) -> None:
    """``Loom LoRA Stack``'s loader, the row pinned to the file's hash: an AdapterSet or a ValueError naming
    the file (HeaderError, UnsafeFileError, CorruptTensorError, NotFluxLoRAError ...), nothing else."""
    loading.clear_cache()
    sha = loading.file_sha256(path)
    try:
        entries = load_entries([StackRow(lora=path.name, sha256=sha)], lambda name, pinned: str(path))
    except ValueError as exc:
        assert path.name in str(exc), f"{type(exc).__name__}: {str(exc)[:500]}"
        return
    assert entries[0].adapter_set.sha256 == sha
    for group in entries[0].adapter_set.adapters.values():
        for adapter in group:
            assert all(bool(torch.isfinite(t).all()) for t in _tensors(adapter))


def _tensors(adapter: object) -> list[torch.Tensor]:
    return [v for v in vars(adapter).values() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def check_index(path: Path) -> None:
    """The index's reader: an ``ok`` description only for a file safetensors loads; errors are reasons, never
    the catch-all that stands for an unforeseen exception."""
    candidates, problems = walk_roots([str(path.parent)])
    assert not problems and [c.path for c in candidates] == [str(path)]
    described = describe(candidates[0], None, hash_files=True)
    if described.metadata is None:
        assert described.error and not described.error.startswith("could not be read ("), described.error[:500]
    else:
        assert safetensors_loads(path), "indexed as ok but safetensors cannot load it"


def _seeded(budget_seed: int | None) -> Callable:
    return seed(budget_seed) if budget_seed is not None else (lambda f: f)


def test_every_malformed_file_ends_in_a_clear_error(fuzz_budget, tmp_path: Path) -> None:
    cases = fuzz_budget.cases - BATCH * (fuzz_budget.cases * 8 // 100 // BATCH)
    folder = tmp_path / "one"
    folder.mkdir()
    ran: dict[str, int] = {}
    slowest = [0.0]

    @fuzz_budget.settings(cases)
    @_seeded(fuzz_budget.seed)
    @given(malformed_file(BASES))
    def run(case: tuple[str, bytes]) -> None:
        kind, content = case
        path = folder / f"case_{zlib.crc32(content):08x}.safetensors"
        for old in folder.iterdir():
            old.unlink()
        path.write_bytes(content)
        started = time.perf_counter()
        check_inspect(path)
        check_index(path)
        check_stack_loader(path)
        slowest[0] = max(slowest[0], time.perf_counter() - started)
        ran[kind.split(" + ")[0]] = ran.get(kind.split(" + ")[0], 0) + 1

    run()
    assert sum(ran.values()) >= cases, ran
    assert set(ran) == set(MUTATIONS), ran
    assert slowest[0] < SLOW_CASE_S, f"one case took {slowest[0]:.1f} s"


def test_a_real_scan_of_malformed_files_keeps_going_and_lists_only_loadable_files(fuzz_budget,
                                                                                   tmp_path: Path) -> None:
    batches = max(1, fuzz_budget.cases * 8 // 100 // BATCH)
    count = [0]

    @fuzz_budget.settings(batches)
    @_seeded(fuzz_budget.seed)
    @given(st.lists(malformed_file(BASES), min_size=BATCH, max_size=BATCH))
    def run(files: list[tuple[str, bytes]]) -> None:
        root = tmp_path / f"batch{count[0]}"
        root.mkdir()
        for i, (_, content) in enumerate(files):
            (root / f"f{i:02d}.safetensors").write_bytes(content)
        factory.save_lora(root / "zz_good.safetensors", metadata={"ss_output_name": "still here"})
        library = Library(tmp_path / f"batch{count[0]}.sqlite", [str(root)])
        report = library.scan()
        assert report.total == BATCH + 1
        for i in range(BATCH):
            details = library.details(f"f{i:02d}.safetensors")
            assert details is not None and details.status in ("ok", "error")
            if details.status == "ok":
                assert safetensors_loads(root / details.relpath), details.relpath
            else:
                assert details.error and not details.error.startswith("could not be read (")
        assert [h.relpath for h in library.search("still here")][:1] == ["zz_good.safetensors"]
        count[0] += 1

    run()
    assert count[0] >= batches
