"""Library results in the user's words: search hits with why they matched, scan reports and statistics, as
text lines (node output, CLI) and as JSON-ready dicts (HTTP routes, ``--json``). No paths outside the roots'
relative names are put into JSON; absolute paths appear only where the caller asks for them."""
from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from .library import AdapterDetails, LibraryStats
from .scan import ScanReport
from .search import Hit, ScoreComponent, Why

logger = logging.getLogger(__name__)

SOURCE_LABELS = {"text": "words", "semantic": "meaning", "weight": "weights vs prompt", "like": "similar weights"}


def describe_component(component: ScoreComponent) -> str:
    """``words (bm25 3.20)`` / ``meaning (cos 0.41)``: the score that placed the hit, without the component's
    own rank (a list shows its own order; a second, different number beside it only misleads)."""
    label = SOURCE_LABELS.get(component.source, component.source)
    measure = "bm25" if component.source == "text" else "cos"
    return f"{label} ({measure} {component.score:.2f})"


def describe_why(why: Why) -> str:
    """One line: the matched fields and terms, then every ranking that placed the hit."""
    parts = [f"{m.field}: {', '.join(m.terms)}" for m in why.fields]
    ranked = "; ".join(describe_component(c) for c in why.components)
    if parts and ranked:
        return f"matched {'; '.join(parts)} | ranked by {ranked}"
    if parts:
        return f"matched {'; '.join(parts)}"
    return f"ranked by {ranked}" if ranked else "listed (no query)"


def hits_text(hits: list[Hit], query: str = "") -> str:
    """Numbered hits, each with its file, score, sha256 prefix, trigger words and why (node STRING output)."""
    if not hits:
        return f"no LoRA in the library matches {query!r}" if query else "the library is empty"
    lines = []
    for n, hit in enumerate(hits, start=1):
        title = f" — {hit.title}" if hit.title and hit.title != hit.name else ""
        lines.append(f"{n}. {hit.relpath}{title}  (score {hit.score:.4f}, sha256 {hit.sha256[:12] or '?'})")
        if hit.trigger_words:
            lines.append(f"   trigger words: {', '.join(hit.trigger_words)}")
        lines.append(f"   why: {describe_why(hit.why)}")
    return "\n".join(lines)


def why_json(why: Why) -> dict[str, Any]:
    """``{"fields": [{"field", "terms"}], "components": [{"source", "rank", "score"}], "text": ...}``."""
    return {"fields": [{"field": m.field, "terms": list(m.terms)} for m in why.fields],
            "components": [{"source": c.source, "rank": c.rank, "score": c.score} for c in why.components],
            "text": describe_why(why)}


def hit_json(hit: Hit, preview_url: str | None = None) -> dict[str, Any]:
    """A hit for the web panel / ``--json``: ``lora`` is the name ComfyUI's loras list uses."""
    return {"lora": hit.relpath, "name": hit.name, "title": hit.title, "base_model": hit.base_model,
            "writer": hit.writer, "flux_variant": hit.flux_variant, "sha256": hit.sha256,
            "trigger_words": list(hit.trigger_words), "tags": list(hit.tags),
            "score": hit.score, "preview": preview_url, "why": why_json(hit.why), "copies": list(hit.copies),
            "targets": hit.targets.describe()}


def details_json(details: AdapterDetails, preview_url: str | None = None) -> dict[str, Any]:
    """Everything the index holds about one adapter, without its absolute path or root."""
    out = asdict(details)
    for private in ("path", "root"):
        out.pop(private)
    out["lora"] = out.pop("relpath")
    out["targets"] = details.targets.describe()
    out["preview_url"] = preview_url
    out["indexed"] = True
    return out


def scan_report_json(report: ScanReport) -> dict[str, Any]:
    """A scan's counts, errors (relative paths and reasons) and duration."""
    return {"total": report.total, "added": report.added, "updated": report.updated, "unchanged": report.unchanged,
            "removed": report.removed, "headers_read": report.headers_read, "hashed": report.hashed,
            "seconds": round(report.seconds, 3),
            "errors": [{"lora": e.relpath, "reason": e.reason} for e in report.errors]}


def scan_report_text(report: ScanReport) -> str:
    """``1200 files: 3 added, 1 updated, ... in 0.41 s`` plus one line per error."""
    lines = [(f"{report.total} files: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
              f"{report.removed} removed, {len(report.errors)} errors ({report.headers_read} headers read, "
              f"{report.hashed} hashed) in {report.seconds:.2f} s")]
    lines += [f"  error {e.relpath}: {e.reason}" for e in report.errors]
    return "\n".join(lines)


def stats_json(stats: LibraryStats) -> dict[str, Any]:
    """Counts over the roots, as a dict."""
    return asdict(stats)


def stats_text(stats: LibraryStats) -> str:
    """Counts over the roots, one fact per line."""
    lines = [f"index      {stats.db_path}", *(f"root       {r}" for r in stats.roots),
             f"adapters   {stats.adapters} ({stats.errors} errors, {stats.hashed} hashed)",
             (f"vectors    text {stats.text_vectors}, signature {stats.signature_vectors}, "
              f"weight {stats.weight_vectors}")]
    for title, counts in (("base model", stats.by_base_model), ("written by", stats.by_writer),
                          ("flux variant", stats.by_flux_variant)):
        lines.append(f"{title}:")
        lines += [f"  {value or 'unknown':<22} {count}" for value, count in counts.items()]
    return "\n".join(lines)
