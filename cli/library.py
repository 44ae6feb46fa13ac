"""``loom library scan|search|train|stats``: the adapter library from the command line.

Where the library is: with ``--roots DIR... --db FILE`` any folders and index file, ComfyUI not needed;
otherwise ComfyUI's (found like ``loom doctor``: ``--comfyui``, ``$COMFYUI_PATH``, the ComfyUI holding this
pack; ``--base-directory``): its ``loras`` folders and ``<user>/lora-loom/library.sqlite``, the same index
the server uses. Text encoder: ``--clip-l FILE`` (loaded through ComfyUI), ``--text-encoder open-clip``, or
the default — ComfyUI's configured CLIP-L when there is one, else the hashed encoder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
from dataclasses import dataclass

from ..arguments import int_in
from ..comfy_env import ComfyNotFound, find_comfyui, import_comfy
from ..retrieval.explain import (
    hit_json,
    hits_text,
    scan_report_json,
    scan_report_text,
    stats_json,
    stats_text,
)
from ..retrieval.library import Library
from ..retrieval.search import SearchFilters
from ..retrieval.store import LibraryError
from ..retrieval.text_encoders import (
    HashedTextEncoder,
    OpenClipTextEncoder,
    TextEncoder,
)
from ..retrieval.weight_encoder import WeightEncoder, load_weight_encoder
from ..retrieval.weight_vectors import SignatureSpace
from .library_train import add_train_arguments, train

logger = logging.getLogger(__name__)


class LibraryCliError(Exception):
    """A usage or setup problem; the message says what to pass."""


@dataclass(frozen=True)
class LibrarySetup:
    """The library a command works on: its ``roots``, index ``db``, ``text_encoder`` and the weight-encoder
    checkpoint ``encoder_stem`` (``<stem>.json`` + ``<stem>.safetensors``, present or not)."""

    roots: tuple[str, ...]
    db: str
    text_encoder: TextEncoder
    encoder_stem: str

    def weight_encoder(self) -> WeightEncoder | None:
        """The trained encoder at ``encoder_stem`` if it maps into this text encoder's space."""
        if not os.path.isfile(self.encoder_stem + ".json"):
            return None
        encoder = load_weight_encoder(self.encoder_stem)
        if encoder.config.text_encoder != self.text_encoder.name:
            logger.warning("%s was trained for text encoder %s, not %s; not used", self.encoder_stem,
                           encoder.config.text_encoder, self.text_encoder.name)
            return None
        return encoder

    def library(self, weights: bool = True) -> Library:
        """The library with signatures and the trained weight encoder (``weights=False``: neither). Signatures
        follow the encoder's Flux layout when there is one (Flux.1 otherwise)."""
        if not weights:
            return Library(self.db, self.roots, text_encoder=self.text_encoder)
        encoder = self.weight_encoder()
        space = SignatureSpace(layout=encoder.config.layout) if encoder is not None else SignatureSpace()
        return Library(self.db, self.roots, text_encoder=self.text_encoder, weight_signatures=space,
                       weight_encoder=encoder)


def _comfy(args: argparse.Namespace) -> None:
    try:
        import_comfy(find_comfyui(args.comfyui), cpu=True, base_directory=args.base_directory)
    except ComfyNotFound as exc:
        raise LibraryCliError(f"{exc}; or pass --roots DIR... --db FILE to use the library without ComfyUI") from None


def setup_from_args(args: argparse.Namespace) -> LibrarySetup:
    """Roots, index and encoders from the command line (see the module docstring)."""
    if args.roots:
        if not args.db:
            raise LibraryCliError("--roots needs --db FILE (where to keep the index)")
        roots = tuple(os.path.abspath(r) for r in args.roots)
        for root in roots:
            if not os.path.isdir(root):
                raise LibraryCliError(f"--roots: {root} is not a folder")
        db = os.path.abspath(args.db)
        stem = args.encoder or os.path.splitext(db)[0] + ".weight_encoder"
        bridge = None
        if args.clip_l:
            _comfy(args)
            from ..retrieval import comfy_bridge as bridge
    else:
        if args.db:
            raise LibraryCliError("--db needs --roots DIR... (with ComfyUI the index is in its user folder)")
        _comfy(args)
        from ..retrieval import comfy_bridge as bridge

        roots = tuple(bridge.lora_roots())
        db = bridge.library_db_path()
        stem = args.encoder or bridge.weight_encoder_stem()
    if args.clip_l:
        text_encoder = bridge.load_clip_l_file(args.clip_l)
    elif args.text_encoder == "open-clip":
        text_encoder = OpenClipTextEncoder()
    elif args.text_encoder == "hashed" or bridge is None:
        text_encoder = HashedTextEncoder()
    else:
        text_encoder = bridge.default_text_encoder()
    return LibrarySetup(roots=roots, db=db, text_encoder=text_encoder, encoder_stem=stem)


def progress_bar(description: str):
    """A scan progress callback drawing a tqdm bar on stderr; returns ``(callback, close)``."""
    from tqdm import tqdm

    bar = tqdm(desc=description, unit="file", file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(done: int, total: int, relpath: str) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def split_tags(text: str | None) -> tuple[str, ...]:
    """``"a, b"`` → ``("a", "b")``."""
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")


def run_scan(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)
    update, close = progress_bar("scanning")
    try:
        report = setup.library(weights=not args.no_weights).scan(update)
    finally:
        close()
    _write(json.dumps(scan_report_json(report), indent=1) if args.json else scan_report_text(report))
    return 0


def run_search(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)
    library = setup.library()
    filters = SearchFilters(base_model=args.base_model or "", folder=args.folder or "",
                            tags_include=split_tags(args.include), tags_exclude=split_tags(args.exclude),
                            writer=args.writer or "", flux_variant=args.variant or "")
    hits = library.search(args.query, top_k=args.k, filters=filters, like=args.like)
    if args.json:
        _write(json.dumps({"query": args.query, "hits": [hit_json(h) for h in hits]}, indent=1))
    else:
        _write(hits_text(hits, args.query))
        if not hits and not library.stats().adapters:
            _write("(the index is empty: run `loom library scan` first)")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)
    stats = setup.library(weights=False).stats()
    _write(json.dumps(stats_json(stats), indent=1) if args.json else stats_text(stats))
    return 0


def run_train(args: argparse.Namespace) -> int:
    setup = setup_from_args(args)
    result = train(setup, args)
    _write(json.dumps(result, indent=1) if args.json else "\n".join(f"{k:<10} {v}" for k, v in result.items()))
    return 0


def _guard(run):
    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (LibraryCliError, ValueError, KeyError, OSError, LibraryError) as exc:
            sys.stderr.write(f"loom library {args.library_command}: error: {exc}\n")
            return 1
        except sqlite3.DatabaseError as exc:
            where = getattr(args, "db", None) or "the index"
            sys.stderr.write(f"loom library {args.library_command}: error: {where} is not a usable LoRA Loom index "
                             f"({exc}); pass another --db file\n")
            return 1

    return guarded


def register(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("where the library is")
    where.add_argument("--roots", nargs="+", metavar="DIR", help="LoRA folders (instead of ComfyUI's loras folders)")
    where.add_argument("--db", metavar="FILE", help="index file (with --roots)")
    where.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the one holding this pack)")
    where.add_argument("--base-directory", help="ComfyUI --base-directory (models, user)")
    encoders = common.add_argument_group("encoders")
    encoders.add_argument("--text-encoder", choices=("auto", "hashed", "open-clip"), default="auto",
                          help="auto: ComfyUI's configured CLIP-L, else hashed (default)")
    encoders.add_argument("--clip-l", metavar="FILE", help="a CLIP-L .safetensors to embed text (needs ComfyUI)")
    encoders.add_argument("--encoder", metavar="STEM", help="trained weight encoder checkpoint (without suffix)")
    common.add_argument("--json", action="store_true", help="print JSON")

    p = commands.add_parser("library", help="scan, search and train the adapter library")
    sub = p.add_subparsers(dest="library_command", metavar="SUBCOMMAND", required=True)
    scan = sub.add_parser("scan", parents=[common], help="index new and changed LoRA files")
    scan.add_argument("--no-weights", action="store_true", help="skip weight signatures (read headers only)")
    scan.set_defaults(run=_guard(run_scan))
    search = sub.add_parser("search", parents=[common], help="find LoRAs by prompt")
    search.add_argument("query", nargs="?", default="", help="prompt (empty: list by name)")
    search.add_argument("-k", type=int_in(1, 1000), default=10, help="number of hits (default 10)")
    search.add_argument("--base-model", help="only this base model family, e.g. 'flux dev'")
    search.add_argument("--writer", help="only files written by this tool (kohya, ai-toolkit, onetrainer, ...)")
    search.add_argument("--variant", help="only LoRAs for this Flux variant (dev, schnell, fill, kontext, ...)")
    search.add_argument("--folder", help="only under this folder of a root")
    search.add_argument("--include", help="comma-separated tags every hit must have")
    search.add_argument("--exclude", help="comma-separated tags no hit may have")
    search.add_argument("--like", metavar="REF", help="adapters with weights like this one (relpath or sha256)")
    search.set_defaults(run=_guard(run_search))
    stats = sub.add_parser("stats", parents=[common], help="counts of adapters, errors, vectors")
    stats.set_defaults(run=_guard(run_stats))
    training = sub.add_parser("train", parents=[common], help="train the weight encoder on your library")
    add_train_arguments(training)
    training.set_defaults(run=_guard(run_train))
