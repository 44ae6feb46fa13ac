"""Filling the index's weight vectors: training-free signatures and learned (AutoLoRA) weight embeddings.

Unlike metadata indexing this reads tensor data, so it runs only when the library asks for it. A vector is
keyed by the file's ``size:mtime_ns``; unchanged files are not re-read. A file whose factors cannot be read
gets a zero vector (so it is not retried every scan) and a line in its ``problems``.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .factors import FluxLayout, read_factors
from .scan import inside
from .store import store_vectors, write_transaction
from .weight_encoder import WeightEncoder
from .weight_signature import SignatureConfig, weight_signature

logger = logging.getLogger(__name__)

SIGNATURE_KIND, WEIGHT_KIND = "signature", "weight"
BATCH = 64


@dataclass(frozen=True)
class SignatureSpace:
    """Which signatures a library computes: the Flux ``layout`` and the signature ``config``."""

    layout: FluxLayout = FluxLayout()
    config: SignatureConfig = SignatureConfig()

    @property
    def model(self) -> str:
        """Name stored beside the vectors."""
        return self.config.model_name(self.layout)

    @property
    def dim(self) -> int:
        """Signature length."""
        return len(self.layout.layers) * self.config.per_layer


def _add_problem(conn: sqlite3.Connection, adapter_id: int, problem: str) -> None:
    row = conn.execute("SELECT problems FROM adapters WHERE id = ?", (adapter_id,)).fetchone()
    if row is not None:
        problems = [p for p in json.loads(row[0]) if p != problem] + [problem]
        conn.execute("UPDATE adapters SET problems = ? WHERE id = ?", (json.dumps(problems), adapter_id))


def refresh_weight_vectors(conn: sqlite3.Connection, roots: Sequence[str], real_roots: Sequence[str], *,
                           signatures: SignatureSpace | None, encoder: WeightEncoder | None) -> int:
    """Compute missing/stale signature and/or encoder vectors for ok files under ``roots``; returns the
    number of files read."""
    if signatures is None and encoder is None:
        return 0
    marks = ",".join("?" * len(roots))
    rows = conn.execute(f"SELECT id, path, size, mtime_ns, target_hidden FROM adapters WHERE status = 'ok' "
                        f"AND root IN ({marks})", tuple(roots)).fetchall()
    have = {(r[0], r[1]): (r[2], r[3]) for r in conn.execute("SELECT adapter_id, kind, model, source_key FROM vectors")}
    pending: dict[str, list[tuple[int, str, np.ndarray]]] = {SIGNATURE_KIND: [], WEIGHT_KIND: []}
    problems: list[tuple[int, str]] = []
    files_read = 0

    def flush() -> None:
        with write_transaction(conn):
            live = {r[0] for r in conn.execute("SELECT id FROM adapters")}
            if signatures is not None:
                store_vectors(conn, SIGNATURE_KIND, signatures.model,
                              [p for p in pending[SIGNATURE_KIND] if p[0] in live])
            if encoder is not None:
                store_vectors(conn, WEIGHT_KIND, encoder.name, [p for p in pending[WEIGHT_KIND] if p[0] in live])
            for adapter_id, problem in problems:
                if adapter_id in live:
                    _add_problem(conn, adapter_id, problem)
        for kind in pending:
            pending[kind].clear()
        problems.clear()

    for adapter_id, path, size, mtime_ns, hidden in rows:
        key = f"{size}:{mtime_ns}"
        need_signature = signatures is not None and have.get((adapter_id, SIGNATURE_KIND)) != (signatures.model, key)
        need_encoder = encoder is not None and have.get((adapter_id, WEIGHT_KIND)) != (encoder.name, key)
        if not (need_signature or need_encoder):
            continue
        if hidden is not None and hidden != (signatures or encoder).layout.hidden:
            # a LoRA for a Flux of another width (the playground's 192, say): its weights are not comparable
            # with this layout's, so it gets no weight vector (zero: not retried) and no problem to report
            if need_signature:
                pending[SIGNATURE_KIND].append((adapter_id, key, np.zeros(signatures.dim, np.float32)))
            if need_encoder:
                pending[WEIGHT_KIND].append((adapter_id, key, np.zeros(encoder.config.dim, np.float32)))
            continue
        if not inside(os.path.realpath(path), real_roots):
            continue
        files_read += 1
        try:
            factors = read_factors(path)
            signature = weight_signature(factors, signatures.layout, signatures.config) if need_signature else None
            if need_encoder:
                with torch.inference_mode():
                    embedding = encoder([factors])[0].float().cpu().numpy()
        except Exception as exc:  # noqa: BLE001 - any unreadable file becomes a recorded problem, never a crash
            problems.append((adapter_id, f"weights not readable for search: {type(exc).__name__}: {exc}"))
            signature = np.zeros(signatures.dim, np.float32) if need_signature else None
            embedding = np.zeros(encoder.config.dim, np.float32) if need_encoder else None
        if need_signature:
            pending[SIGNATURE_KIND].append((adapter_id, key, signature))
        if need_encoder:
            pending[WEIGHT_KIND].append((adapter_id, key, embedding))
        if len(pending[SIGNATURE_KIND]) + len(pending[WEIGHT_KIND]) >= BATCH:
            flush()
    flush()
    return files_read
