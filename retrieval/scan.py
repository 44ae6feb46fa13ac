"""Scanning library roots into the index: walk (symlink-safe), describe changed files, write in batches.

Incremental: a file whose (size, mtime_ns) and sidecar fingerprint match its row is not opened at all;
rows of vanished files are deleted. Refused files (pickles, corrupt headers, symlinks escaping the roots)
become ``status='error'`` rows with a reason; entries that cannot even be listed (link loops, dangling links)
are reported as errors of the scan. Neither ever stops the scan.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..files.folders import inside
from . import header as header_module
from .header import ADAPTER_SUFFIXES, HeaderError, refusal_reason
from .metadata import AdapterMetadata, facts_from_header, merge_facts, normalise_base_model
from .sidecars import SidecarSet, find_sidecars, read_sidecars
from .store import write_transaction
from .targets import Targets, lora_targets

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]
BATCH_SIZE = 128


@dataclass(frozen=True)
class ScanError:
    """A file listed as an error: where it is and why it was not indexed."""

    root: str
    relpath: str
    reason: str


@dataclass(frozen=True)
class ScanReport:
    """What one scan did. ``headers_read`` counts safetensors headers opened (0 for an unchanged library)."""

    total: int
    added: int
    updated: int
    unchanged: int
    removed: int
    errors: tuple[ScanError, ...]
    headers_read: int
    hashed: int
    seconds: float


@dataclass(frozen=True)
class FileCandidate:
    """One adapter-looking file found under a root (``escape`` is set when its real path leaves the roots)."""

    path: str
    root: str
    relpath: str
    folder: str
    directory: str
    file_name: str
    size: int
    mtime_ns: int
    sidecars: SidecarSet
    sidecar_key: str
    escape: str


def _sidecar_key(directory: str, sidecars: SidecarSet) -> str:
    parts = []
    for name in sidecars.names():
        try:
            st = os.stat(os.path.join(directory, name))
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{name}:gone")
    return "|".join(parts)


def walk_roots(roots: Sequence[str]) -> tuple[list[FileCandidate], list[ScanError]]:
    """Every adapter-suffixed file under ``roots`` (absolute paths), following symlinks only while their
    targets stay inside the roots; hidden folders are skipped; each real folder is visited once."""
    real_roots = [os.path.realpath(r) for r in roots]
    found: list[FileCandidate] = []
    problems: list[ScanError] = []
    visited: set[str] = set()
    for root, real_root in zip(roots, real_roots):
        if not os.path.isdir(real_root):
            logger.warning("library root %s is not a folder; skipped", root)
            continue
        stack = [(root, real_root)]
        while stack:
            directory, real_dir = stack.pop()
            if real_dir in visited:
                continue
            visited.add(real_dir)
            try:
                entries = list(os.scandir(directory))
            except OSError as exc:
                problems.append(ScanError(root, os.path.relpath(directory, root), f"cannot list folder: {exc}"))
                continue
            names = {e.name for e in entries}
            for entry in sorted(entries, key=lambda e: e.name):
                try:
                    _visit(entry, root, directory, real_dir, real_roots, names, found, stack)
                except (OSError, ValueError) as exc:  # a link loop (ELOOP) or dangling link, a folder link
                    # leading outside the roots, a name that is not UTF-8: listed, never the end of the scan
                    relpath = os.path.relpath(entry.path, root).replace(os.sep, "/")
                    reason = f"cannot read this entry: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
                    problems.append(ScanError(root, relpath.encode("utf-8", "replace").decode("utf-8"), reason))
    return found, problems


def _check_name(name: str, what: str) -> None:
    """Names the index can store: a name that is not UTF-8 reaches Python as lone surrogates."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8; rename it") from None


def _visit(entry: os.DirEntry[str], root: str, directory: str, real_dir: str, real_roots: Sequence[str],
           names: set[str], found: list[FileCandidate], stack: list[tuple[str, str]]) -> None:
    """One directory entry of :func:`walk_roots`: queue a folder, add a candidate file, or raise."""
    link = entry.is_symlink()
    real = os.path.realpath(entry.path) if link else os.path.join(real_dir, entry.name)
    escaped = not inside(real, real_roots)
    if entry.is_dir():
        if entry.name.startswith("."):
            return
        _check_name(entry.name, "folder name")
        if escaped:
            raise ValueError("folder link points outside the library roots; not followed")
        stack.append((entry.path, real))
        return
    if Path(entry.name).suffix.lower() not in ADAPTER_SUFFIXES:
        return
    _check_name(entry.name, "file name")
    if link and not escaped and not os.path.exists(real):
        raise OSError(errno.ENOENT, "the link points to nothing (dangling or a loop)")
    if not escaped and not entry.is_file():
        return
    relpath = os.path.relpath(entry.path, root).replace(os.sep, "/")
    try:
        st = entry.stat(follow_symlinks=not escaped)
    except FileNotFoundError:  # deleted while we were listing: it simply is not there
        return
    sidecars = _sidecars_inside(directory, find_sidecars(entry.name, names), real_roots)
    found.append(FileCandidate(
        path=entry.path, root=root, relpath=relpath, folder=relpath.rpartition("/")[0],
        directory=directory, file_name=entry.name, size=st.st_size, mtime_ns=st.st_mtime_ns,
        sidecars=sidecars, sidecar_key=_sidecar_key(directory, sidecars),
        escape="link target is outside the library roots; not opened" if escaped else ""))


def _sidecars_inside(directory: str, sidecars: SidecarSet, real_roots: Sequence[str]) -> SidecarSet:
    """Only the sidecars and preview whose real path stays inside the roots: a ``.txt`` or ``.civitai.info``
    link to a file elsewhere is never read (its text would reach the index and the panel)."""
    def ok(name: str) -> bool:
        return inside(os.path.realpath(os.path.join(directory, name)), real_roots)

    return SidecarSet(files={kind: name for kind, name in sidecars.files.items() if ok(name)},
                      preview=sidecars.preview if sidecars.preview and ok(sidecars.preview) else "")


def sha256_of(path: str) -> str:
    """Streamed SHA-256 of a whole file (1 MiB reads), lower-case hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class DescribedFile:
    """A candidate after reading: metadata (``None`` for errors), hash, header size facts."""

    candidate: FileCandidate
    metadata: AdapterMetadata | None
    error: str
    sha256: str | None
    tensor_count: int
    header_read: bool
    hashed: bool
    targets: Targets = Targets()


def describe(candidate: FileCandidate, known_sha256: str | None, hash_files: bool) -> DescribedFile:
    """Read header + sidecars of one candidate; errors are captured in ``error``, never raised: one bad file
    costs one error row, never the scan."""
    try:
        return _describe(candidate, known_sha256, hash_files)
    except Exception as exc:  # a bug or an unforeseen file: logged with its traceback, recorded as the file's error
        logger.exception("library scan: %s could not be described", candidate.path)
        return DescribedFile(candidate, None, f"could not be read ({type(exc).__name__}: {exc})"[:500], None, 0,
                             True, False)


def _describe(candidate: FileCandidate, known_sha256: str | None, hash_files: bool) -> DescribedFile:
    stem = candidate.file_name.rsplit(".", 1)[0]
    reason = candidate.escape or refusal_reason(Path(candidate.file_name))
    if reason:
        return DescribedFile(candidate, None, reason, None, 0, False, False)
    try:
        header = header_module.read_header(candidate.path)
    except HeaderError as exc:
        return DescribedFile(candidate, None, exc.reason, None, 0, True, False)
    except OSError as exc:
        return DescribedFile(candidate, None, f"cannot read file: {exc}", None, 0, True, False)
    header_facts, problems = facts_from_header(header)
    sidecar_facts, sidecar_problems = read_sidecars(candidate.directory, candidate.sidecars)
    metadata = merge_facts(stem, [header_facts, *sidecar_facts], candidate.sidecars.preview,
                           (*problems, *sidecar_problems))
    sha, hashed = known_sha256, False
    if sha is None and hash_files:
        try:
            sha, hashed = sha256_of(candidate.path), True
        except OSError as exc:
            return DescribedFile(candidate, None, f"cannot hash file: {exc}", None, 0, True, False)
    targets = lora_targets({name: entry.shape for name, entry in header.tensors.items()})
    return DescribedFile(candidate, metadata, "", sha, len(header.tensors), True, hashed, targets)


_COLUMNS = ("path", "root", "relpath", "folder", "file_name", "size", "mtime_ns", "sidecar_key", "status", "error",
            "sha256", "declared_sha256", "name", "title", "description", "notes", "base_model", "base_family",
            "architecture", "output_name", "network_module", "network_dim", "network_alpha", "trigger_words",
            "tags", "tag_frequency", "preview", "has_thumbnail", "tensor_count", "sources", "problems",
            "fts_triggers", "fts_tags", "fts_tag_freq", "fts_description", "indexed_at", "target_arch",
            "target_hidden", "target_double", "target_single", "writer", "flux_variant")
_UPSERT = (f"INSERT INTO adapters({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
           f"ON CONFLICT(path) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _COLUMNS[1:])}")


def _row(item: DescribedFile) -> tuple[object, ...]:
    """The ``adapters`` row of ``item``; text SQLite cannot store (lone surrogates from a sidecar's JSON
    escapes) is replaced rather than failing the batch."""
    return tuple(v.encode("utf-8", "replace").decode("utf-8") if isinstance(v, str) else v
                 for v in _raw_row(item))


def _raw_row(item: DescribedFile) -> tuple[object, ...]:
    c, m = item.candidate, item.metadata
    stem = c.file_name.rsplit(".", 1)[0]
    if m is None:
        return (c.path, c.root, c.relpath, c.folder, c.file_name, c.size, c.mtime_ns, c.sidecar_key, "error",
                item.error, None, "", stem, "", "", "", "", "", "", "", "", None, None, "[]", "[]", "{}", "", 0, 0,
                "[]", "[]", "", "", "", "", time.time(), "", None, 0, 0, "", "")
    freq_text = " ".join(m.tag_frequency)
    return (c.path, c.root, c.relpath, c.folder, c.file_name, c.size, c.mtime_ns, c.sidecar_key, "ok", "",
            item.sha256, m.declared_sha256, m.name, m.title, m.description, m.notes, m.base_model,
            normalise_base_model(m.base_model), m.architecture, m.output_name, m.network_module, m.network_dim,
            m.network_alpha, json.dumps(list(m.trigger_words)), json.dumps(list(m.tags)),
            json.dumps(dict(m.tag_frequency)), m.preview, int(m.has_thumbnail), item.tensor_count,
            json.dumps(list(m.sources)), json.dumps(list(m.problems)), " , ".join(m.trigger_words),
            " , ".join(m.tags), freq_text, f"{m.description}\n{m.notes}\n{stem}"[:8000], time.time(),
            item.targets.architecture, item.targets.hidden, item.targets.double_blocks, item.targets.single_blocks,
            m.writer, m.flux_variant)


def write_batch(conn: sqlite3.Connection, items: Sequence[DescribedFile]) -> None:
    """Upsert described files (and their tag rows) in one transaction; stale vectors are dropped."""
    with write_transaction(conn):
        for item in items:
            conn.execute(_UPSERT, _row(item))
            (adapter_id,) = conn.execute("SELECT id FROM adapters WHERE path = ?", (item.candidate.path,)).fetchone()
            conn.execute("DELETE FROM adapter_tags WHERE adapter_id = ?", (adapter_id,))
            conn.execute("DELETE FROM vectors WHERE adapter_id = ?", (adapter_id,))
            if item.metadata is not None:
                conn.executemany("INSERT OR IGNORE INTO adapter_tags(adapter_id, tag) VALUES (?, ?)",
                                 [(adapter_id, t.lower()) for t in item.metadata.tags])


def scan_roots(conn: sqlite3.Connection, roots: Sequence[str], progress: ProgressCallback | None,
               hash_files: bool = True) -> ScanReport:
    """Bring the index in line with the files under ``roots``; see the module docstring."""
    started = time.perf_counter()
    candidates, walk_problems = walk_roots(roots)
    marks = ",".join("?" * len(roots))
    existing = {row[0]: row[1:] for row in conn.execute(
        "SELECT path, size, mtime_ns, sidecar_key, sha256 FROM adapters")}
    foreign_roots = [row[0] for row in conn.execute(
        f"SELECT path FROM adapters WHERE root NOT IN ({marks})", tuple(roots))]
    seen = {c.path for c in candidates}
    gone = [path for path in existing if path not in seen] + foreign_roots
    if gone:
        with write_transaction(conn):
            conn.executemany("DELETE FROM adapters WHERE path = ?", [(p,) for p in dict.fromkeys(gone)])
    todo: list[tuple[FileCandidate, str | None]] = []
    for c in candidates:
        row = existing.get(c.path)
        if row is not None and row[0] == c.size and row[1] == c.mtime_ns and row[2] == c.sidecar_key:
            continue
        same_bytes = row is not None and row[0] == c.size and row[1] == c.mtime_ns
        todo.append((c, row[3] if same_bytes else None))
    total, unchanged = len(candidates), len(candidates) - len(todo)
    if progress is not None and unchanged:
        progress(unchanged, total, "")
    added = sum(1 for c, _ in todo if c.path not in existing)
    headers = hashed = 0
    batch: list[DescribedFile] = []
    for done, (candidate, known_sha) in enumerate(todo, start=unchanged + 1):
        item = describe(candidate, known_sha, hash_files)
        headers += item.header_read
        hashed += item.hashed
        batch.append(item)
        if len(batch) >= BATCH_SIZE:
            write_batch(conn, batch)
            batch = []
        if progress is not None:
            progress(done, total, candidate.relpath)
    if batch:
        write_batch(conn, batch)
    errors = [ScanError(r[0], r[1], r[2]) for r in conn.execute(
        f"SELECT root, relpath, error FROM adapters WHERE status = 'error' AND root IN ({marks}) ORDER BY relpath",
        tuple(roots))]
    return ScanReport(total=total, added=added, updated=len(todo) - added, unchanged=unchanged,
                      removed=len(set(gone)), errors=tuple(walk_problems + errors), headers_read=headers,
                      hashed=hashed, seconds=time.perf_counter() - started)
