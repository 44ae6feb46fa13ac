"""``loom inspect FILE [--json]``: what a LoRA file is, without ComfyUI.

Reports the file format, the tool that wrote it and the Flux variant it targets when the header tells
(``composition.formats.provenance``: trainer metadata, key style, a widened ``img_in``), adapter kinds, every
targeted module with its rank, alpha and target shape, notes on how it was read (an alpha taken from
``lora_adapter_metadata``), leftover keys, the header metadata and the sha256. A LoRA for another model, a
pickle, a corrupt or truncated file exits 1 with a message naming the file.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..composition.adapters import AdapterSet, DoRA
from ..composition.adapters.adapter_set import Adapter
from ..composition.block_weights import FLUX_DOUBLE_BLOCKS, FLUX_SINGLE_BLOCKS
from ..composition.formats.provenance import Provenance, identify
from ..composition.loading import load_adapter_set, read_header

logger = logging.getLogger(__name__)

FLUX1_HIDDEN = 3072
_BLOCK = re.compile(r"^(double|single)_blocks\.(\d+)\.")
# Modules whose weight is [*, hidden]: their column count is the model's hidden size.
_HIDDEN_INPUT = re.compile(r"_attn\.(qkv|proj)$|_mlp\.0$|_mod\.lin$|\.linear1$|modulation\.lin$|out_layer$")


class InspectError(Exception):
    """A file the CLI could not read; the message names the file."""


@dataclass(frozen=True)
class BaseModelGuess:
    """What model a LoRA was made for. ``variant`` is None when the file cannot tell (dev vs schnell share
    every shape), ``variant_evidence`` says what told it; ``hidden_size`` and the block indices come from the
    adapters' target shapes and names."""

    family: str
    variant: str | None
    variant_evidence: str
    evidence: str
    metadata_architecture: str | None
    hidden_size: int | None
    double_blocks_seen: tuple[int, ...]
    single_blocks_seen: tuple[int, ...]
    note: str


@dataclass(frozen=True)
class ModuleReport:
    """One adapter on one module: ``rows`` is ``"start:stop"`` for a slice of a fused weight, else None."""

    module: str
    parameter: str
    kind: str
    rank: int
    alpha: float | None
    target_shape: tuple[int, ...]
    rows: str | None


def guess_base_model(adapter_set: AdapterSet, provenance: Provenance) -> BaseModelGuess:
    """Flux-1 guess for a file that parsed as Flux (foreign files never get here: parsing names their model)."""
    meta = dict(adapter_set.metadata)
    arch = meta.get("modelspec.architecture") or None
    version = meta.get("ss_base_model_version") or None
    doubles: set[int] = set()
    singles: set[int] = set()
    hidden: int | None = None
    for module, adapters in adapter_set.adapters.items():
        match = _BLOCK.match(module)
        if match:
            (doubles if match.group(1) == "double" else singles).add(int(match.group(2)))
        if hidden is None and _HIDDEN_INPUT.search(module):
            weights = [a for a in adapters if a.parameter == "weight"]
            if weights and len(weights[0].target_shape) == 2:
                hidden = int(weights[0].target_shape[1])
    variant = provenance.variant
    evidence = "metadata and key patterns" if (arch or version) else "key patterns"
    notes = []
    if variant is None:
        notes.append("dev or schnell cannot be told from a LoRA (same shapes)")
    if hidden is not None:
        notes.append(f"hidden size {hidden}" + (" (Flux-1 size)" if hidden == FLUX1_HIDDEN else
                                                 " (not Flux-1's 3072: a smaller test or distilled model)"))
    if doubles or singles:
        notes.append(f"blocks up to double {max(doubles, default=-1) + 1} / single {max(singles, default=-1) + 1} "
                     f"of Flux-1's {FLUX_DOUBLE_BLOCKS} / {FLUX_SINGLE_BLOCKS}")
    if max(doubles, default=0) >= FLUX_DOUBLE_BLOCKS or max(singles, default=0) >= FLUX_SINGLE_BLOCKS:
        notes.append("more blocks than Flux-1 has")
    if arch and "flux" not in arch.lower():
        notes.append(f"metadata says {arch!r} but the keys are Flux")
    return BaseModelGuess(family="flux-1", variant=variant, variant_evidence=provenance.variant_evidence,
                          evidence=evidence, metadata_architecture=arch or version,
                          hidden_size=hidden, double_blocks_seen=tuple(sorted(doubles)),
                          single_blocks_seen=tuple(sorted(singles)), note="; ".join(notes))


def _alpha(adapter: Adapter) -> float | None:
    inner = adapter.inner if isinstance(adapter, DoRA) else adapter
    alpha = getattr(inner, "alpha", None)
    return None if alpha is None else float(alpha)


def module_reports(groups: dict[str, tuple[Adapter, ...]]) -> list[ModuleReport]:
    """One row per adapter, sorted by module name then slice start."""
    rows = []
    for module in sorted(groups):
        for a in sorted(groups[module], key=lambda a: (a.parameter, a.offset.start if a.offset else -1)):
            rows.append(ModuleReport(module=module, parameter=a.parameter, kind=type(a).__name__, rank=int(a.rank),
                                     alpha=_alpha(a), target_shape=tuple(int(d) for d in a.target_shape),
                                     rows=None if a.offset is None else f"{a.offset.start}:{a.offset.stop}"))
    return rows


def load_for_cli(path: str) -> AdapterSet:
    """``load_adapter_set`` with every failure turned into an InspectError whose message names the file."""
    file = Path(path)
    if not file.is_file():
        raise InspectError(f"{path}: no such file")
    try:
        return load_adapter_set(file)
    except (ValueError, OSError, RuntimeError) as err:  # UnsafeFileError, HeaderError, NotFluxLoRAError, safetensors
        message = str(err)
        raise InspectError(message if file.name in message else f"{file.name}: {message}") from err


def inspect_report(path: str) -> dict[str, Any]:
    """The JSON-ready report of one file (see the module docstring for the fields)."""
    adapter_set = load_for_cli(path)
    header = read_header(path)
    provenance = identify({k: v.shape for k, v in header.tensors.items()}, header.metadata)
    flux = module_reports(dict(adapter_set.adapters))
    text = module_reports(dict(adapter_set.te_adapters))
    ranks = sorted({r.rank for r in flux + text if r.kind not in ("WeightDiff", "SetWeight")})
    alphas = sorted({r.alpha for r in flux + text if r.alpha is not None})
    return {
        "file": str(path), "sha256": adapter_set.sha256, "format": adapter_set.format,
        "writer": {"tool": provenance.writer or None, "name": provenance.writer_name or None,
                   "evidence": provenance.writer_evidence},
        "base_model": asdict(guess_base_model(adapter_set, provenance)), "kinds": adapter_set.kinds(),
        "ranks": ranks, "alphas": alphas, "modules": [asdict(r) for r in flux],
        "text_encoder_modules": [asdict(r) for r in text], "notes": list(adapter_set.notes),
        "leftover_keys": list(adapter_set.leftovers),
        "metadata": dict(adapter_set.metadata),
    }


def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary and a table of the targeted modules."""
    base = report["base_model"]
    kinds = ", ".join(f"{k} x{n}" for k, n in sorted(report["kinds"].items()))
    variant = f" {base['variant']}" if base["variant"] else ""
    base_line = f"base      {base['family']}{variant} (from {base['evidence']}; {base['note']})"
    writer = report["writer"]
    writer_line = f"writer    {writer['name']} ({writer['evidence']})" if writer["tool"] else "writer    unknown"
    lines = [f"file      {report['file']}", f"sha256    {report['sha256']}", f"format    {report['format']}",
             writer_line, base_line]
    if base["variant"]:
        lines.append(f"variant   {base['variant']} ({base['variant_evidence']})")
    lines += [f"kinds     {kinds}", f"ranks     {report['ranks'] or '-'}   alphas {report['alphas'] or '-'}"]
    lines += [f"note      {note}" for note in report["notes"]] + [""]
    header = ("module", "param", "kind", "rank", "alpha", "rows", "target shape")
    table = [header] + [(r["module"], r["parameter"], r["kind"], str(r["rank"]),
                         "-" if r["alpha"] is None else f"{r['alpha']:g}", r["rows"] or "all",
                         "x".join(map(str, r["target_shape"])))
                        for r in report["modules"] + report["text_encoder_modules"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    leftovers = report["leftover_keys"]
    more = " ..." if len(leftovers) > 10 else ""
    lines += ["", f"leftover keys ({len(leftovers)}): {', '.join(leftovers[:10]) or 'none'}{more}"]
    meta = report["metadata"]
    lines.append(f"metadata ({len(meta)} fields):")
    for key in sorted(meta):
        value = meta[key] if len(meta[key]) <= 100 else meta[key][:97] + "..."
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("inspect", help="describe a LoRA file: format, base model, kinds, modules, ranks")
    p.add_argument("file", help="a .safetensors LoRA")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        report = inspect_report(args.file)
    except InspectError as err:
        sys.stderr.write(f"loom inspect: error: {err}\n")
        return 1
    sys.stdout.write((json.dumps(report, indent=2) if args.json else format_report(report)) + "\n")
    return 0
