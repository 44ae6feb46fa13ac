"""``loom bench perf``: per-step time and peak memory of every composition method against its FLOP limit.

Registered into the ``bench`` group by :func:`register_perf` (``cli/bench.py`` lists it in ``BENCHMARKS``).
Needs ComfyUI (found like ``loom doctor`` does). Prints the table, writes ``perf.csv`` and ``perf.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from ..arguments import add_force, int_in
from ..files.writing import OutputFileError, check_output

logger = logging.getLogger(__name__)

FULL_SWEEP = dict(adapters=(1, 2, 4, 8, 16), regions=(1, 2, 3, 4), resolutions=(512, 768, 1024))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int_in(1, 65_536)(v) for v in text.replace(",", " ").split())


def _patch_counts(text: str) -> tuple[int, ...]:
    """``--patch-loras``: LoRA counts for the merged patch step, or ``0`` / ``none`` to skip it."""
    return () if text.strip().lower() in ("0", "none") else _ints(text)


def _region_tokens(text: str) -> int:
    """``--region-tokens``: a count >= 0, or ``full`` (= 0: each region prompt as long as ``--prompt-tokens``)."""
    if text.strip().lower() == "full":
        return 0
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a token count or 'full', got {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a token count >= 0 or 'full', got {value}")
    return value


def region_note(prompt_tokens: int, region_length: int) -> str:
    """The title's word on region prompts: Loom regional's are trimmed to ``region_length`` tokens unless that is
    ``prompt_tokens``; the peers' are always full length."""
    if region_length == prompt_tokens:
        return "region prompts untrimmed"
    return f"Loom regional's region prompts trimmed to {region_length} (peers untrimmed)"


def run_perf_command(args: argparse.Namespace) -> int:
    import torch

    from ..comfy_env import find_comfyui, import_comfy

    try:  # before the long run, not after it
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for name in ("perf.csv", "perf.png"):
            check_output(Path(args.out) / name, force=args.force, flag="--out")
    except (OutputFileError, OSError) as exc:
        sys.stderr.write(f"loom bench perf: {exc}\n")
        return 2
    on_gpu = torch.cuda.is_available() and not args.cpu
    import_comfy(find_comfyui(args.comfyui), cpu=not on_gpu, base_directory=tempfile.mkdtemp(prefix="loom-perf-"))

    from ..bench.perf import METHODS, PerfConfig, preset_model, run_perf
    from ..bench.plot import plot_rows
    from ..bench.report import check_goals, format_goals, format_table, write_csv

    model = args.model or ("flux-dev" if on_gpu else "small")
    sweep = dict(FULL_SWEEP) if args.full else {}
    for name in ("adapters", "regions", "resolutions"):
        if getattr(args, name) is not None:
            sweep[name] = getattr(args, name)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = PerfConfig(model=model, rank=args.rank, prompt_tokens=args.prompt_tokens,
                        region_tokens=args.region_tokens, steps=args.steps, repeats=args.repeats,
                        methods=tuple(args.methods or METHODS), dtype=args.dtype, memory=not args.no_memory,
                        **sweep).validate()
    patcher = preset_model(config)
    rows = run_perf(config, patcher, progress=lambda r: logger.info("%s", r))
    device = rows[0].device if rows else "?"
    title = (f"loom bench perf: model {model}, device {device}, rank {args.rank}, {config.prompt_tokens} text "
             f"tokens per prompt, {region_note(config.prompt_tokens, config.region_length)}")
    sys.stdout.write(format_table(rows, title) + "\n")
    sys.stdout.write(format_goals(check_goals(rows, on_gpu)) + "\n")
    if args.patch_loras:
        from ..bench.patching import format_patch_table, run_patch_bench

        with tempfile.TemporaryDirectory(prefix="loom-patch-") as folder:
            patch_rows = run_patch_bench(patcher, Path(folder), args.patch_loras, args.patch_rank,
                                         args.patch_repeats, memory=not args.no_memory)
        sys.stdout.write(format_patch_table(patch_rows, f"merged patch step (ModelPatcher.patch_model), model {model}, "
                                                        f"kohya rank-{args.patch_rank} LoRAs (bf16 factors) on every "
                                                        f"block Linear: Loom LoRA Stack vs core "
                                                        f"load_lora_for_models, median of {args.patch_repeats} "
                                                        f"alternating runs") + "\n")
    out = Path(args.out)
    write_csv(rows, out / "perf.csv")  # both checked before the run (see _check_outputs)
    plot_rows(rows, out / "perf.png")
    sys.stdout.write(f"wrote {out / 'perf.csv'} and {out / 'perf.png'}\n")
    missed = [g for g in check_goals(rows, on_gpu) if g.met is False]
    return 1 if missed and args.strict else 0


def register_perf(group: argparse._SubParsersAction) -> None:
    """Add ``perf`` to the ``loom bench`` group."""
    p = group.add_parser("perf", help="per-step time and peak memory: base, merged, regional, gates, CLoRA and "
                                      "the peers' approaches (hook LoRAs, dense per-head masks, LoRA Composite)")
    p.add_argument("--model", choices=("small", "demo", "flux-dev"),
                   help="random-weight Flux preset (default: flux-dev on a GPU, small on the CPU)")
    p.add_argument("--adapters", type=_ints, help="adapter counts (default 1,4; --full: 1,2,4,8,16)")
    p.add_argument("--regions", type=_ints, help="region counts (default 1,4; --full: 1,2,3,4)")
    p.add_argument("--resolutions", type=_ints, help="square image sizes in pixels (default 256; --full: 512,768,1024)")
    p.add_argument("--full", action="store_true", help="the issue's full sweep")
    p.add_argument("--methods", nargs="+", help="subset of methods to run")
    p.add_argument("--rank", type=int_in(1, 4096), default=16, help="LoRA rank (default 16)")
    p.add_argument("--prompt-tokens", type=int_in(1, 4096), default=77,
                   help="text tokens per prompt (default 77, CLIP-L)")
    p.add_argument("--region-tokens", type=_region_tokens, default=12, metavar="N|full",
                   help="text tokens of each region prompt of Loom's regional method (default 12: a few-word CLIP-L "
                        "region prompt once Loom Compose trims its padding; 0 or 'full' = --prompt-tokens, "
                        "untrimmed); the peers (hooks, CLoRA, dense_per_head) always use --prompt-tokens")
    p.add_argument("--steps", type=int_in(1, 1000), default=4, help="sampler steps per method and repeat (default 4)")
    p.add_argument("--repeats", type=int_in(1, 1000), default=3, help="interleaved repeats per cell (default 3)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int_in(0, 1024), default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the pack's location)")
    p.add_argument("--out", default="bench-perf", help="folder for perf.csv and perf.png (default ./bench-perf)")
    p.add_argument("--patch-loras", type=_patch_counts, default=(1, 4),
                   help="LoRA counts for the merged patch step, Loom vs core (default 1,4; 0 = skip it)")
    p.add_argument("--patch-rank", type=int_in(1, 4096), default=32,
                   help="rank of the patch step's kohya LoRAs (default 32)")
    p.add_argument("--patch-repeats", type=int_in(1, 1000), default=4,
                   help="alternating patch runs per count (default 4)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    add_force(p, "perf.csv / perf.png in --out")
    p.set_defaults(run=run_perf_command)
