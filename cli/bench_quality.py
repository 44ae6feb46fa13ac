"""``loom bench quality``: ground-truth composition quality of every method on the playground world.

Registered into the ``bench`` group by :func:`register_quality` (``cli/bench.py`` lists it in ``BENCHMARKS``).
Needs ComfyUI (found like ``loom doctor`` does) and runs on the CPU. Prints the table (method | images | present |
vanished | confused | leakage | s/image) and which methods place fewer wanted objects than the naive merged
baseline; ``--grid`` saves the first seed's images (cases x methods), ``--csv`` the rows.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..arguments import SEED_MAX, add_force, float_in, int_in
from ..files.writing import OutputFileError, check_output, replaced_atomically

if TYPE_CHECKING:
    from ..bench.quality import QualityReport, QualityRow

logger = logging.getLogger(__name__)


def _names(text: str) -> tuple[str, ...]:
    return tuple(v for v in text.replace(",", " ").split() if v)


def _settings(text: str) -> tuple[tuple[str, object], ...]:
    """``"base_ratio=0,injection=false"`` -> ``(("base_ratio", 0.0), ("injection", False))``: numbers, booleans
    (true/false) or text."""
    pairs = []
    for item in _names(text):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{item!r}: write name=value, e.g. base_ratio=0")
        lowered = raw.lower()
        if lowered in ("true", "false"):
            value: object = lowered == "true"
        else:
            try:
                value = int(raw) if raw.lstrip("-").isdigit() else float(raw)
            except ValueError:
                value = raw
        pairs.append((key, value))
    return tuple(pairs)


def _aligned(header: list[str], lines: list[list[str]]) -> list[str]:
    """Header, rule and ``lines`` as text lines: the first column left-aligned, the others right-aligned."""
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(header)]

    def show(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [show(header), show(["-" * w for w in widths]), *(show(line) for line in lines)]


def format_quality_table(rows: Sequence[QualityRow]) -> str:
    """The rows as an aligned text table; a failed method shows dashes, its error is listed under the table."""
    header = ["method", "images", "present", "clean", "vanished", "confused", "leakage", "s/image"]
    lines = []
    for r in rows:
        if r.error:
            lines.append([r.method, "0", "-", "-", "-", "-", "-", "failed"])
        else:
            lines.append([r.method, str(r.images), f"{r.presence:.2f}", f"{r.clean:.2f}", f"{r.vanishing:.2f}",
                          f"{r.confusion:.2f}", f"{r.leakage:.3f}", f"{r.seconds_per_image:.2f}"])
    errors = [f"{r.method} failed: {r.error}" for r in rows if r.error]
    return "\n".join([*_aligned(header, lines), *errors])


GROUPS = {"interfering": lambda case: case.interfering, "non-interfering": lambda case: not case.interfering}


def format_group_table(report: QualityReport) -> str:
    """Presence / clean / vanished / confused per method (rows) for each group of cases present in the report:
    each split, and within it the interfering and the non-interfering cases."""
    cases = report.config.selected_cases()
    splits = [s for s in ("heldout", "tune") if any(c.split == s for c in cases)]
    groups = [(f"{split} {name}", lambda c, s=split, k=keep: c.split == s and k(c))
              for split in splits for name, keep in GROUPS.items()]
    groups = [(label, keep) for label, keep in groups if any(keep(c) for c in cases)]
    header = ["present / clean / vanished / confused", *(label for label, _ in groups)]
    lines = []
    for method in report.scores:
        cells = []
        for _, keep in groups:
            r = report.rates(method, keep)
            cells.append(f"{r.presence:.2f} {r.clean:.2f} {r.vanishing:.2f} {r.confusion:.2f}")
        lines.append([method, *cells])
    return "\n".join(_aligned(header, lines))


def format_concept_table(table: dict[str, dict[str, float]]) -> str:
    """Vanishing rate per method (rows) and concept (columns)."""
    concepts = sorted({name for row in table.values() for name in row})
    header = ["vanished per concept", *concepts]
    lines = [[method, *(f"{row[c]:.2f}" if c in row else "-" for c in concepts)] for method, row in table.items()]
    return "\n".join(_aligned(header, lines))


def write_quality_csv(rows: Sequence[QualityRow], path: Path) -> Path:
    """One line per method with every field of the row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(rows[0])] if rows else []
    with replaced_atomically(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({n: getattr(row, n) for n in names})
    return path


def run_quality_command(args: argparse.Namespace) -> int:
    from ..comfy_env import find_comfyui, import_comfy

    try:  # before the long run, not after it
        for flag in ("csv", "grid"):
            if getattr(args, flag):
                Path(getattr(args, flag)).parent.mkdir(parents=True, exist_ok=True)
                check_output(getattr(args, flag), force=args.force, flag=f"--{flag}")
    except OutputFileError as exc:
        sys.stderr.write(f"loom bench quality: {exc}\n")
        return 2

    import_comfy(find_comfyui(args.comfyui), cpu=True, base_directory=tempfile.mkdtemp(prefix="loom-quality-"))
    import torch

    from ..playground.scoring import SEED_BASE

    if args.threads:
        torch.set_num_threads(args.threads)
    from ..bench.quality import (
        BASELINE,
        METHODS,
        QualityConfig,
        QualityError,
        concept_vanishing,
        grid_image,
        run_quality,
    )

    config = QualityConfig(cases=args.cases or (), split=args.split, seeds=args.seeds, first_seed=args.first_seed,
                           steps=args.steps, cfg=args.cfg, methods=args.methods or METHODS,
                           compose=args.compose or (), clora=args.clora or (), clora_words=args.clora_words)
    try:
        report = run_quality(config.validate(), progress=lambda line: logger.info("%s", line))
    except QualityError as exc:
        sys.stderr.write(f"loom bench quality: {exc}\n")
        return 2
    rows = list(report.rows)
    if args.json:
        sys.stdout.write(report.to_json() + "\n")
    else:
        title = (f"loom bench quality: split {config.split}, {len(config.selected_cases())} cases x {config.seeds} "
                 f"seeds (tune from {SEED_BASE['tune'] + config.first_seed}, heldout from "
                 f"{SEED_BASE['heldout'] + config.first_seed}), {config.steps} steps {config.sampler}/"
                 f"{config.scheduler}, cfg {config.cfg}, {config.size}x{config.size}")
        sys.stdout.write(f"{title}\n{format_quality_table(rows)}\n\n{format_group_table(report)}\n\n"
                         f"{format_concept_table(concept_vanishing(report))}\n")
        below = report.below_baseline()
        if below:
            sys.stdout.write(f"below the naive {BASELINE} baseline on presence: {', '.join(below)}\n")
        elif any(r.method == BASELINE and not r.error for r in rows):
            sys.stdout.write(f"no method below the naive {BASELINE} baseline on presence\n")
    written = []
    if args.csv:
        written.append(write_quality_csv(rows, Path(args.csv)))
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(args.grid) as temporary:
            grid_image(report).save(temporary, format="PNG")
        written.append(Path(args.grid))
    if written and not args.json:
        sys.stdout.write(f"wrote {' and '.join(str(p) for p in written)}\n")
    failed = [r.method for r in rows if r.error]
    if failed:
        sys.stderr.write(f"loom bench quality: method(s) failed: {', '.join(failed)}\n")
    return 1 if failed else 0


def register_quality(group: argparse._SubParsersAction) -> None:
    """Add ``quality`` to the ``loom bench`` group."""
    p = group.add_parser("quality", help="composition quality on the playground world, scored by its exact "
                                         "detector: presence, vanishing, confusion, leakage per method")
    p.add_argument("--split", choices=("tune", "heldout", "all"), default="all",
                   help="cases to run: tune (defaults may be chosen on it), heldout (never), or all (default)")
    p.add_argument("--seeds", type=int_in(1, 10_000), default=4, help="seeds per case (default 4)")
    p.add_argument("--first-seed", type=int_in(0, SEED_MAX), default=0,
                   help="offset added to each split's first seed (tune 0, heldout 1000; default 0)")
    p.add_argument("--steps", type=int_in(1, 10_000), default=20, help="sampler steps (default 20)")
    p.add_argument("--cfg", type=float_in(0.0, 100.0), default=3.0, help="classifier-free guidance scale (default 3.0)")
    p.add_argument("--cases", type=_names,
                   help="subset of the split's cases by name, e.g. 'star-ring/red-green' (default all)")
    p.add_argument("--methods", type=_names, help="subset of methods, e.g. 'base,merged,regional' (default all)")
    p.add_argument("--compose", type=_settings,
                   help="override Loom Compose inputs for the regional methods (ablations), e.g. 'base_ratio=0,"
                        "latent_reinit=false'")
    p.add_argument("--clora", type=_settings, help="override Loom CLoRA inputs, e.g. 'update_end_percent=0'")
    p.add_argument("--clora-words", choices=("subject", "trigger"), default="subject",
                   help="name each CLoRA concept by its object's words ('red toy', default) or its trigger ('toy')")
    p.add_argument("--threads", type=int_in(0, 1024), default=0, help="torch CPU threads (default: torch's)")
    add_force(p, "--csv / --grid files")
    p.add_argument("--grid", help="save the first seed's images (cases x methods) as this PNG")
    p.add_argument("--csv", help="write the rows to this CSV file")
    p.add_argument("--json", action="store_true", help="print the config and rows as JSON")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the pack's location)")
    p.set_defaults(run=run_quality_command)
