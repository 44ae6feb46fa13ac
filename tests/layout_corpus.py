"""The corpus of real Flux LoRA layouts (``tests/data/layouts/*.json``) turned into files and their expected ΔW.

Each JSON file holds the entries of one tool: its exact key names (as module prefixes), metadata, factor dtype
and the sources the layout was read from. This module builds an entry's tensors and the ΔW each parameter
must receive with plain tensor algebra from the spec alone (no converter of the pack is used): the spec says
where every module lands (``to``: a parameter key, ``rows``: the slice of a fused weight, ``swap``: diffusers'
(shift, scale) order) and what scale the tool means (``alpha`` written to the file -> alpha / rank, or an
explicit ``scale`` where the alpha lives elsewhere).

Module spec fields (an entry's ``defaults`` apply to each): ``key`` (module prefix as written), ``to``
(``double_blocks.0.img_attn.qkv``, ``<module>.bias``, ``<module>.scale``, ``clip_l:<path>``, ``t5xxl:<path>``),
``rows`` (``q``/``k``/``v`` of a fused qkv; ``q``/``k``/``v``/``mlp``/``qkv`` of a single block's ``linear1``),
``swap``, ``kind`` (``lora`` default, ``lora_split`` with ``splits``: sd-scripts' split_qkv saved merged, ``loha``,
``lokr``, ``lokr_factored``, ``diff``, ``diff_b``, ``set``),
``names`` (LoRA spelling, see :data:`NAMES`), ``alpha`` (written as ``<key><alpha_key>``, default ``.alpha``),
``scale`` (expected scale when the alpha is not a tensor of the module), ``dora`` (``{"key": ".dora_scale",
"layout": "column" | "row" | "vector"}``), ``up_bias`` (a ``lora_B.bias`` key), ``cols`` (input width override: a
widened ``img_in``), ``rank``, ``alpha_dtype`` (``int64``: an integer alpha tensor).
Entry fields: ``id``, ``version``, ``sources`` (where the layout is documented), ``dtype``, ``widths`` (``tiny``
test widths, or ``flux`` for the real Flux-1 widths a variant check needs), ``rank``, ``metadata``, ``modules``,
``extra`` (other keys with their shapes, expected to stay over), ``expect`` (``writer``, ``variant``,
``leftovers``, ``note``, or ``error``).
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lora_factory import FluxDims, base_weight, flux_param_shapes
from safetensors.torch import save_file

CORPUS_DIR = Path(__file__).resolve().parent / "data" / "layouts"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# Relative Frobenius tolerance of the loaded ΔW against the spec's, for every dtype: the expectation is computed
# from the very values stored (after the cast) and the adapters compute ΔW in float32 from 16- and 8-bit factors.
TOLERANCE = 1e-5
NAMES = {"kohya": (".lora_up.weight", ".lora_down.weight"), "peft": (".lora_B.weight", ".lora_A.weight"),
         "peft_default": (".lora_B.default.weight", ".lora_A.default.weight"), "xlabs": (".up.weight", ".down.weight")}
WIDTHS = {"tiny": FluxDims(),
          "flux": FluxDims(hidden=3072, mlp_ratio=4.0, double_blocks=19, single_blocks=38, num_heads=24,
                           in_channels=64, context_dim=4096, vec_dim=768, time_dim=256, clip_dim=768, t5_dim=4096)}


def text_encoder_shapes(dims: FluxDims) -> dict[str, tuple[int, ...]]:
    """CLIP-L and T5 parameters the corpus touches (layer 0 / block 0), by corpus parameter key."""
    c, t = dims.clip_dim, dims.t5_dim
    clip = {f"text_model.encoder.layers.0.self_attn.{p}_proj": (c, c) for p in ("q", "k", "v", "out")}
    clip.update({"text_model.encoder.layers.0.mlp.fc1": (4 * c, c), "text_model.encoder.layers.0.mlp.fc2": (c, 4 * c),
                 "text_model.encoder.layers.0.layer_norm1": (c,), "text_model.encoder.layers.0.layer_norm2": (c,),
                 "text_model.final_layer_norm": (c,), "text_model.embeddings.position_embedding": (77, c),
                 "text_projection": (c, c)})
    t5 = {f"encoder.block.0.layer.0.SelfAttention.{p}": (t, t) for p in "qkvo"}
    t5.update({"encoder.block.0.layer.1.DenseReluDense.wi_0": (2 * t, t),
               "encoder.block.0.layer.1.DenseReluDense.wi_1": (2 * t, t),
               "encoder.block.0.layer.1.DenseReluDense.wo": (t, 2 * t), "encoder.block.0.layer.0.layer_norm": (t,),
               "encoder.final_layer_norm": (t,)})
    shapes = {**{f"clip_l:{k}": v for k, v in clip.items()}, **{f"t5xxl:{k}": v for k, v in t5.items()}}
    shapes.update({f"{k}.bias": (v[0],) for k, v in shapes.items() if k.startswith("clip_l:")})
    return shapes


@dataclass(frozen=True)
class LayoutEntry:
    """One documented layout: ``tool`` (the JSON file's), ``spec`` (the entry as written)."""

    tool: str
    spec: dict

    @property
    def id(self) -> str:
        return self.spec["id"]


@dataclass(frozen=True)
class BuiltLayout:
    """An entry's file content and what reading it must give."""

    entry: LayoutEntry
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    expected: dict[str, torch.Tensor] = field(default_factory=dict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def expect(self) -> dict:
        return self.entry.spec["expect"]

    def save(self, path: Path) -> Path:
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata=self.metadata)
        return path


def load_corpus() -> list[LayoutEntry]:
    """Every entry of every ``tests/data/layouts/*.json`` file, in file then entry order."""
    entries = []
    for path in sorted(CORPUS_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        entries += [LayoutEntry(tool=doc["tool"], spec=spec) for spec in doc["entries"]]
    return entries


def _slice(target: str, rows: str | None, dims: FluxDims) -> tuple[int, int]:
    """``(start, length)`` of the rows a module writes in its target."""
    h, m = dims.hidden, dims.mlp_hidden
    if rows is None:
        return 0, -1
    if target.endswith("linear1"):
        return {"q": (0, h), "k": (h, h), "v": (2 * h, h), "mlp": (3 * h, m), "qkv": (0, 3 * h)}[rows]
    return {"q": (0, h), "k": (h, h), "v": (2 * h, h)}[rows]


def _divisor(n: int) -> int:
    return next(d for d in range(2, n + 1) if n % d == 0)


class _Writer:
    """Writes one entry's tensors and accumulates the expected ΔW, from the spec alone."""

    def __init__(self, entry: LayoutEntry) -> None:
        spec = entry.spec
        self.spec = spec
        self.dims = WIDTHS[spec.get("widths", "tiny")]
        self.dtype = DTYPES[spec.get("dtype", "fp32")]
        self.rank = int(spec.get("rank", 4))
        self.shapes = {**flux_param_shapes(self.dims), **text_encoder_shapes(self.dims)}
        self.gen = torch.Generator().manual_seed(zlib.crc32(entry.id.encode()))
        self.tensors: dict[str, torch.Tensor] = {}
        self.expected: dict[str, torch.Tensor] = {}
        self.base: dict[str, torch.Tensor] = {}

    def stored(self, t: torch.Tensor, key: str) -> torch.Tensor:
        """Put ``t`` in the file in the entry's dtype; return the fp32 value a reader gets back."""
        self.tensors[key] = t.to(self.dtype)
        return self.tensors[key].float()

    def rnd(self, *shape: int, key: str, scale: float = 0.3) -> torch.Tensor:
        return self.stored(torch.randn(shape, generator=self.gen) * scale, key)

    def add(self, module: dict) -> None:
        key, target = module["key"], module["to"]
        kind = module.get("kind", "lora")
        param = f"{target}.bias" if kind == "diff_b" else target
        shape = tuple(self.shapes[param])
        if "cols" in module:
            shape = (shape[0], int(module["cols"]))
        start, length = _slice(target, module.get("rows"), self.dims)
        rows = shape[0] if length < 0 else length
        cols = shape[1] if len(shape) > 1 else 0
        full_base = self.base.setdefault(param, base_weight(param, shape))
        own_base = full_base[start:start + rows]
        if module.get("swap"):
            own_base = torch.cat(own_base.chunk(2)[::-1])
        delta = self.delta(module, key, kind, rows, cols, own_base)
        if module.get("swap"):
            delta = torch.cat(delta.chunk(2)[::-1])
        total = self.expected.setdefault(param, torch.zeros(shape))
        total[start:start + rows] += delta
        if module.get("up_bias"):
            bias = self.rnd(rows, key=f"{key}.lora_B.bias")
            self.expected.setdefault(f"{target}.bias", torch.zeros(shape[0]))[start:start + rows] += bias

    def scale(self, module: dict, key: str, factored: bool = True) -> float:
        """The tool's scale: explicit ``scale``, else alpha / rank when an alpha tensor is written, else 1."""
        if "alpha" in module and module.get("alpha_dtype") == "int64":  # DiffSynth writes the rank as an int
            self.tensors[key + module.get("alpha_key", ".alpha")] = torch.tensor(int(module["alpha"]))
        elif "alpha" in module:  # in the file's dtype, as trainers and sd-scripts' fp8 re-save write it
            self.stored(torch.tensor(float(module["alpha"])), key + module.get("alpha_key", ".alpha"))
        if "scale" in module:
            return float(module["scale"])
        return float(module["alpha"]) / int(module.get("rank", self.rank)) if "alpha" in module and factored else 1.0

    def delta(self, module: dict, key: str, kind: str, rows: int, cols: int, base: torch.Tensor) -> torch.Tensor:
        r = int(module.get("rank", self.rank))
        if kind == "lora":
            up_name, down_name = NAMES[module.get("names", "kohya")]
            up, down = self.rnd(rows, r, key=key + up_name), self.rnd(r, cols, key=key + down_name)
            delta = up @ down * self.scale(module, key)
            if "dora" in module:
                delta = self.dora(module["dora"], key, base, delta)
            return delta
        if kind == "lora_split":  # sd-scripts split_qkv, saved merged: down stacked, up block-diagonal
            splits = [_slice(module["to"], part, self.dims)[1] for part in module["splits"]]
            down = self.rnd(len(splits) * r, cols, key=key + ".lora_down.weight")
            up = torch.zeros(rows, len(splits) * r)
            start = 0
            for i, size in enumerate(splits):
                up[start:start + size, i * r:(i + 1) * r] = torch.randn(size, r, generator=self.gen) * 0.3
                start += size
            up = self.stored(up, key + ".lora_up.weight")
            # Every reader (ComfyUI, diffusers, sd-scripts' own inference) divides by the saved rank n·r.
            return up @ down * self.scale(module, key, factored=False) * float(module["alpha"]) / (len(splits) * r)
        if kind == "loha":
            w = {n: self.rnd(*((rows, r) if n.endswith("a") else (r, cols)), key=f"{key}.hada_{n}")
                 for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
            return (w["w1_a"] @ w["w1_b"]) * (w["w2_a"] @ w["w2_b"]) * self.scale(module, key)
        if kind in ("lokr", "lokr_factored"):
            a1, a2 = _divisor(rows), _divisor(cols)
            b1, b2 = rows // a1, cols // a2
            w1 = self.rnd(a1, a2, key=f"{key}.lokr_w1")
            if kind == "lokr":  # both factors full: LyCORIS / ComfyUI scale 1 whatever the alpha
                w2 = self.rnd(b1, b2, key=f"{key}.lokr_w2")
                return torch.kron(w1, w2) * self.scale(module, key, factored=False)
            w2 = self.rnd(b1, r, key=f"{key}.lokr_w2_a") @ self.rnd(r, b2, key=f"{key}.lokr_w2_b")
            return torch.kron(w1, w2) * self.scale(module, key)
        if kind == "diff":
            return self.rnd(*((rows, cols) if cols else (rows,)), key=f"{key}.diff")
        if kind == "diff_b":
            return self.rnd(rows, key=f"{key}.diff_b")
        if kind == "set":  # replaced parameter (BFL norm gains); ``key`` is the whole tensor key
            value = self.stored(base + torch.randn(base.shape, generator=self.gen) * 0.3, key)
            return value - base
        raise ValueError(f"{self.spec['id']}: unknown kind {kind!r}")

    def dora(self, dora: dict, key: str, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``(W + D)·m/‖W + D‖ - W`` with norms per output row (column / vector layouts) or per input column."""
        merged = base + delta
        per_row = dora.get("layout", "column") in ("column", "vector")
        dim = 1 if per_row else 0
        norm = merged.norm(dim=dim, keepdim=True)
        jitter = 1 + torch.rand(norm.shape, generator=self.gen)
        magnitude = norm * jitter
        stored = magnitude.reshape(-1) if dora.get("layout") == "vector" else magnitude
        m = self.stored(stored, key + dora["key"]).reshape(norm.shape)
        return merged * m / (norm + torch.finfo(torch.float32).eps) - base


def build_layout(entry: LayoutEntry) -> BuiltLayout:
    """The file content and the expected ΔW (fp32, by parameter key) of one entry."""
    writer = _Writer(entry)
    defaults = entry.spec.get("defaults", {})
    for module in entry.spec.get("modules", []):
        writer.add({**defaults, **module})
    for key, shape in entry.spec.get("extra", {}).items():
        writer.rnd(*shape, key=key)
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in entry.spec.get("metadata", {}).items()}
    return BuiltLayout(entry=entry, tensors=writer.tensors, metadata=metadata, expected=writer.expected,
                       base=writer.base)
