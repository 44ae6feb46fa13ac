"""What a library knows about one adapter, merged from the safetensors header and the sidecar files.

Each source yields :class:`AdapterFacts`; :func:`merge_facts` folds them into one :class:`AdapterMetadata`,
preferring user-curated sources (LoRA Manager, rgthree) over civitai over the trainer's header for single
values, and taking the ordered union for lists (trigger words, tags). The header also says which tool wrote the
file and which Flux variant it targets (``composition.formats.provenance``: metadata, key style, ``img_in`` width).
"""
from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..composition.formats.provenance import identify
from ..files.json_text import parse_json
from .header import SafetensorsHeader

logger = logging.getLogger(__name__)

TOP_TAG_FREQUENCIES = 64
_HTML_TAG = re.compile(r"<[^>]+>")
_SPACES = re.compile(r"\s+")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class AdapterFacts:
    """One source's contribution (``source`` names it: ``header``, ``civitai.info``, ``txt`` ...)."""

    source: str
    name: str = ""
    title: str = ""
    description: str = ""
    base_model: str = ""
    trigger_words: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    notes: str = ""
    declared_sha256: str = ""
    output_name: str = ""
    architecture: str = ""
    network_module: str = ""
    network_dim: int | None = None
    network_alpha: float | None = None
    tag_frequency: Mapping[str, int] = field(default_factory=dict)
    has_thumbnail: bool = False
    writer: str = ""
    flux_variant: str = ""


@dataclass(frozen=True)
class AdapterMetadata:
    """Everything indexed about one adapter file besides its location and hashes."""

    name: str
    title: str
    description: str
    base_model: str
    trigger_words: tuple[str, ...]
    tags: tuple[str, ...]
    notes: str
    declared_sha256: str
    output_name: str
    architecture: str
    network_module: str
    network_dim: int | None
    network_alpha: float | None
    tag_frequency: Mapping[str, int]
    has_thumbnail: bool
    preview: str
    sources: tuple[str, ...]
    problems: tuple[str, ...]
    writer: str = ""
    flux_variant: str = ""


def clean_text(text: object) -> str:
    """Plain text from a possibly-HTML description (civitai descriptions are HTML)."""
    if not isinstance(text, str):
        return ""
    return _SPACES.sub(" ", html.unescape(_HTML_TAG.sub(" ", text))).strip()


def split_words(value: object) -> tuple[str, ...]:
    """Trigger words / tags from a comma-separated string or a list of strings (or rgthree ``{"word": ..}``)."""
    items: list[str] = []
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, dict):
                item = item.get("word") or item.get("name") or ""
            if isinstance(item, str):
                items.extend(item.split(","))
    return unique(s.strip() for s in items)


def unique(values: Iterable[str]) -> tuple[str, ...]:
    """Order-preserving case-insensitive de-duplication, dropping empties."""
    seen: set[str] = set()
    kept: list[str] = []
    for value in values:
        key = value.strip().lower()
        if key and key not in seen:
            seen.add(key)
            kept.append(value.strip())
    return tuple(kept)


def normalise_sha256(value: object) -> str:
    """Lower-case 64-hex digest, or ``""`` for anything else (civitai AutoV2 10-hex prefixes included)."""
    if isinstance(value, str):
        token = value.strip().split()[0] if value.strip() else ""
        if _HEX64.match(token):
            return token.lower()
    return ""


def normalise_base_model(value: str) -> str:
    """One spelling per base model family so filters match ``Flux.1 D``, ``flux-1-dev`` and ``FLUX.1 [dev]``."""
    text = value.lower()
    squashed = re.sub(r"[^a-z0-9]+", " ", text).strip()
    words = set(squashed.split())
    if "flux" in text:
        if re.search(r"flux[ .-]?2\b", text):
            return "flux.2"
        if "kontext" in words:
            return "flux.1-kontext"
        if "krea" in words:
            return "flux.1-krea"
        if "fluxdev" in squashed.replace(" ", "") and "schnell" not in words:
            return "flux.1-dev"
        if "schnell" in words or squashed.endswith(" s"):
            return "flux.1-schnell"
        if "dev" in words or squashed.endswith(" d") or "flux 1 d" in squashed:
            return "flux.1-dev"
        return "flux.1"
    if "sdxl" in squashed.replace(" ", "") or "stable diffusion xl" in squashed:
        return "sdxl"
    if re.search(r"\bsd ?1\b|\bsd ?1 ?5\b|\bv1 5\b", squashed):
        return "sd1.5"
    return squashed


def _parse_float(value: str | None) -> float | None:
    """A finite number within what SQLite stores exactly as an integer, else ``None`` (``inf``, ``1e400``)."""
    try:
        number = float(value) if value not in (None, "", "None") else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) and abs(number) < 2 ** 53 else None


def _parse_int(value: str | None) -> int | None:
    number = _parse_float(value)
    return None if number is None else int(number)


def _tag_frequency(path: str, raw: str | None) -> dict[str, int]:
    """``ss_tag_frequency`` is JSON ``{dataset_dir: {tag: count}}``; counts are summed over directories."""
    if not raw:
        return {}
    parsed = parse_json(raw, f"{path}: metadata 'ss_tag_frequency'")
    totals: dict[str, int] = {}
    if isinstance(parsed, dict):
        for tags in parsed.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if (isinstance(count, (int, float)) and not isinstance(count, bool) and math.isfinite(count)
                            and 0 <= count < 2 ** 53 and str(tag).strip()):
                        totals[str(tag).strip()] = totals.get(str(tag).strip(), 0) + int(count)
    top = sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:TOP_TAG_FREQUENCIES]
    return dict(top)


def facts_from_header(header: SafetensorsHeader) -> tuple[AdapterFacts, tuple[str, ...]]:
    """Facts from the header's ``__metadata__`` (kohya ``ss_*`` and ``modelspec.*``) and, from its keys too, the
    tool that wrote it and the Flux variant it targets; plus problems found."""
    meta = header.metadata
    provenance = identify({key: entry.shape for key, entry in header.tensors.items()}, meta)
    problems: list[str] = []
    try:
        frequency = _tag_frequency(header.path, meta.get("ss_tag_frequency"))
    except ValueError as exc:
        problems.append(str(exc))
        frequency = {}
    facts = AdapterFacts(
        source="header",
        name=meta.get("ss_output_name", "").strip(),
        title=meta.get("modelspec.title", "").strip(),
        description=clean_text(meta.get("modelspec.description", "")),
        base_model=meta.get("ss_base_model_version", "").strip() or meta.get("modelspec.architecture", "").strip(),
        trigger_words=split_words(meta.get("modelspec.trigger_phrase", "")),
        tags=split_words(meta.get("modelspec.tags", "")),
        declared_sha256=normalise_sha256(meta.get("modelspec.hash_sha256", "").removeprefix("0x")),
        output_name=meta.get("ss_output_name", "").strip(),
        architecture=meta.get("modelspec.architecture", "").strip(),
        network_module=meta.get("ss_network_module", "").strip(),
        network_dim=_parse_int(meta.get("ss_network_dim")),
        network_alpha=_parse_float(meta.get("ss_network_alpha")),
        tag_frequency=frequency,
        has_thumbnail=bool(meta.get("modelspec.thumbnail", "").strip()),
        writer=provenance.writer,
        flux_variant=provenance.variant or "",
    )
    return facts, tuple(problems)


_PRECEDENCE = ("metadata.json", "rgthree-info.json", "civitai.info", "header", "txt", "sha256")


def merge_facts(fallback_name: str, facts: Iterable[AdapterFacts], preview: str,
                problems: Iterable[str] = ()) -> AdapterMetadata:
    """Fold per-source facts into one record; ``fallback_name`` (the file stem) names unnamed adapters."""
    ordered = sorted(facts, key=lambda f: _PRECEDENCE.index(f.source) if f.source in _PRECEDENCE else 99)

    def first(attr: str) -> object:
        for item in ordered:
            value = getattr(item, attr)
            if value not in ("", None, (), {}, False):
                return value
        return getattr(AdapterFacts(source=""), attr)

    return AdapterMetadata(
        name=str(first("name")) or fallback_name,
        title=str(first("title")),
        description=str(first("description")),
        base_model=str(first("base_model")),
        trigger_words=unique(w for item in ordered for w in item.trigger_words),
        tags=unique(t for item in ordered for t in item.tags),
        notes="\n".join(item.notes for item in ordered if item.notes),
        declared_sha256=str(first("declared_sha256")),
        output_name=str(first("output_name")),
        architecture=str(first("architecture")),
        network_module=str(first("network_module")),
        network_dim=first("network_dim"),  # type: ignore[arg-type]
        network_alpha=first("network_alpha"),  # type: ignore[arg-type]
        tag_frequency=first("tag_frequency"),  # type: ignore[arg-type]
        has_thumbnail=bool(first("has_thumbnail")),
        preview=preview,
        sources=tuple(item.source for item in ordered),
        problems=tuple(problems),
        writer=str(first("writer")),
        flux_variant=str(first("flux_variant")),
    )
