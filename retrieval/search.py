"""Library search: BM25 over FTS5, cosine over stored vectors, reciprocal-rank fusion, and the ``why``.

Each component ranks adapters on its own (``text`` = FTS5 BM25 over names, titles, trigger words, tags, tag
frequencies, descriptions; ``semantic`` = prompt embedding vs caption embeddings; ``weight`` = prompt
embedding vs learned weight embeddings; ``like`` = weight signature of a reference adapter vs all others).
Reciprocal-rank fusion (score = Σ 1/(k + rank)) combines them without calibrating their scales.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .metadata import normalise_base_model
from .store import FIELD_LABELS, FTS_FIELDS
from .targets import Targets

logger = logging.getLogger(__name__)

RRF_K = 60
# The relevance floor: a hit found only by meaning needs at least this cosine between the query and its caption
# (chosen on a tuning set of queries by `loom bench library --floor`, see bench/library.py: floor_study).
SEMANTIC_FLOOR = 0.25
# Words that carry no subject: they neither match a LoRA on their own nor count as a reason it matched.
STOP_WORDS = frozenset("a an and are as at be by for from in into is it of on or the to with".split())
BM25_WEIGHTS = {"name": 4.0, "title": 3.0, "fts_triggers": 3.0, "fts_tags": 2.0, "fts_tag_freq": 1.0,
                "fts_description": 0.5}
_TERM = re.compile(r"[^\W_]+", re.UNICODE)


@dataclass(frozen=True)
class SearchFilters:
    """Restrictions applied to every component. ``folder`` is relative to a root (``"styles/anime"``) and
    includes its sub-folders; tags compare case-insensitively; ``base_model`` compares by family; ``writer``
    (``kohya``, ``ai-toolkit``, ...) and ``flux_variant`` (``dev``, ``fill``, ``kontext``, ...) compare exactly
    with what the header told (``composition.formats.provenance``)."""

    base_model: str = ""
    folder: str = ""
    tags_include: tuple[str, ...] = ()
    tags_exclude: tuple[str, ...] = ()
    writer: str = ""
    flux_variant: str = ""


@dataclass(frozen=True)
class FieldMatch:
    """Query terms found (as words or word prefixes) in one field of the hit."""

    field: str
    terms: tuple[str, ...]


@dataclass(frozen=True)
class ScoreComponent:
    """One ranking that placed the hit: ``source`` (text / semantic / weight / like), 1-based ``rank`` and
    its raw ``score`` (BM25 is reported positive: larger is better; cosines are in [-1, 1])."""

    source: str
    rank: int
    score: float


@dataclass(frozen=True)
class Why:
    """Why a hit is there: matched fields/terms and the contributing score components."""

    fields: tuple[FieldMatch, ...]
    components: tuple[ScoreComponent, ...]


@dataclass(frozen=True)
class Hit:
    """One search result. ``relpath`` is relative to ``root`` (what ComfyUI's LoRA list shows)."""

    adapter_id: int
    root: str
    relpath: str
    path: str
    name: str
    title: str
    base_model: str
    sha256: str
    writer: str
    flux_variant: str
    trigger_words: tuple[str, ...]
    tags: tuple[str, ...]
    preview: str
    score: float
    why: Why
    copies: tuple[str, ...] = ()
    targets: Targets = Targets()


def row_targets(row: Mapping[str, object] | sqlite3.Row) -> Targets:
    """What an index row's LoRA targets (its ``target_*`` columns)."""
    hidden = row["target_hidden"]
    return Targets(architecture=str(row["target_arch"] or ""), hidden=None if hidden is None else int(hidden),
                   double_blocks=int(row["target_double"] or 0), single_blocks=int(row["target_single"] or 0))


def query_terms(query: str, stop_words: frozenset[str] = STOP_WORDS) -> tuple[str, ...]:
    """Lower-case word terms of a query (the FTS tokenizer's notion of a word), without ``stop_words``."""
    return tuple(dict.fromkeys(t for t in (w.lower() for w in _TERM.findall(query)) if t not in stop_words))


def filter_sql(filters: SearchFilters, roots: Sequence[str]) -> tuple[str, list[object]]:
    """A WHERE fragment over alias ``a`` (ok rows under ``roots`` passing ``filters``) and its parameters."""
    clauses = ["a.status = 'ok'", f"a.root IN ({','.join('?' * len(roots))})"]
    params: list[object] = list(roots)
    if filters.base_model:
        # a variant (flux.1-dev) also matches LoRAs labelled with the bare family (flux1, "Flux.1"); the bare
        # family matches every variant
        family = normalise_base_model(filters.base_model)
        general = family.split("-")[0]
        clauses.append("(a.base_family IN (?, ?) OR a.base_family LIKE ? ESCAPE '\\')")
        params += [family, general, family.replace("_", "\\_").replace("%", "\\%") + "-%"]
    for column, value in (("writer", filters.writer), ("flux_variant", filters.flux_variant)):
        if value.strip():
            clauses.append(f"a.{column} = ?")
            params.append(value.strip().lower())
    folder = filters.folder.strip("/").replace("\\", "/")
    if folder:
        escaped = folder.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        clauses.append("(a.folder = ? OR a.folder LIKE ? ESCAPE '\\')")
        params += [folder, escaped + "/%"]
    include = sorted({t.strip().lower() for t in filters.tags_include if t.strip()})
    if include:
        clauses.append(f"a.id IN (SELECT adapter_id FROM adapter_tags WHERE tag IN ({','.join('?' * len(include))}) "
                       "GROUP BY adapter_id HAVING COUNT(*) = ?)")
        params += [*include, len(include)]
    exclude = sorted({t.strip().lower() for t in filters.tags_exclude if t.strip()})
    if exclude:
        marks = ",".join("?" * len(exclude))
        clauses.append(f"a.id NOT IN (SELECT adapter_id FROM adapter_tags WHERE tag IN ({marks}))")
        params += exclude
    return " AND ".join(clauses), params


def text_ranking(conn: sqlite3.Connection, terms: Sequence[str], filters: SearchFilters, roots: Sequence[str],
                 limit: int) -> list[tuple[int, float]]:
    """``(adapter_id, bm25)`` best first; every term is matched as a word prefix and terms are OR-ed."""
    if not terms:
        return []
    where, params = filter_sql(filters, roots)
    match = " OR ".join(f'"{t}"*' for t in terms)
    weights = ", ".join(str(BM25_WEIGHTS[f]) for f in FTS_FIELDS)
    rows = conn.execute(
        f"SELECT a.id, -bm25(adapters_fts, {weights}) AS s FROM adapters_fts JOIN adapters a "
        f"ON a.id = adapters_fts.rowid WHERE adapters_fts MATCH ? AND {where} ORDER BY s DESC, a.relpath LIMIT ?",
        (match, *params, limit)).fetchall()
    return [(int(r[0]), float(r[1])) for r in rows]


def allowed_ids(conn: sqlite3.Connection, filters: SearchFilters, roots: Sequence[str]) -> np.ndarray:
    """Ids passing ``filters`` (``[M]`` int64), for masking vector rankings."""
    where, params = filter_sql(filters, roots)
    return np.array([r[0] for r in conn.execute(f"SELECT a.id FROM adapters a WHERE {where}", params)],
                    dtype=np.int64)


def cosine_ranking(ids: np.ndarray, matrix: np.ndarray, query: np.ndarray, allowed: np.ndarray | None,
                   limit: int, exclude: int | None = None) -> list[tuple[int, float]]:
    """Brute-force cosine of ``query`` [D] against unit rows ``matrix`` [N, D]; ``(id, cosine)`` best first."""
    if ids.size == 0 or matrix.shape[1] != query.shape[0]:
        return []
    # einsum's own loop, not BLAS: a threaded gemv waits on worker wake-ups (ms of jitter on a busy machine)
    scores = np.einsum("nd,d->n", matrix, query.astype(np.float32, copy=False))
    keep = np.ones(ids.shape[0], dtype=bool) if allowed is None else np.isin(ids, allowed)
    if exclude is not None:
        keep &= ids != exclude
    candidates = np.flatnonzero(keep)
    if candidates.size == 0:
        return []
    top = candidates[np.argsort(-scores[candidates], kind="stable")[:limit]]
    return [(int(ids[i]), float(scores[i])) for i in top]


def fuse(rankings: dict[str, list[tuple[int, float]]],
         k: int = RRF_K) -> list[tuple[int, float, tuple[ScoreComponent, ...]]]:
    """Reciprocal-rank fusion: ``(id, Σ 1/(k + rank), components)`` best first (ties by id)."""
    totals: dict[int, float] = {}
    parts: dict[int, list[ScoreComponent]] = {}
    for source, ranking in rankings.items():
        for rank, (adapter_id, score) in enumerate(ranking, start=1):
            totals[adapter_id] = totals.get(adapter_id, 0.0) + 1.0 / (k + rank)
            parts.setdefault(adapter_id, []).append(ScoreComponent(source=source, rank=rank, score=score))
    order = sorted(totals, key=lambda i: (-totals[i], i))
    return [(i, totals[i], tuple(parts[i])) for i in order]


def field_matches(row: sqlite3.Row, terms: Sequence[str]) -> tuple[FieldMatch, ...]:
    """Which query terms occur as words or word prefixes in which fields of ``row``."""
    matches = []
    for column in FTS_FIELDS:
        words = {w.lower() for w in _TERM.findall(row[column] or "")}
        hit = tuple(t for t in terms if any(w.startswith(t) for w in words))
        if hit:
            matches.append(FieldMatch(field=FIELD_LABELS[column], terms=hit))
    return tuple(matches)


def hits_from_rows(conn: sqlite3.Connection, fused: Sequence[tuple[int, float, tuple[ScoreComponent, ...]]],
                   terms: Sequence[str]) -> list[Hit]:
    """Materialise fused ids into :class:`Hit` objects (one query for all rows)."""
    if not fused:
        return []
    conn.row_factory = sqlite3.Row
    try:
        ids = [f[0] for f in fused]
        rows = {r["id"]: r for r in conn.execute(
            f"SELECT * FROM adapters WHERE id IN ({','.join('?' * len(ids))})", ids)}
    finally:
        conn.row_factory = None
    hits = []
    for adapter_id, score, components in fused:
        row = rows.get(adapter_id)
        if row is None:  # deleted by a concurrent scan between ranking and fetching
            continue
        hits.append(Hit(adapter_id=adapter_id, root=row["root"], relpath=row["relpath"], path=row["path"],
                        name=row["name"], title=row["title"], base_model=row["base_model"],
                        sha256=row["sha256"] or "", writer=row["writer"], flux_variant=row["flux_variant"],
                        trigger_words=tuple(json.loads(row["trigger_words"])),
                        tags=tuple(json.loads(row["tags"])), preview=row["preview"], score=score,
                        why=Why(fields=field_matches(row, terms), components=components), targets=row_targets(row)))
    return hits


def group_copies(hits: Sequence[Hit]) -> list[Hit]:
    """One hit per file content: later hits with the same sha256 (byte-identical copies) are folded into the
    first as ``copies`` (their relpaths), so a library with duplicates shows one card per LoRA."""
    first: dict[str, int] = {}
    grouped: list[Hit] = []
    for hit in hits:
        if hit.sha256 and hit.sha256 in first:
            keeper = grouped[first[hit.sha256]]
            grouped[first[hit.sha256]] = dataclasses.replace(keeper, copies=(*keeper.copies, hit.relpath))
            continue
        if hit.sha256:
            first[hit.sha256] = len(grouped)
        grouped.append(hit)
    return grouped


def browse(conn: sqlite3.Connection, filters: SearchFilters, roots: Sequence[str], limit: int) -> list[int]:
    """Ids passing ``filters`` by name, for an empty query."""
    where, params = filter_sql(filters, roots)
    return [r[0] for r in conn.execute(
        f"SELECT a.id FROM adapters a WHERE {where} ORDER BY lower(a.name), a.relpath LIMIT ?", (*params, limit))]
