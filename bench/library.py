"""Library benchmark: generate N LoRA files (real safetensors headers with kohya/modelspec metadata, tiny
tensors, some sidecars and previews), then measure scan rate, no-change rescan time and search latency
(text-only BM25, and hybrid BM25 + semantic). ``run_benchmark`` returns table rows; the CLI prints them.

Goals (issue 6): rescan of an unchanged 10k library ≤ 2 s; search p95 ≤ 50 ms.
"""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..retrieval.library import Library
from ..retrieval.text_encoders import HashedTextEncoder

logger = logging.getLogger(__name__)

STYLES = ("watercolor", "ink", "pixel", "noir", "anime", "oil", "charcoal", "neon", "vintage", "film", "claymation",
          "origami", "baroque", "cyberpunk", "pastel", "gothic", "lowpoly", "ukiyoe", "sketch", "glitch")
SUBJECTS = ("portrait", "landscape", "knight", "witch", "robot", "cat", "city", "forest", "car", "dragon", "castle",
            "ocean", "flower", "armor", "dress", "mecha", "food", "interior", "logo", "character")
BASES = ("Flux.1 D", "flux-1-dev/lora", "Flux.1 S", "flux1", "SDXL 1.0")
PNG_BYTES = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
                          "0000000a49444154789c63600000000200015e2b2b7c0000000049454e44ae426082")


@dataclass(frozen=True)
class BenchRow:
    """One measured quantity; ``goal`` is ``""`` when the issue sets none; ``met`` is None then."""

    metric: str
    value: float
    unit: str
    goal: str
    met: bool | None


def generate_library(folder: str | os.PathLike[str], count: int = 10_000, seed: int = 0) -> int:
    """Write ``count`` LoRA files under ``folder`` (40 sub-folders); returns the number of files written.

    Each file is a real safetensors file (rank-1 kohya LoRA on one Flux module, 4 tiny tensors) whose header
    carries ``ss_output_name``, ``ss_network_*``, ``ss_base_model_version``/``modelspec.architecture``,
    ``modelspec.title``/``tags``/``trigger_phrase`` and ``ss_tag_frequency``. One in three gets a
    ``.civitai.info``, one in four a preview, one in ten a ``.txt``.
    """
    rng = random.Random(seed)
    root = Path(folder)
    gen = torch.Generator().manual_seed(seed)
    down, up = torch.randn(1, 8, generator=gen), torch.randn(24, 1, generator=gen)
    for i in range(count):
        style, subject = rng.choice(STYLES), rng.choice(SUBJECTS)
        name = f"{style}_{subject}_v{i}"
        directory = root / rng.choice(STYLES[:10]) / rng.choice(("a", "b", "c", "d"))
        directory.mkdir(parents=True, exist_ok=True)
        tags = [style, subject, rng.choice(SUBJECTS)]
        meta = {"ss_output_name": name, "ss_network_module": "networks.lora_flux", "ss_network_dim": "16",
                "ss_network_alpha": "8", "ss_base_model_version": rng.choice(BASES),
                "modelspec.architecture": "flux-1-dev/lora", "modelspec.title": f"{style.title()} {subject}",
                "modelspec.tags": ", ".join(tags), "modelspec.trigger_phrase": f"{style[:4]}{subject[:3]}{i}",
                "ss_tag_frequency": json.dumps({f"10_{subject}": {t: rng.randint(1, 40) for t in tags}})}
        path = directory / f"{name}.safetensors"
        save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up * (1 + i % 7),
                   "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0),
                   "lora_unet_single_blocks_0_linear2.alpha": torch.tensor(float(i))}, str(path), metadata=meta)
        if i % 3 == 0:
            info = {"baseModel": rng.choice(BASES), "trainedWords": [f"{style} {subject}"],
                    "model": {"name": f"{style.title()} {subject.title()} Pack", "tags": tags,
                              "description": f"<p>A {style} LoRA for {subject} images.</p>"}}
            (directory / f"{name}.civitai.info").write_text(json.dumps(info), encoding="utf-8")
        if i % 4 == 0:
            (directory / f"{name}.png").write_bytes(PNG_BYTES)
        if i % 10 == 0:
            (directory / f"{name}.txt").write_text(f"works well with {rng.choice(SUBJECTS)}", encoding="utf-8")
    return count


def _latencies(search: Callable[[str], object], queries: list[str]) -> tuple[float, float]:
    """p50 and p95 of ``search(q)`` in milliseconds (one warm-up call first)."""
    search(queries[0])
    times = []
    for query in queries:
        start = time.perf_counter()
        search(query)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def run_benchmark(count: int = 10_000, folder: str | os.PathLike[str] | None = None, queries: int = 200,
                  seed: int = 0) -> list[BenchRow]:
    """Generate ``count`` files into ``folder`` (a temporary folder when ``None``) and measure; see module doc."""
    with tempfile.TemporaryDirectory(prefix="loom-bench-") as scratch:
        root = Path(folder) if folder is not None else Path(scratch) / "loras"
        db = Path(scratch) / "library.sqlite"
        started = time.perf_counter()
        generate_library(root, count, seed)
        generated = time.perf_counter() - started
        logger.info("generated %d files in %.1f s", count, generated)
        library = Library(db, [root])
        first = library.scan()
        again = library.scan()
        rng = random.Random(seed + 1)
        query_list = [" ".join(rng.sample(STYLES + SUBJECTS, rng.randint(1, 3))) for _ in range(queries)]
        text_p50, text_p95 = _latencies(lambda q: library.search(q, top_k=20), query_list)
        hybrid = Library(db, [root], text_encoder=HashedTextEncoder())
        started = time.perf_counter()
        hybrid.scan()
        embedded = time.perf_counter() - started
        hybrid_p50, hybrid_p95 = _latencies(lambda q: hybrid.search(q, top_k=20), query_list)
        return [
            BenchRow("files", float(count), "files", "", None),
            BenchRow("generate", generated, "s", "", None),
            BenchRow("first scan (headers, sidecars, sha256)", first.seconds, "s", "", None),
            BenchRow("scan rate", count / first.seconds, "files/s", "", None),
            BenchRow("rescan, nothing changed", again.seconds, "s", "<= 2 s", again.seconds <= 2.0),
            BenchRow("headers read by rescan", float(again.headers_read), "files", "0", again.headers_read == 0),
            BenchRow("text embeddings (hashed encoder)", embedded, "s", "", None),
            BenchRow("search p50, text only", text_p50, "ms", "", None),
            BenchRow("search p95, text only", text_p95, "ms", "<= 50 ms", text_p95 <= 50.0),
            BenchRow("search p50, hybrid", hybrid_p50, "ms", "", None),
            BenchRow("search p95, hybrid", hybrid_p95, "ms", "<= 50 ms", hybrid_p95 <= 50.0),
        ]


def format_table(rows: list[BenchRow]) -> str:
    """Rows as an aligned plain-text table."""
    lines = [f"{'metric':<42} {'value':>12} {'unit':<8} {'goal':<10} met"]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "NO")
        lines.append(f"{row.metric:<42} {row.value:>12.2f} {row.unit:<8} {row.goal:<10} {met}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the relevance floor
NONSENSE_TUNING = ("xyzzyqq", "qwrtp", "zzkv blorf", "mnbvc", "plugh frob", "grault wibble")
NONSENSE_HELD_OUT = ("kjhgf", "wugga vrrp", "xqzt", "flimflam zorp", "bzzt qqq", "snarf")
FLOOR_CANDIDATES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)


@dataclass(frozen=True)
class FloorQuery:
    """One labelled query: ``relevant`` are the file names (stems) a user would want, empty for nonsense."""

    text: str
    relevant: frozenset[str]


def _misspelt(word: str, rng: random.Random) -> str:
    """A one-letter slip: a letter dropped, doubled or two letters swapped (never the first letter)."""
    i = rng.randrange(1, len(word) - 1)
    return rng.choice((word[:i] + word[i + 1:], word[:i] + word[i] + word[i:],
                       word[:i] + word[i + 1] + word[i] + word[i + 2:]))


def floor_queries(names: list[str], words: tuple[str, ...], nonsense: tuple[str, ...], seed: int) -> list[FloorQuery]:
    """Queries over a generated library (file stems ``style_subject_vN``): each word as typed, each word with
    a slip (relevant: the files of the word meant) and nonsense (relevant: nothing)."""
    rng = random.Random(seed)
    by_word = {w: frozenset(n for n in names if w in n.split("_")[:2]) for w in words}
    queries = [FloorQuery(w, by_word[w]) for w in words]
    queries += [FloorQuery(_misspelt(w, rng), by_word[w]) for w in words if len(w) > 4]
    queries += [FloorQuery(text, frozenset()) for text in nonsense]
    return queries


def floor_scores(library: Library, queries: list[FloorQuery], floor: float, top_k: int = 50) -> dict[str, float]:
    """Precision, recall and F1 over all (query, file) pairs, and the share of nonsense queries answered with
    nothing, at relevance ``floor``."""
    library.semantic_floor = floor
    found = relevant = correct = 0
    silent = nonsense = 0
    for query in queries:
        names = {Path(h.relpath).stem for h in library.search(query.text, top_k=top_k)}
        found += len(names)
        relevant += len(query.relevant)
        correct += len(names & query.relevant)
        if not query.relevant:
            nonsense += 1
            silent += not names
    precision = correct / found if found else 1.0
    recall = correct / relevant if relevant else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "nonsense_silent": silent / max(1, nonsense)}


def floor_study(count: int = 600, seed: int = 0) -> tuple[float, list[BenchRow]]:
    """Choose the semantic relevance floor on tuning queries (the first half of the styles and subjects, one set
    of nonsense words) by F1, then report it on held-out queries (the other half, other nonsense words) with
    the hashed text encoder. Returns the chosen floor and the held-out rows."""
    with tempfile.TemporaryDirectory(prefix="loom-floor-") as scratch:
        root = Path(scratch) / "loras"
        generate_library(root, count, seed)
        library = Library(Path(scratch) / "library.sqlite", [root], text_encoder=HashedTextEncoder())
        library.scan()
        names = [Path(h.relpath).stem for h in library.search("", top_k=count)]
        half = len(STYLES) // 2
        tuning = floor_queries(names, STYLES[:half] + SUBJECTS[:half], NONSENSE_TUNING, seed)
        held_out = floor_queries(names, STYLES[half:] + SUBJECTS[half:], NONSENSE_HELD_OUT, seed + 1)
        chosen = max(FLOOR_CANDIDATES, key=lambda f: (round(floor_scores(library, tuning, f)["f1"], 4), -f))
        rows = []
        for label, floor in (("no floor (cos > 0)", 1e-9), (f"floor {chosen:.2f}", chosen)):
            scores = floor_scores(library, held_out, floor)
            rows += [BenchRow(f"held-out {label}: {k}", v, "", "", None) for k, v in scores.items()]
        return chosen, rows
