"""``Library``: the one object the nodes, the HTTP routes and the CLI use to scan and search adapters.

    library = Library("~/.cache/loom/library.sqlite", ["/ComfyUI/models/loras"])
    report = library.scan(progress=lambda done, total, path: ...)
    hits = library.search("watercolor portrait", top_k=20, filters=SearchFilters(base_model="flux dev"))

Safe to use from several threads (one SQLite connection per thread) and several processes (WAL, busy
timeout, every write in one ``BEGIN IMMEDIATE`` transaction). Only files inside ``roots`` are ever opened.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bounded_cache import BoundedCache
from ..files.folders import OutsideFoldersError, confine
from .scan import ProgressCallback, ScanError, ScanReport, scan_roots, sha256_of
from .search import (
    SEMANTIC_FLOOR,
    Hit,
    SearchFilters,
    allowed_ids,
    browse,
    cosine_ranking,
    fuse,
    group_copies,
    hits_from_rows,
    query_terms,
    row_targets,
    text_ranking,
)
from .store import ConnectionPool, VectorMatrix, generation, load_vectors, store_vectors, write_transaction
from .targets import Targets
from .text_encoders import TextEncoder, adapter_caption
from .weight_encoder import WeightEncoder
from .weight_vectors import SIGNATURE_KIND, WEIGHT_KIND, SignatureSpace, refresh_weight_vectors

logger = logging.getLogger(__name__)

_HEX = re.compile(r"^[0-9a-f]{10,64}$")
PREVIEW_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
TEXT_KIND = "text"


@dataclass(frozen=True)
class AdapterDetails:
    """Everything the index holds about one file (``status`` is ``ok`` or ``error`` with ``error`` text)."""

    root: str
    relpath: str
    path: str
    status: str
    error: str
    sha256: str
    declared_sha256: str
    size: int
    name: str
    title: str
    description: str
    notes: str
    base_model: str
    architecture: str
    output_name: str
    network_module: str
    network_dim: int | None
    network_alpha: float | None
    trigger_words: tuple[str, ...]
    tags: tuple[str, ...]
    tag_frequency: dict[str, int]
    preview: str
    has_thumbnail: bool
    tensor_count: int
    sources: tuple[str, ...]
    problems: tuple[str, ...]
    targets: Targets
    writer: str = ""
    flux_variant: str = ""


@dataclass(frozen=True)
class LibraryStats:
    """Counts over the configured roots."""

    db_path: str
    roots: tuple[str, ...]
    adapters: int
    errors: int
    hashed: int
    by_base_model: dict[str, int]
    by_writer: dict[str, int]
    by_flux_variant: dict[str, int]
    text_vectors: int
    signature_vectors: int
    weight_vectors: int


def _relpath_reference(reference: str) -> str:
    """Normalise a user-given relative path; refuse absolute paths and ``..`` segments."""
    ref = reference.replace("\\", "/").strip()
    if ref.startswith("/") or re.match(r"^[A-Za-z]:", ref) or ".." in ref.split("/"):
        raise ValueError(f"library reference {reference!r} escapes the library roots; pass a path relative "
                         "to a root or a sha256")
    return ref.strip("/")


class Library:
    """An adapter library over ``roots`` indexed in the SQLite file ``db_path``.

    ``text_encoder`` enables semantic search (caption vectors computed at scan time); ``weight_signatures``
    (``True`` for Flux.1, or a :class:`SignatureSpace`) computes training-free weight signatures (reads
    factor tensors, so off by default) for ``like=`` search;
    ``weight_encoder`` (a trained AutoLoRA encoder whose output space is ``text_encoder``'s) enables
    prompt → weight retrieval. ``hash_files=False`` defers SHA-256 until :meth:`resolve` needs it.
    """

    def __init__(self, db_path: str | os.PathLike[str], roots: Sequence[str | os.PathLike[str]], *,
                 text_encoder: TextEncoder | None = None, weight_signatures: bool | SignatureSpace = False,
                 weight_encoder: WeightEncoder | None = None, hash_files: bool = True) -> None:
        self.db_path = os.path.abspath(os.path.expanduser(os.fspath(db_path)))
        self.roots = tuple(dict.fromkeys(os.path.abspath(os.path.expanduser(os.fspath(r))) for r in roots))
        if not self.roots:
            raise ValueError("Library needs at least one root folder")
        self.real_roots = tuple(os.path.realpath(r) for r in self.roots)
        self.text_encoder = text_encoder
        self.signatures = (SignatureSpace() if weight_signatures is True else weight_signatures or None)
        self.weight_encoder = weight_encoder
        if weight_encoder is not None and (text_encoder is None
                                           or weight_encoder.config.text_encoder != text_encoder.name):
            raise ValueError(f"weight_encoder maps into text space {weight_encoder.config.text_encoder!r} but the "
                             f"library's text encoder is {getattr(text_encoder, 'name', None)!r}; pass the "
                             "text encoder it was trained against")
        self.hash_files = hash_files
        self.semantic_floor = SEMANTIC_FLOOR
        self._pool = ConnectionPool(self.db_path)
        self._cache: BoundedCache[tuple[str, str], tuple[int, VectorMatrix]] = BoundedCache(
            "library vectors", max_entries=8, max_bytes=1 << 30, weigh=lambda item: item[1].matrix.nbytes)
        self._pool.get()

    # ----------------------------------------------------------------------------------------------- scan
    def scan(self, progress: ProgressCallback | None = None) -> ScanReport:
        """Index new/changed files, drop vanished ones (and rows of roots not configured here), then fill
        missing vectors. ``progress(done, total, relpath)`` is called after each file (once for all unchanged
        files)."""
        conn = self._pool.get()
        report = scan_roots(conn, self.roots, progress, self.hash_files)
        if self.text_encoder is not None:
            self._refresh_text_vectors()
        if self.signatures is not None or self.weight_encoder is not None:
            refresh_weight_vectors(conn, self.roots, self.real_roots, signatures=self.signatures,
                                   encoder=self.weight_encoder)
        return report

    def _refresh_text_vectors(self, batch: int = 512) -> None:
        conn = self._pool.get()
        encoder = self.text_encoder
        assert encoder is not None
        marks = ",".join("?" * len(self.roots))
        rows = conn.execute(
            f"SELECT a.id, a.name, a.title, a.trigger_words, a.tags, a.tag_frequency, a.description || ' ' || a.notes, "
            f"v.source_key FROM adapters a LEFT JOIN vectors v ON v.adapter_id = a.id AND v.kind = ? "
            f"AND v.model = ? WHERE a.status = 'ok' AND a.root IN ({marks})",
            (TEXT_KIND, encoder.name, *self.roots)).fetchall()
        todo = []
        for adapter_id, name, title, triggers, tags, freq, description, key in rows:
            caption = adapter_caption({"name": name, "title": title, "trigger_words": json.loads(triggers),
                                       "tags": json.loads(tags), "tag_frequency": json.loads(freq),
                                       "description": description})
            if key != caption:
                todo.append((adapter_id, caption))
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            vectors = encoder.encode([c for _, c in chunk]).detach().float().cpu().numpy()
            with write_transaction(conn):
                live = {r[0] for r in conn.execute(
                    f"SELECT id FROM adapters WHERE id IN ({','.join('?' * len(chunk))})", [i for i, _ in chunk])}
                store_vectors(conn, TEXT_KIND, encoder.name,
                              [(i, c, v) for (i, c), v in zip(chunk, vectors) if i in live])

    def _matrix(self, kind: str, model: str) -> VectorMatrix:
        conn = self._pool.get()
        gen = generation(conn)
        cached = self._cache.get((kind, model))
        if cached is not None and cached[0] == gen:
            return cached[1]
        matrix = load_vectors(conn, kind, model, self.roots)
        self._cache.put((kind, model), (gen, matrix))
        return matrix

    # --------------------------------------------------------------------------------------------- search
    def search(self, query: str = "", top_k: int = 20, filters: SearchFilters | None = None,
               like: str | None = None, floor: bool = True) -> list[Hit]:
        """Best ``top_k`` adapters for ``query`` (and/or weights similar to adapter ``like``, a relpath or
        sha256) under ``filters``; byte-identical copies come as one hit (``copies``). An empty query with no
        ``like`` lists adapters by name.

        With ``floor`` (the default) only relevant hits come back: words match without stop words and a hit
        found only by meaning needs a cosine of at least ``semantic_floor``; an empty list means nothing
        matched. ``floor=False`` ranks everything by closeness (stop words included): the "closest" list
        shown when nothing matched."""
        conn = self._pool.get()
        filters = filters or SearchFilters()
        terms = query_terms(query) if floor else query_terms(query, frozenset())
        depth = max(50, top_k * 5)
        rankings: dict[str, list[tuple[int, float]]] = {}
        if terms:
            rankings["text"] = text_ranking(conn, terms, filters, self.roots, depth)
        wants_vectors = bool(like) or (bool(query.strip()) and self.text_encoder is not None)
        allowed = allowed_ids(conn, filters, self.roots) if wants_vectors and filters != SearchFilters() else None
        if query.strip() and self.text_encoder is not None:
            prompt = self.text_encoder.encode([query]).detach().float().cpu().numpy()[0]
            text = self._matrix(TEXT_KIND, self.text_encoder.name)
            least = self.semantic_floor if floor else -1.0
            rankings["semantic"] = [r for r in cosine_ranking(text.ids, text.matrix, prompt, allowed, depth)
                                    if r[1] >= least]
            model = getattr(self.weight_encoder, "name", None)
            if model:
                weights = self._matrix(WEIGHT_KIND, model)
                rankings["weight"] = cosine_ranking(weights.ids, weights.matrix, prompt, allowed, depth)
        if like:
            rankings["like"] = self._like_ranking(like, allowed, depth)
        if not any(rankings.values()):
            if query.strip() or like:
                return []
            fused = [(i, 0.0, ()) for i in browse(conn, filters, self.roots, top_k * 3)]
        else:
            fused = fuse(rankings)[:top_k * 3]
        return group_copies(hits_from_rows(conn, fused, terms))[:top_k]

    def _like_ranking(self, like: str, allowed: np.ndarray | None, depth: int) -> list[tuple[int, float]]:
        row = self._row(like)
        if row is None:
            raise KeyError(f"like={like!r}: no such adapter in the library")
        if self.signatures is None:
            raise ValueError("like= search needs a library built with weight_signatures=True")
        matrix = self._matrix(SIGNATURE_KIND, self.signatures.model)
        where = np.flatnonzero(matrix.ids == row["id"])
        if where.size == 0:
            raise KeyError(f"like={like!r}: the adapter has no weight signature (scan with weight_signatures=True)")
        return cosine_ranking(matrix.ids, matrix.matrix, matrix.matrix[where[0]], allowed, depth,
                              exclude=int(row["id"]))

    # ------------------------------------------------------------------------------------ single adapters
    def _rows(self, where: str, params: Sequence[object]) -> list[dict[str, object]]:
        conn = self._pool.get()
        marks = ",".join("?" * len(self.roots))
        cursor = conn.execute(f"SELECT * FROM adapters WHERE ({where}) AND root IN ({marks})", (*params, *self.roots))
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, r)) for r in cursor.fetchall()]
        rows.sort(key=lambda r: (self.roots.index(str(r["root"])), str(r["relpath"])))
        return rows

    def _row(self, reference: str) -> dict[str, object] | None:
        ref = reference.strip().lower()
        if re.fullmatch(r"[0-9a-f]{64}", ref):
            rows = self._rows("sha256 = ?", (ref,))
        else:
            rows = self._rows("relpath = ?", (_relpath_reference(reference),))
        return rows[0] if rows else None

    def details(self, sha256_or_relpath: str) -> AdapterDetails | None:
        """Everything known about one adapter (by 64-hex sha256 or root-relative path), or ``None``."""
        row = self._row(sha256_or_relpath)
        if row is None:
            return None
        return AdapterDetails(
            root=str(row["root"]), relpath=str(row["relpath"]), path=str(row["path"]), status=str(row["status"]),
            error=str(row["error"]), sha256=str(row["sha256"] or ""), declared_sha256=str(row["declared_sha256"]),
            size=int(row["size"]), name=str(row["name"]), title=str(row["title"]),
            description=str(row["description"]), notes=str(row["notes"]), base_model=str(row["base_model"]),
            architecture=str(row["architecture"]), output_name=str(row["output_name"]),
            network_module=str(row["network_module"]), network_dim=row["network_dim"],  # type: ignore[arg-type]
            network_alpha=row["network_alpha"],  # type: ignore[arg-type]
            trigger_words=tuple(json.loads(str(row["trigger_words"]))), tags=tuple(json.loads(str(row["tags"]))),
            tag_frequency=json.loads(str(row["tag_frequency"])), preview=str(row["preview"]),
            has_thumbnail=bool(row["has_thumbnail"]), tensor_count=int(row["tensor_count"]),
            sources=tuple(json.loads(str(row["sources"]))), problems=tuple(json.loads(str(row["problems"]))),
            targets=row_targets(row), writer=str(row["writer"]), flux_variant=str(row["flux_variant"]))

    def _current_file(self, row: dict[str, object]) -> str | None:
        """The row's path if it is still a safetensors file inside the roots (symlinks resolved), else ``None``."""
        try:
            return confine(str(row["path"]), self.real_roots, what="library file")
        except (OutsideFoldersError, OSError):
            return None

    def _current_sha256(self, row: dict[str, object]) -> str | None:
        """The file's sha256, re-hashed (and stored) when missing or when size/mtime changed since the scan."""
        path = self._current_file(row)
        if path is None:
            return None
        st = os.stat(path)
        if row["sha256"] and st.st_size == row["size"] and st.st_mtime_ns == row["mtime_ns"]:
            return str(row["sha256"])
        digest = sha256_of(path)
        if st.st_size == row["size"] and st.st_mtime_ns == row["mtime_ns"]:
            with write_transaction(self._pool.get()) as conn:
                conn.execute("UPDATE adapters SET sha256 = ? WHERE id = ?", (digest, row["id"]))
        return digest

    def resolve(self, name: str | None, sha256: str | None = None) -> Path | None:
        """The file a workflow means by ``name`` (root-relative) and ``sha256``; ``None`` rather than a guess.

        With a hash (64 hex, or a unique prefix of at least 10 hex such as civitai's AutoV2), only a file with
        that content is returned: same relpath first, then same file name, then any copy. Without a hash, the
        exact relpath, else a file name that is unique in the library.
        """
        wanted = _relpath_reference(name) if name else ""
        base = wanted.rpartition("/")[2]
        if sha256:
            digest = sha256.strip().lower()
            if not _HEX.match(digest):
                raise ValueError(f"resolve: sha256 {sha256!r} is not 10-64 hex digits")
            rows = self._rows("status = 'ok' AND sha256 LIKE ?", (digest + "%",))
            if not self.hash_files:
                rows += self._rows("status = 'ok' AND sha256 IS NULL AND (relpath = ? OR file_name = ?)",
                                   (wanted, base))
            rows.sort(key=lambda r: (r["relpath"] != wanted, r["file_name"] != base))
            matching = [r for r in rows if (self._current_sha256(r) or "").startswith(digest)]
            if len({self._current_sha256(r) for r in matching}) != 1:
                return None
            path = self._current_file(matching[0])
            return Path(path) if path else None
        rows = self._rows("status = 'ok' AND relpath = ?", (wanted,))
        if not rows:
            rows = self._rows("status = 'ok' AND file_name = ?", (base,))
            if len(rows) != 1:
                return None
        path = self._current_file(rows[0])
        return Path(path) if path else None

    def preview_path(self, sha256_or_relpath: str) -> Path | None:
        """The preview image of an adapter, only if it is a file inside the roots."""
        row = self._row(sha256_or_relpath)
        if row is None or not row["preview"]:
            return None
        candidate = os.path.join(os.path.dirname(str(row["path"])), str(row["preview"]))
        try:
            return Path(confine(candidate, self.real_roots, PREVIEW_IMAGE_SUFFIXES, what="preview"))
        except (OutsideFoldersError, OSError):
            return None

    def errors(self) -> list[ScanError]:
        """Files recorded as errors, with their reasons."""
        return [ScanError(str(r["root"]), str(r["relpath"]), str(r["error"]))
                for r in self._rows("status = 'error'", ())]

    def stats(self) -> LibraryStats:
        """Counts of adapters, errors, hashes, base models and vectors under the roots."""
        conn = self._pool.get()
        marks = ",".join("?" * len(self.roots))
        counts = dict(conn.execute(f"SELECT status, COUNT(*) FROM adapters WHERE root IN ({marks}) GROUP BY status",
                                   self.roots).fetchall())
        hashed = conn.execute(f"SELECT COUNT(*) FROM adapters WHERE sha256 IS NOT NULL AND root IN ({marks})",
                              self.roots).fetchone()[0]
        def counts_by(column: str) -> dict[str, int]:
            return dict(conn.execute(f"SELECT {column}, COUNT(*) FROM adapters WHERE status = 'ok' AND root IN "
                                     f"({marks}) GROUP BY {column} ORDER BY 2 DESC, 1", self.roots).fetchall())
        vectors = dict(conn.execute(f"SELECT v.kind, COUNT(*) FROM vectors v JOIN adapters a ON a.id = v.adapter_id "
                                    f"WHERE a.root IN ({marks}) GROUP BY v.kind", self.roots).fetchall())
        return LibraryStats(db_path=self.db_path, roots=self.roots, adapters=counts.get("ok", 0),
                            errors=counts.get("error", 0), hashed=hashed, by_base_model=counts_by("base_family"),
                            by_writer=counts_by("writer"), by_flux_variant=counts_by("flux_variant"),
                            text_vectors=vectors.get(TEXT_KIND, 0), signature_vectors=vectors.get(SIGNATURE_KIND, 0),
                            weight_vectors=vectors.get(WEIGHT_KIND, 0))
