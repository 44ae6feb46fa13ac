"""``loom bench ...``: measurements against the issue goals. ``bench`` is a group: each benchmark registers
itself in :func:`register` (``loom bench library`` here; add ``compose`` etc. with their own function)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

from ..arguments import SEED_MAX, int_in

logger = logging.getLogger(__name__)


def run_library(args: argparse.Namespace) -> int:
    from ..bench.library import floor_study, format_table, run_benchmark

    if args.floor:
        chosen, rows = floor_study(count=min(args.count, 600), seed=args.seed)
        sys.stdout.write(f"relevance floor chosen on the tuning queries: {chosen:.2f}\n" + format_table(rows) + "\n")
        return 0

    rows = run_benchmark(count=args.count, folder=args.folder, queries=args.queries, seed=args.seed)
    sys.stdout.write((json.dumps([asdict(r) for r in rows], indent=1) if args.json else format_table(rows)) + "\n")
    missed = [r.metric for r in rows if r.met is False]
    if missed:
        sys.stderr.write(f"loom bench library: goal not met: {', '.join(missed)}\n")
    return 1 if missed and args.strict else 0


def register_library(group: argparse._SubParsersAction) -> None:
    p = group.add_parser("library", help="index N generated LoRA files; scan rate, rescan time, search latency")
    p.add_argument("--count", type=int_in(1, 10_000_000), default=10_000, help="files to generate (default 10000)")
    p.add_argument("--queries", type=int_in(1, 1_000_000), default=200,
                   help="search queries timed per mode (default 200)")
    p.add_argument("--folder", help="generate the files here instead of a temporary folder")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0, help="generator seed")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is not met")
    p.add_argument("--floor", action="store_true", help="choose the search relevance floor on tuning queries and "
                   "report it on held-out queries (at most 600 files)")
    p.set_defaults(run=run_library)


from .bench_methods import register_methods  # noqa: E402  (loom bench compose | gates | clora)
from .bench_perf import register_perf  # noqa: E402  (loom bench perf)
from .bench_quality import register_quality  # noqa: E402  (loom bench quality)
from .bench_soak import register_soak  # noqa: E402  (loom bench soak)

BENCHMARKS = (register_library, register_methods, register_perf, register_quality, register_soak)


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", help="benchmarks (loom bench library | compose | gates | clora | perf | quality "
                                          "| soak)")
    group = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for add in BENCHMARKS:
        add(group)
