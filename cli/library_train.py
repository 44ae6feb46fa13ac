"""``loom library train``: fit the AutoLoRA weight encoder to the user's own library.

Each indexed adapter gives one training pair: its low-rank factors (read from the file) and the text
embedding of its metadata caption (name, title, trigger words, tags, dataset tags, description). The encoder
learns, with a symmetric InfoNCE loss, to put an adapter's weights where its caption lands in the text
encoder's space, so later a prompt finds adapters whose metadata says little. A checkpoint is written after
every epoch (``<stem>.json`` + ``<stem>.safetensors``), then the index computes the adapters' weight vectors.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

import torch

from ..arguments import SEED_MAX, add_force, float_in, int_in
from ..files.writing import check_output
from ..retrieval.factors import FluxLayout, LowRankFactors, read_factors
from ..retrieval.text_encoders import adapter_caption
from ..retrieval.weight_encoder import (
    WeightEncoder,
    WeightEncoderConfig,
    save_weight_encoder,
    train_weight_encoder,
)

if TYPE_CHECKING:
    from .library import LibrarySetup

logger = logging.getLogger(__name__)

MIN_ADAPTERS = 4


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int_in(1, 100_000), default=30, help="passes over the library (default 30)")
    parser.add_argument("--batch-size", type=int_in(2, 65_536), default=16, help="adapters per step (default 16)")
    parser.add_argument("--learning-rate", type=float_in(0.0, 10.0, open_low=True), default=1e-3,
                        help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--temperature", type=float_in(1e-4, 100.0), default=0.07,
                        help="InfoNCE temperature (default 0.07)")
    parser.add_argument("--seed", type=int_in(0, SEED_MAX), default=0, help="shuffling and initialisation seed")
    parser.add_argument("--hidden", type=int_in(1, 65_536), default=3072,
                        help="Flux hidden size (default 3072, Flux.1)")
    parser.add_argument("--double-blocks", type=int_in(0, 1000), default=19, help="Flux double blocks (default 19)")
    parser.add_argument("--single-blocks", type=int_in(0, 1000), default=38, help="Flux single blocks (default 38)")
    add_force(parser, "weight-encoder checkpoint")
    parser.add_argument("--no-index", action="store_true", help="do not compute weight vectors after training")


def _fits(factors: dict[str, LowRankFactors], layout: FluxLayout) -> dict[str, LowRankFactors] | None:
    """The adapter's factors on layers of ``layout``; None when none are there or a shape disagrees."""
    kept = {name: f for name, f in factors.items() if name in layout.index}
    if not kept:
        return None
    try:
        for name, f in kept.items():
            layout.check(name, f)
    except ValueError:
        return None
    return kept


def training_set(setup: LibrarySetup, layout: FluxLayout) -> tuple[list[dict[str, LowRankFactors]], list[str],
                                                                    dict[str, int]]:
    """Factors and captions of every indexed adapter whose weights fit ``layout`` (one per sha256), plus
    counts of what was skipped and why."""
    from tqdm import tqdm

    library = setup.library(weights=False)
    library.scan()
    hits = library.search("", top_k=10 ** 9)
    factors, captions, seen = [], [], set()
    skipped = {"duplicate": 0, "unreadable": 0, "other layout": 0}
    for hit in tqdm(hits, desc="reading weights", unit="file", file=sys.stderr, leave=False):
        if hit.sha256 and hit.sha256 in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(hit.sha256)
        details = library.details(hit.sha256 or hit.relpath)
        try:
            read = read_factors(hit.path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and counted, never fatal
            logger.info("train: skipping %s (%s: %s)", hit.relpath, type(exc).__name__, exc)
            skipped["unreadable"] += 1
            continue
        kept = _fits(read, layout)
        if kept is None or details is None:
            skipped["other layout"] += 1
            continue
        factors.append(kept)
        captions.append(adapter_caption({"name": details.name, "title": details.title,
                                         "trigger_words": details.trigger_words, "tags": details.tags,
                                         "tag_frequency": details.tag_frequency,
                                         "description": f"{details.description} {details.notes}".strip()}))
    return factors, captions, skipped


def train(setup: LibrarySetup, args: argparse.Namespace) -> dict[str, Any]:
    """Train, checkpoint every epoch, index the weight vectors; returns a summary for printing."""
    from tqdm import tqdm

    for suffix in (".json", ".safetensors"):  # refuse to replace a trained encoder unless asked to
        check_output(setup.encoder_stem + suffix, force=args.force, flag="weight encoder")
    torch.manual_seed(args.seed)
    layout = FluxLayout(hidden=args.hidden, double_blocks=args.double_blocks, single_blocks=args.single_blocks)
    factors, captions, skipped = training_set(setup, layout)
    if len(factors) < MIN_ADAPTERS:
        raise ValueError(f"only {len(factors)} adapters in {', '.join(setup.roots)} have weights on the Flux layout "
                         f"(hidden {args.hidden}); training needs at least {MIN_ADAPTERS} (skipped: {skipped})")
    text = setup.text_encoder
    with torch.inference_mode():
        caption_vectors = text.encode(captions).float().clone()
    config = WeightEncoderConfig(hidden=args.hidden, double_blocks=args.double_blocks,
                                 single_blocks=args.single_blocks, dim=text.dim, text_encoder=text.name)
    encoder = WeightEncoder(config)
    per_epoch = (len(factors) + args.batch_size - 1) // args.batch_size
    bar = tqdm(total=args.epochs * per_epoch, desc="training", unit="step", file=sys.stderr, leave=False)

    def progress(step: int, total: int, loss: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step % per_epoch == 0:
            save_weight_encoder(encoder, setup.encoder_stem)

    try:
        report = train_weight_encoder(encoder, factors, caption_vectors, epochs=args.epochs,
                                      batch_size=args.batch_size, learning_rate=args.learning_rate,
                                      temperature=args.temperature, seed=args.seed, progress=progress,
                                      checkpoint=setup.encoder_stem)
    finally:
        bar.close()
    summary: dict[str, Any] = {"adapters": len(factors), "skipped": skipped, "steps": report.steps,
                               "first_loss": round(report.epoch_losses[0], 4),
                               "last_loss": round(report.epoch_losses[-1], 4),
                               "checkpoint": setup.encoder_stem, "encoder": encoder.name, "text_encoder": text.name}
    if not args.no_index:
        library = setup.library()
        library.scan()
        summary["weight_vectors"] = library.stats().weight_vectors
    return summary
