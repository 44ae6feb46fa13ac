"""``loom bench soak``: one real ComfyUI server queued the same workflow 20+ times and made to load 200 LoRAs
through Loom Library Search; its RSS after warm-up is checked against a stated bound and printed as a table
(:mod:`lora_loom.bench.soak`). Needs ComfyUI (found like ``loom doctor``)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..arguments import float_in, int_in

logger = logging.getLogger(__name__)


def run_soak_command(args: argparse.Namespace) -> int:
    from ..bench.soak import SoakConfig, format_report, run_soak
    from ..comfy_env import ComfyNotFound, find_comfyui

    try:
        comfyui = find_comfyui(args.comfyui)
        config = SoakConfig(runs=args.runs, loras=args.loras, group=args.group, lora_mib=args.lora_mib,
                            cache_mib=args.cache_mib, steps=args.steps).validate()
    except (ComfyNotFound, ValueError) as exc:
        sys.stderr.write(f"loom bench soak: {exc}\n")
        return 2
    keep = Path(args.keep) if args.keep else None
    if keep is not None and keep.exists():
        sys.stderr.write(f"loom bench soak: --keep {keep} already exists; give a new folder\n")
        return 2
    try:
        report = run_soak(config, comfyui, progress=lambda line: logger.info("%s", line), keep=keep)
    except (RuntimeError, TimeoutError, OSError) as exc:  # the server failed a prompt, or did not start
        sys.stderr.write(f"loom bench soak: {str(exc)[:4000]}\n")
        return 1
    sys.stdout.write(format_report(report) + "\n")
    return 1 if args.strict and not report.met else 0


def register_soak(group: argparse._SubParsersAction) -> None:
    """Add ``soak`` to the ``loom bench`` group."""
    p = group.add_parser("soak", help="one server: the same workflow 20+ times and 200 LoRAs through Library "
                                      "Search; RSS after warm-up against a stated bound")
    p.add_argument("--runs", type=int_in(3, 10_000), default=24, help="workflow runs (default 24)")
    p.add_argument("--loras", type=int_in(1, 100_000), default=200, help="LoRAs loaded through Library Search "
                                                                         "(default 200)")
    p.add_argument("--group", type=int_in(1, 50), default=25, help="LoRAs per Library Search prompt (default 25)")
    p.add_argument("--lora-mib", type=float_in(0.05, 64.0), default=1.5, help="size of each LoRA (default 1.5)")
    p.add_argument("--cache-mib", type=int_in(1, 1 << 20), default=96,
                   help="the server's adapter cache bound, LOOM_ADAPTER_CACHE_MB (default 96)")
    p.add_argument("--steps", type=int_in(1, 100), default=4, help="sampler steps per workflow run (default 4)")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the pack's location)")
    p.add_argument("--keep", help="build the server's base directory here and keep it (logs, files)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the bound is not met")
    p.set_defaults(run=run_soak_command)
