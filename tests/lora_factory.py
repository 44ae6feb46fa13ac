"""Synthetic Flux LoRA state dicts of every file format and adapter kind, with KNOWN merged deltas.

Pure (torch + safetensors only) and independent of the library's converters: names are written out per
format here, and expected deltas are computed with plain tensor algebra. Model widths are parameters, so the
same tables build hidden-32 test files and hidden-3072 files for a real model.

    case = build_lora("diffusers", "lora", FluxDims(hidden=32))
    case.state_dict      # file keys -> tensors
    case.expected        # canonical parameter key -> full delta [*shape] (fp32), slices summed, swaps applied
    case.expected_te     # "clip_l:..." / "t5xxl:..." -> delta
    case.base            # parameter key -> base tensor used for DoRA / set_weight expectations
    save_case(case, tmp_path / "x.safetensors")

Parameter keys: a module name for its weight (``double_blocks.0.img_attn.qkv``), ``<module>.bias`` for a bias,
``<module>.scale`` for an RMSNorm gain.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = ("kohya", "comfyui", "diffusers", "ai-toolkit", "onetrainer", "lycoris", "xlabs", "bfl", "diffsynth")
KINDS = ("lora", "lora_mid", "loha", "loha_tucker", "lokr", "lokr_factored", "lokr_tucker", "dora",
         "dora_input_axis", "diff", "diff_b", "set_weight")
KIND_FORMATS = ("comfyui", "kohya", "lycoris", "diffusers")
# Format -> (up spelling, down spelling) for LoRA factors.
LORA_SPELLING = {
    "kohya": (".lora_up.weight", ".lora_down.weight"), "comfyui": (".lora_up.weight", ".lora_down.weight"),
    "onetrainer": (".lora_up.weight", ".lora_down.weight"), "lycoris": (".lora_up.weight", ".lora_down.weight"),
    "diffusers": (".lora_B.weight", ".lora_A.weight"), "ai-toolkit": (".lora_B.weight", ".lora_A.weight"),
    "bfl": (".lora_B.weight", ".lora_A.weight"), "xlabs": (".up.weight", ".down.weight"),
    "diffsynth": (".lora_B.default.weight", ".lora_A.default.weight"),
}
NO_ALPHA = ("ai-toolkit", "xlabs", "diffsynth", "bfl")


@dataclass(frozen=True)
class FluxDims:
    """Widths of a Flux-like model (defaults tiny; real Flux-dev: hidden 3072, heads 24, 19/38 blocks,
    in_channels 64, context_dim 4096, vec_dim 768, time_dim 256)."""

    hidden: int = 32
    mlp_ratio: float = 4.0
    double_blocks: int = 2
    single_blocks: int = 2
    num_heads: int = 2
    in_channels: int = 16
    context_dim: int = 24
    vec_dim: int = 16
    time_dim: int = 16
    clip_dim: int = 16
    t5_dim: int = 24

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads


def flux_param_shapes(dims: FluxDims) -> dict[str, tuple[int, ...]]:
    """Every Flux parameter key -> shape (weights by module name, ``.bias``, norm ``.scale``)."""
    h, m, hd = dims.hidden, dims.mlp_hidden, dims.head_dim
    weights: dict[str, tuple[int, int]] = {}
    for i in range(dims.double_blocks):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            weights.update({f"{p}_attn.qkv": (3 * h, h), f"{p}_attn.proj": (h, h), f"{p}_mlp.0": (m, h),
                            f"{p}_mlp.2": (h, m), f"{p}_mod.lin": (6 * h, h)})
    for i in range(dims.single_blocks):
        p = f"single_blocks.{i}"
        weights.update({f"{p}.linear1": (3 * h + m, h), f"{p}.linear2": (h, h + m), f"{p}.modulation.lin": (3 * h, h)})
    weights.update({"img_in": (h, dims.in_channels), "txt_in": (h, dims.context_dim),
                    "time_in.in_layer": (h, dims.time_dim), "time_in.out_layer": (h, h),
                    "vector_in.in_layer": (h, dims.vec_dim), "vector_in.out_layer": (h, h),
                    "guidance_in.in_layer": (h, dims.time_dim), "guidance_in.out_layer": (h, h),
                    "final_layer.linear": (dims.in_channels, h), "final_layer.adaLN_modulation.1": (2 * h, h)})
    shapes: dict[str, tuple[int, ...]] = dict(weights)
    shapes.update({f"{k}.bias": (v[0],) for k, v in weights.items()})
    for i in range(dims.double_blocks):
        for s in ("img", "txt"):
            for n in ("query_norm", "key_norm"):
                shapes[f"double_blocks.{i}.{s}_attn.norm.{n}.scale"] = (hd,)
    for i in range(dims.single_blocks):
        for n in ("query_norm", "key_norm"):
            shapes[f"single_blocks.{i}.norm.{n}.scale"] = (hd,)
    return shapes


def te_param_shapes(dims: FluxDims) -> dict[str, tuple[int, int]]:
    """Text-encoder weights touched by the fixtures."""
    c, t = dims.clip_dim, dims.t5_dim
    return {"clip_l:text_model.encoder.layers.0.self_attn.q_proj": (c, c),
            "clip_l:text_model.encoder.layers.0.mlp.fc1": (4 * c, c),
            "t5xxl:encoder.block.0.layer.0.SelfAttention.q": (t, t),
            "t5xxl:encoder.block.0.layer.1.DenseReluDense.wi_0": (2 * t, t)}


def base_weight(key: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Deterministic base tensor for a parameter key (fp32, std 0.5, norm gains around 1)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()) + seed)
    t = torch.randn(shape, generator=g) * 0.5
    return t + 1.0 if key.endswith(".scale") else t


@dataclass(frozen=True)
class SourceModule:
    """One module as the file names it, and where its rows land: ``target[start:start + rows]``."""

    prefix: str
    target: str
    rows: int
    cols: int
    start: int = 0
    swap: bool = False


@dataclass(frozen=True)
class LoraCase:
    """A synthetic LoRA file and what it must convert to."""

    format: str
    kind: str
    dims: FluxDims
    state_dict: dict[str, torch.Tensor]
    expected: dict[str, torch.Tensor]
    expected_te: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    widened: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _diffusers_modules(dims: FluxDims, sep: str) -> list[SourceModule]:
    """Diffusers-named modules covering slices, swaps and top-level embedders (``sep`` "." or "_")."""
    h, m = dims.hidden, dims.mlp_hidden
    d, s = "transformer_blocks.0.", "single_transformer_blocks.1."
    rows = [
        (d + "attn.to_q", "double_blocks.0.img_attn.qkv", h, h, 0),
        (d + "attn.to_k", "double_blocks.0.img_attn.qkv", h, h, h),
        (d + "attn.to_v", "double_blocks.0.img_attn.qkv", h, h, 2 * h),
        (d + "attn.add_k_proj", "double_blocks.0.txt_attn.qkv", h, h, h),
        (d + "attn.to_out.0", "double_blocks.0.img_attn.proj", h, h, 0),
        (d + "attn.to_add_out", "double_blocks.0.txt_attn.proj", h, h, 0),
        (d + "ff.net.0.proj", "double_blocks.0.img_mlp.0", m, h, 0),
        (d + "ff_context.net.2", "double_blocks.0.txt_mlp.2", h, m, 0),
        (d + "norm1_context.linear", "double_blocks.0.txt_mod.lin", 6 * h, h, 0),
        (s + "attn.to_q", "single_blocks.1.linear1", h, h, 0),
        (s + "attn.to_v", "single_blocks.1.linear1", h, h, 2 * h),
        (s + "proj_mlp", "single_blocks.1.linear1", m, h, 3 * h),
        (s + "proj_out", "single_blocks.1.linear2", h, h + m, 0),
        (s + "norm.linear", "single_blocks.1.modulation.lin", 3 * h, h, 0),
        ("x_embedder", "img_in", h, dims.in_channels, 0), ("proj_out", "final_layer.linear", dims.in_channels, h, 0),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", h, dims.time_dim, 0),
    ]
    out = [SourceModule(p.replace(".", sep), t, r, c, st) for p, t, r, c, st in rows]
    out.append(SourceModule("norm_out.linear".replace(".", sep), "final_layer.adaLN_modulation.1", 2 * h, h, swap=True))
    return out


def _flux_modules(dims: FluxDims) -> list[tuple[str, int, int]]:
    """A ComfyUI-named subset: ``(module, rows, cols)``."""
    shapes = flux_param_shapes(dims)
    names = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", "double_blocks.0.img_mod.lin",
             "single_blocks.0.linear1", "single_blocks.1.linear2", "txt_in", "vector_in.out_layer",
             "final_layer.adaLN_modulation.1"]
    return [(n, *shapes[n]) for n in names]


def source_modules(fmt: str, dims: FluxDims) -> tuple[list[SourceModule], list[SourceModule]]:
    """``(Flux modules, text-encoder modules)`` as format ``fmt`` names them."""
    te = te_param_shapes(dims)
    clip_q, clip_fc1, t5_q, t5_wi = (SourceModule("", k, *v) for k, v in te.items())

    def te_named(prefixes: tuple[str, str], underscored: bool) -> list[SourceModule]:
        out = []
        for mod in (clip_q, clip_fc1, t5_q, t5_wi):
            path = mod.target.split(":", 1)[1]
            path = path.replace(".", "_") if underscored else path
            prefix = prefixes[0] if mod.target.startswith("clip_l") else prefixes[1]
            out.append(SourceModule(prefix + path, mod.target, mod.rows, mod.cols))
        return out

    flux = _flux_modules(dims)
    h = dims.hidden
    if fmt == "kohya":
        return ([SourceModule("lora_unet_" + n.replace(".", "_"), n, r, c) for n, r, c in flux],
                te_named(("lora_te1_", "lora_te3_"), True))
    if fmt == "comfyui":
        return ([SourceModule("diffusion_model." + n, n, r, c) for n, r, c in flux],
                te_named(("text_encoders.clip_l.transformer.", "text_encoders.t5xxl.transformer."), False))
    if fmt in ("diffusers", "ai-toolkit"):
        return ([SourceModule("transformer." + s.prefix, s.target, s.rows, s.cols, s.start, s.swap)
                 for s in _diffusers_modules(dims, ".")], te_named(("text_encoder.", "text_encoder_2."), False))
    if fmt == "onetrainer":
        return ([SourceModule("lora_transformer_" + s.prefix, s.target, s.rows, s.cols, s.start, s.swap)
                 for s in _diffusers_modules(dims, "_")], te_named(("lora_te1_", "lora_te2_"), True))
    if fmt == "lycoris":
        return [SourceModule("lycoris_" + s.prefix, s.target, s.rows, s.cols, s.start, s.swap)
                for s in _diffusers_modules(dims, "_")], []
    if fmt == "xlabs":
        m = dims.mlp_hidden
        return ([SourceModule("double_blocks.0.processor.qkv_lora1", "double_blocks.0.img_attn.qkv", 3 * h, h),
                 SourceModule("double_blocks.1.processor.qkv_lora2", "double_blocks.1.txt_attn.qkv", 3 * h, h),
                 SourceModule("double_blocks.0.processor.proj_lora1", "double_blocks.0.img_attn.proj", h, h),
                 SourceModule("double_blocks.0.processor.proj_lora2", "double_blocks.0.txt_attn.proj", h, h),
                 SourceModule("single_blocks.1.processor.qkv_lora", "single_blocks.1.linear1", 3 * h, h),
                 SourceModule("single_blocks.1.processor.proj_lora", "single_blocks.1.linear2", h, h + m)], [])
    if fmt == "bfl":
        return [SourceModule(n, n, r, c) for n, r, c in flux], []
    if fmt == "diffsynth":
        m = dims.mlp_hidden
        return ([SourceModule("blocks.0.attn.a_to_qkv", "double_blocks.0.img_attn.qkv", 3 * h, h),
                 SourceModule("blocks.0.attn.b_to_k", "double_blocks.0.txt_attn.qkv", h, h, start=h),
                 SourceModule("blocks.1.norm1_a.linear", "double_blocks.1.img_mod.lin", 6 * h, h),
                 SourceModule("blocks.1.ff_b.2", "double_blocks.1.txt_mlp.2", h, m),
                 SourceModule("single_blocks.0.to_qkv_mlp", "single_blocks.0.linear1", 3 * h + m, h),
                 SourceModule("single_blocks.1.a_to_v", "single_blocks.1.linear1", h, h, start=2 * h),
                 SourceModule("single_blocks.1.proj_out", "single_blocks.1.linear2", h, h + m),
                 SourceModule("single_blocks.1.norm.linear", "single_blocks.1.modulation.lin", 3 * h, h)], [])
    raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")


def _divisor(n: int) -> int:
    """Smallest divisor of ``n`` greater than 1 (``n`` itself when prime)."""
    return next(d for d in range(2, n + 1) if n % d == 0)


def write_kind(kind: str, prefix: str, rows: int, cols: int, base: torch.Tensor, g: torch.Generator, rank: int,
               spelling: tuple[str, str], alpha: float | None) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
    """Keys of one adapter of ``kind`` on ``prefix`` and its delta ``[rows, cols]`` (or ``[rows]``) given ``base``.

    Returns ``(keys, delta, parameter)`` with parameter "weight" or "bias".
    """
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g) * 0.3

    r, keys = rank, {}
    a = float(alpha) if alpha is not None else None
    scale = (a / r) if a is not None else 1.0
    if kind in ("lora", "lora_mid", "dora", "dora_input_axis"):
        up, down = rnd(rows, r), rnd(r, cols)
        keys = {prefix + spelling[0]: up, prefix + spelling[1]: down}
        inner = up @ down
        if kind == "lora_mid":
            mid = rnd(r, r) + torch.eye(r)
            keys[prefix + ".lora_mid.weight"] = mid
            inner = up @ mid @ down
        delta = inner * scale
        if kind.startswith("dora"):
            merged = base + delta
            if kind == "dora":
                mag = merged.norm(dim=1, keepdim=True) * (1.0 + rnd(rows, 1).abs())
                delta = merged * mag / merged.norm(dim=1, keepdim=True) - base
            else:
                mag = merged.norm(dim=0, keepdim=True) * (1.0 + rnd(1, cols).abs())
                delta = merged * mag / merged.norm(dim=0, keepdim=True) - base
            keys[prefix + ".dora_scale"] = mag
    elif kind in ("loha", "loha_tucker"):
        if kind == "loha":
            w = {n: rnd(rows, r) if n.endswith("a") else rnd(r, cols) for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
            m1, m2 = w["w1_a"] @ w["w1_b"], w["w2_a"] @ w["w2_b"]
        else:
            w = {n: rnd(r, rows) if n.endswith("a") else rnd(r, cols) for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
            w.update(t1=rnd(r, r) + torch.eye(r), t2=rnd(r, r) + torch.eye(r))
            m1, m2 = w["w1_a"].T @ w["t1"] @ w["w1_b"], w["w2_a"].T @ w["t2"] @ w["w2_b"]
        keys = {f"{prefix}.hada_{n}": t for n, t in w.items()}
        delta = m1 * m2 * scale
    elif kind.startswith("lokr"):
        a1, a2 = _divisor(rows), _divisor(cols)
        b1, b2 = rows // a1, cols // a2
        w1 = rnd(a1, a2)
        keys = {f"{prefix}.lokr_w1": w1}
        if kind == "lokr":
            w2 = rnd(b1, b2)
            keys[f"{prefix}.lokr_w2"] = w2
            lokr_scale = 1.0
        elif kind == "lokr_factored":
            w2a, w2b = rnd(b1, r), rnd(r, b2)
            keys.update({f"{prefix}.lokr_w2_a": w2a, f"{prefix}.lokr_w2_b": w2b})
            w2, lokr_scale = w2a @ w2b, scale
        else:
            w2a, w2b, t2 = rnd(r, b1), rnd(r, b2), rnd(r, r) + torch.eye(r)
            keys.update({f"{prefix}.lokr_w2_a": w2a, f"{prefix}.lokr_w2_b": w2b, f"{prefix}.lokr_t2": t2})
            w2, lokr_scale = w2a.T @ t2 @ w2b, scale
        delta = torch.kron(w1, w2) * lokr_scale
    elif kind == "diff":
        delta = rnd(rows, cols)
        keys = {f"{prefix}.diff": delta}
    elif kind == "diff_b":
        delta = rnd(rows)
        return {f"{prefix}.diff_b": delta}, delta, "bias"
    elif kind == "set_weight":
        value = rnd(rows, cols)
        keys = {f"{prefix}.set_weight": value}
        delta = value - base
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    if alpha is not None and kind not in ("diff", "set_weight"):
        keys[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return keys, delta, "weight"


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def build_lora(fmt: str, kind: str = "lora", dims: FluxDims = FluxDims(), *, seed: int = 0, rank: int = 4,
               alpha: float | None = 2.0, include_text_encoders: bool = True) -> LoraCase:
    """A synthetic LoRA of format ``fmt`` whose adapters are all of ``kind``; see the module docstring."""
    g = torch.Generator().manual_seed(seed + zlib.crc32(f"{fmt}/{kind}".encode()))
    te_shapes = te_param_shapes(dims)
    shapes = {**flux_param_shapes(dims), **te_shapes, **{f"{k}.bias": (v[0],) for k, v in te_shapes.items()}}
    flux_mods, te_mods = source_modules(fmt, dims)
    if not include_text_encoders:
        te_mods = []
    alpha = None if fmt in NO_ALPHA else alpha
    state: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    expected_te: dict[str, torch.Tensor] = {}
    bases: dict[str, torch.Tensor] = {}
    for mod in [*flux_mods, *te_mods]:
        param = mod.target if kind != "diff_b" else f"{mod.target}.bias"
        full = bases.setdefault(param, base_weight(param, shapes[param], seed))
        base_src = full[mod.start:mod.start + mod.rows]
        if mod.swap:
            base_src = _swap(base_src)
        keys, delta, _ = write_kind(kind, mod.prefix, mod.rows, mod.cols, base_src, g, rank, LORA_SPELLING[fmt], alpha)
        state.update(keys)
        if mod.swap:
            delta = _swap(delta)
        bucket = expected_te if ":" in mod.target else expected
        total = bucket.setdefault(param, torch.zeros(shapes[param]))
        total[mod.start:mod.start + mod.rows] += delta
    metadata = {"ss_network_dim": str(rank)}
    widened: dict[str, tuple[int, ...]] = {}
    if fmt == "ai-toolkit":
        metadata["software"] = '{"name": "ai-toolkit", "version": "0.1"}'
    if fmt == "bfl" and kind == "lora":
        _add_bfl_control(dims, state, expected, bases, g, rank, seed, widened)
    return LoraCase(format=fmt, kind=kind, dims=dims, state_dict=state, expected=expected, expected_te=expected_te,
                    base=bases, metadata=metadata, widened=widened)


def _add_bfl_control(dims: FluxDims, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                     bases: dict[str, torch.Tensor], g: torch.Generator, rank: int, seed: int,
                     widened: dict[str, tuple[int, ...]]) -> None:
    """BFL control-LoRA extras: widened ``img_in``, ``lora_B.bias`` bias deltas, replaced norm gains."""
    h, wide = dims.hidden, 2 * dims.in_channels
    up, down = torch.randn(h, rank, generator=g), torch.randn(rank, wide, generator=g)
    bias = torch.randn(h, generator=g)
    state.update({"img_in.lora_A.weight": down, "img_in.lora_B.weight": up, "img_in.lora_B.bias": bias})
    expected["img_in"] = up @ down
    expected["img_in.bias"] = bias
    widened["img_in"] = (h, wide)
    for key in ("double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.1.norm.query_norm.scale"):
        value = torch.randn(dims.head_dim, generator=g)
        state[key] = value
        base = bases.setdefault(key, base_weight(key, (dims.head_dim,), seed))
        expected[key] = value - base


def save_case(case: LoraCase, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``case`` as a safetensors file (optionally cast) with its metadata; returns the path."""
    path = Path(path)
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in case.state_dict.items()}
    save_file(tensors, str(path), metadata=case.metadata)
    return path


def safetensors_loads(path: str | Path) -> bool:
    """Whether the safetensors library itself opens ``path`` and reads every tensor (the reference the pack's
    header validator is held to)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception:  # noqa: BLE001 - any refusal by safetensors counts
        return False
    return True
