"""The SQLite index: schema, connections (WAL, busy timeout, foreign keys), FTS5 check, row writes.

One row per adapter file in ``adapters``; FTS5 (``adapters_fts``, external content, kept in step by triggers
inside the same transaction) indexes names, titles, trigger words, tags, tag frequencies and descriptions;
``adapter_tags`` serves include/exclude filters; ``vectors`` holds float32 embeddings (text, weight
signature, learned weight embedding) that cascade away with their adapter. Every write transaction bumps
``library_state.generation`` so readers can cache vector matrices safely across threads and processes.

Schema versions (``PRAGMA user_version``, upgrades in :data:`_MIGRATIONS`): 1 the first index; 2 what each LoRA
targets (``target_*``); 3 ``writer`` (the tool that wrote the file: kohya, ai-toolkit, onetrainer, ...) and
``flux_variant`` (dev, schnell, fill, canny-or-depth, kontext, krea, ...; ``composition.formats.provenance``).
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3
BUSY_TIMEOUT_MS = 60_000
FTS_FIELDS = ("name", "title", "fts_triggers", "fts_tags", "fts_tag_freq", "fts_description")
FIELD_LABELS = {"name": "name", "title": "title", "fts_triggers": "trigger words", "fts_tags": "tags",
                "fts_tag_freq": "tag frequency", "fts_description": "description"}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS adapters (
  id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, root TEXT NOT NULL, relpath TEXT NOT NULL,
  folder TEXT NOT NULL, file_name TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
  sidecar_key TEXT NOT NULL, status TEXT NOT NULL, error TEXT NOT NULL DEFAULT '', sha256 TEXT,
  declared_sha256 TEXT NOT NULL DEFAULT '', name TEXT NOT NULL DEFAULT '', title TEXT NOT NULL DEFAULT '',
  description TEXT NOT NULL DEFAULT '', notes TEXT NOT NULL DEFAULT '', base_model TEXT NOT NULL DEFAULT '',
  base_family TEXT NOT NULL DEFAULT '', architecture TEXT NOT NULL DEFAULT '',
  output_name TEXT NOT NULL DEFAULT '', network_module TEXT NOT NULL DEFAULT '', network_dim INTEGER,
  network_alpha REAL, trigger_words TEXT NOT NULL DEFAULT '[]', tags TEXT NOT NULL DEFAULT '[]',
  tag_frequency TEXT NOT NULL DEFAULT '{{}}', preview TEXT NOT NULL DEFAULT '',
  has_thumbnail INTEGER NOT NULL DEFAULT 0, tensor_count INTEGER NOT NULL DEFAULT 0,
  sources TEXT NOT NULL DEFAULT '[]', problems TEXT NOT NULL DEFAULT '[]',
  fts_triggers TEXT NOT NULL DEFAULT '', fts_tags TEXT NOT NULL DEFAULT '',
  fts_tag_freq TEXT NOT NULL DEFAULT '', fts_description TEXT NOT NULL DEFAULT '', indexed_at REAL NOT NULL,
  target_arch TEXT NOT NULL DEFAULT '', target_hidden INTEGER, target_double INTEGER NOT NULL DEFAULT 0,
  target_single INTEGER NOT NULL DEFAULT 0, writer TEXT NOT NULL DEFAULT '', flux_variant TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS adapters_sha256 ON adapters(sha256);
CREATE INDEX IF NOT EXISTS adapters_relpath ON adapters(relpath);
CREATE INDEX IF NOT EXISTS adapters_file_name ON adapters(file_name);
CREATE TABLE IF NOT EXISTS adapter_tags (
  adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE, tag TEXT NOT NULL,
  PRIMARY KEY (adapter_id, tag)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS adapter_tags_tag ON adapter_tags(tag);
CREATE TABLE IF NOT EXISTS vectors (
  adapter_id INTEGER NOT NULL REFERENCES adapters(id) ON DELETE CASCADE, kind TEXT NOT NULL,
  model TEXT NOT NULL, source_key TEXT NOT NULL, dim INTEGER NOT NULL, vector BLOB NOT NULL,
  PRIMARY KEY (adapter_id, kind));
CREATE TABLE IF NOT EXISTS library_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO library_state(key, value) VALUES ('generation', '0');
CREATE VIRTUAL TABLE IF NOT EXISTS adapters_fts USING fts5(
  {", ".join(FTS_FIELDS)}, content='adapters', content_rowid='id',
  tokenize='unicode61 remove_diacritics 2', prefix='2 3');
CREATE TRIGGER IF NOT EXISTS adapters_fts_insert AFTER INSERT ON adapters BEGIN
  INSERT INTO adapters_fts(rowid, {", ".join(FTS_FIELDS)})
  VALUES (new.id, {", ".join("new." + f for f in FTS_FIELDS)}); END;
CREATE TRIGGER IF NOT EXISTS adapters_fts_delete AFTER DELETE ON adapters BEGIN
  INSERT INTO adapters_fts(adapters_fts, rowid, {", ".join(FTS_FIELDS)})
  VALUES ('delete', old.id, {", ".join("old." + f for f in FTS_FIELDS)}); END;
CREATE TRIGGER IF NOT EXISTS adapters_fts_update AFTER UPDATE ON adapters BEGIN
  INSERT INTO adapters_fts(adapters_fts, rowid, {", ".join(FTS_FIELDS)})
  VALUES ('delete', old.id, {", ".join("old." + f for f in FTS_FIELDS)});
  INSERT INTO adapters_fts(rowid, {", ".join(FTS_FIELDS)})
  VALUES (new.id, {", ".join("new." + f for f in FTS_FIELDS)}); END;
"""


# Upgrades of an existing index, by the version they bring it to. Each runs inside the upgrade's transaction.
_MIGRATIONS = {
    # what each LoRA targets (architecture, hidden width, deepest blocks: retrieval/targets.py); a sidecar_key
    # no folder produces makes the next scan re-read every header (no re-hash: size and mtime are unchanged)
    2: """ALTER TABLE adapters ADD COLUMN target_arch TEXT NOT NULL DEFAULT '';
ALTER TABLE adapters ADD COLUMN target_hidden INTEGER;
ALTER TABLE adapters ADD COLUMN target_double INTEGER NOT NULL DEFAULT 0;
ALTER TABLE adapters ADD COLUMN target_single INTEGER NOT NULL DEFAULT 0;
UPDATE adapters SET sidecar_key = 'reread:schema 2';""",
    # which tool wrote each file and which Flux variant it targets, read from the header (re-read as above)
    3: """ALTER TABLE adapters ADD COLUMN writer TEXT NOT NULL DEFAULT '';
ALTER TABLE adapters ADD COLUMN flux_variant TEXT NOT NULL DEFAULT '';
UPDATE adapters SET sidecar_key = 'reread:schema 3';""",
}


class LibraryError(RuntimeError):
    """The index cannot be used (missing SQLite feature, newer schema, unsafe path ...)."""


def require_fts5(conn: sqlite3.Connection) -> None:
    """Raise :class:`LibraryError` when this Python's SQLite was built without FTS5."""
    try:
        conn.execute("CREATE VIRTUAL TABLE temp.loom_fts5_probe USING fts5(x)")
        conn.execute("DROP TABLE temp.loom_fts5_probe")
    except sqlite3.OperationalError as exc:
        raise LibraryError(f"the SQLite {sqlite3.sqlite_version} linked into this Python lacks FTS5 ({exc}); "
                           "library text search needs it - use a Python build whose sqlite3 has FTS5 "
                           "(python.org, conda and most Linux distributions do)") from None


def connect(db_path: str) -> sqlite3.Connection:
    """Open ``db_path`` in WAL mode with a busy timeout, create the schema if needed, check FTS5."""
    os.makedirs(os.path.dirname(os.path.abspath(db_path)) or ".", exist_ok=True)
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    require_fts5(conn)
    if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise LibraryError(f"{db_path}: index schema version {version} is newer than this LoRA Loom "
                           f"({SCHEMA_VERSION}); update LoRA Loom or pass another index path")
    if version < SCHEMA_VERSION:
        if version:
            _upgrade(conn)
        try:
            conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return conn


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring an existing index to :data:`SCHEMA_VERSION` with :data:`_MIGRATIONS`, in one transaction; the
    version is read again inside it, so a second process upgrading at the same time finds nothing to do."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for target in range(version + 1, SCHEMA_VERSION + 1) if version else ():
            for statement in filter(str.strip, _MIGRATIONS[target].split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (rollback on error); bumps the generation so caches refresh."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("UPDATE library_state SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def generation(conn: sqlite3.Connection) -> int:
    """Counter bumped by every write transaction (any thread or process)."""
    row = conn.execute("SELECT value FROM library_state WHERE key = 'generation'").fetchone()
    return int(row[0]) if row else 0


class ConnectionPool:
    """One connection per (process, thread): sqlite3 connections must not cross forks or threads."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self._local = threading.local()

    def get(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use, reopened after a fork)."""
        owner = getattr(self._local, "pid", None)
        if owner != os.getpid():
            self._local.conn = connect(self.db_path)
            self._local.pid = os.getpid()
        return self._local.conn


@dataclass(frozen=True)
class VectorMatrix:
    """All vectors of one (kind, model): ``ids`` [N] adapter ids, ``matrix`` [N, D] float32 rows."""

    ids: np.ndarray
    matrix: np.ndarray


def load_vectors(conn: sqlite3.Connection, kind: str, model: str, roots: Sequence[str]) -> VectorMatrix:
    """Vectors of adapters under ``roots`` for ``kind``/``model`` (rows with another dim are skipped)."""
    marks = ",".join("?" * len(roots))
    rows = conn.execute(f"SELECT v.adapter_id, v.dim, v.vector FROM vectors v JOIN adapters a ON a.id = v.adapter_id "
                        f"WHERE v.kind = ? AND v.model = ? AND a.status = 'ok' AND a.root IN ({marks}) "
                        "ORDER BY v.adapter_id", (kind, model, *roots)).fetchall()
    if not rows:
        return VectorMatrix(ids=np.zeros(0, dtype=np.int64), matrix=np.zeros((0, 0), dtype=np.float32))
    dim = rows[0][1]
    kept = [r for r in rows if r[1] == dim]
    # copied: BLAS runs ~100x slower on the read-only, loosely aligned view of a bytes object
    matrix = np.frombuffer(b"".join(r[2] for r in kept), dtype=np.float32).reshape(len(kept), dim).copy()
    return VectorMatrix(ids=np.array([r[0] for r in kept], dtype=np.int64), matrix=matrix)


def store_vectors(conn: sqlite3.Connection, kind: str, model: str,
                  rows: Sequence[tuple[int, str, np.ndarray]]) -> None:
    """Insert or replace vectors ``(adapter_id, source_key, vector [D])`` inside the caller's transaction."""
    conn.executemany(
        "INSERT OR REPLACE INTO vectors(adapter_id, kind, model, source_key, dim, vector) VALUES (?,?,?,?,?,?)",
        [(adapter_id, kind, model, key, int(vec.shape[0]), np.ascontiguousarray(vec, dtype=np.float32).tobytes())
         for adapter_id, key, vec in rows])


def json_list(text: str) -> tuple[str, ...]:
    """Decode a JSON list column."""
    return tuple(json.loads(text or "[]"))
