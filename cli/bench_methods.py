"""``loom bench compose | gates | clora``: per-step cost of each Loom method against its baseline, measured in one
run on a small Flux (ComfyUI imported in-process). Benchmarks, not tests: they print ratios, never assert them."""
from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict

from ..arguments import int_in
from ..comfy_env import find_comfyui, import_comfy


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int_in(1, 1024)(v) for v in text.split(",") if v.strip())


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _prepare(args: argparse.Namespace) -> None:
    import_comfy(find_comfyui(args.comfyui), cpu=True, base_directory=tempfile.mkdtemp(prefix="loom-bench-"))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def run_compose(args: argparse.Namespace) -> int:
    _prepare(args)
    from ..bench.compose import run_compose_bench

    rows = run_compose_bench(adapter_counts=args.adapters, region_counts=args.regions,
                             latent_hw=(args.latent, args.latent), rank=args.rank, repeats=args.repeats)
    if args.json:
        print(json.dumps([{**asdict(r), "ratio": r.ratio} for r in rows], indent=1))
    else:
        print(_table(["adapters", "regions", "merged ms", "composed ms", "composed/merged"],
                     [[str(r.adapters), str(r.regions), f"{r.merged_ms:.1f}", f"{r.composed_ms:.1f}",
                       f"{r.ratio:.2f}x"] for r in rows]))
    return 0


def run_gates(args: argparse.Namespace) -> int:
    _prepare(args)
    from ..bench.gates import run_gates_bench

    rows = run_gates_bench(adapter_counts=args.adapters, latent_hw=(args.latent, args.latent), rank=args.rank,
                           repeats=args.repeats)
    if args.json:
        print(json.dumps([{**asdict(r), "ratio": r.ratio} for r in rows], indent=1))
    else:
        print(_table(["variant", "adapters", "step ms", "merged ms", "step/merged"],
                     [[r.variant, str(r.adapters), f"{r.step_ms:.1f}", f"{r.merged_ms:.1f}", f"{r.ratio:.2f}x"]
                      for r in rows]))
    return 0


def run_clora(args: argparse.Namespace) -> int:
    _prepare(args)
    from ..bench.clora import run_clora_bench

    rows = run_clora_bench(lora_counts=args.adapters, latent_hw=(args.latent, args.latent), rank=args.rank,
                           repeats=args.repeats)
    if args.json:
        print(json.dumps([{**asdict(r), "step_ratio": r.step_ratio} for r in rows], indent=1))
    else:
        print(_table(["LoRAs", "base ms", "fused ms", "update ms", "base MiB", "fused MiB", "update MiB",
                      "updated step/base"],
                     [[str(r.loras), f"{r.base_ms:.1f}", f"{r.fused_ms:.1f}", f"{r.update_ms:.1f}",
                       f"{r.base_mib:.1f}", f"{r.fused_mib:.1f}", f"{r.update_mib:.1f}", f"{r.step_ratio:.2f}x"]
                      for r in rows]))
    return 0


def _common(p: argparse.ArgumentParser, adapters: str) -> None:
    p.add_argument("--adapters", type=_ints, default=_ints(adapters), help=f"adapter counts (default {adapters})")
    p.add_argument("--latent", type=int_in(2, 1024), default=32, help="latent side (default 32, i.e. a 256² image)")
    p.add_argument("--rank", type=int_in(1, 4096), default=16, help="LoRA rank (default 16)")
    p.add_argument("--repeats", type=int_in(1, 1000), default=3,
                   help="repeats per cell; medians are reported (default 3)")
    p.add_argument("--threads", type=int_in(0, 1024), default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the pack's location)")


def register_methods(group: argparse._SubParsersAction) -> None:
    p = group.add_parser("compose", help="regional composition vs merged LoRAs, per step (1-8 adapters, 1-4 regions)")
    _common(p, "1,2,4,8")
    p.add_argument("--regions", type=_ints, default=_ints("1,2,3,4"), help="region counts (default 1,2,3,4)")
    p.set_defaults(run=run_compose)
    p = group.add_parser("gates", help="gated vs ungated per-token LoRAs (and switch/composite/learned), per step")
    _common(p, "1,2,4")
    p.set_defaults(run=run_gates)
    p = group.add_parser("clora", help="CLoRA step cost and peak memory vs base for N = 1, 2, 4")
    _common(p, "1,2,4")
    p.set_defaults(run=run_clora)


