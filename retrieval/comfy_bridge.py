"""The retrieval layer's one bridge to ComfyUI: the configured ``loras`` folders, the process-wide adapter
library in ComfyUI's user directory, and resolving a LoRA reference (name + sha256) to a file inside the
folders. Never returns a path outside the configured folders.

Text encoder (for semantic search), chosen in this order:

1. the ``CLIP`` connected to ``Loom Library Search`` (Flux's CLIP-L tower, see ``clip_text_encoder``);
2. a CLIP-L file named in ``<user>/lora-loom/library.json`` as ``{"clip_l": "clip_l.safetensors"}`` (a name in
   ``text_encoders``/``clip`` or an absolute path), loaded once on first use — the web panel's encoder;
3. otherwise :class:`HashedTextEncoder`: no weights to load and nothing to configure, so the panel and the
   command line work on any machine the moment the pack is installed; it matches words and spellings, not
   meaning, which BM25 already covers — configure a CLIP-L for meaning.

A weight encoder trained by ``loom library train`` (``<user>/lora-loom/weight_encoder.{json,safetensors}``) is
used when it was trained against the text encoder in use; weight signatures are always computed.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import folder_paths

from ..bounded_cache import BoundedCache
from ..composition.stack import StackEntry
from .explain import hits_text
from .library import Library
from .rescan import RescanScheduler
from .scan import ProgressCallback, ScanReport
from .search import Hit, SearchFilters
from .targets import Targets, model_targets
from .text_encoders import HashedTextEncoder, TextEncoder
from .weight_encoder import WeightEncoder, load_weight_encoder

logger = logging.getLogger(__name__)

LIBRARY_FOLDER = "lora-loom"
WEIGHT_ENCODER_STEM = "weight_encoder"
PROGRESS_EVENT = "loom.library.progress"


class ScanBusy(RuntimeError):
    """A library scan is already running in this process."""


# ------------------------------------------------------------------------------------------- folders
def lora_roots() -> list[str]:
    """Every folder ComfyUI is configured to read LoRAs from (models/loras, extra_model_paths.yaml, ...)."""
    return [os.path.realpath(p) for p in folder_paths.get_folder_paths("loras")]


def lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def library_folder() -> str:
    """``<ComfyUI user directory>/lora-loom``: the index, its settings and the trained weight encoder."""
    return os.path.join(folder_paths.get_user_directory(), LIBRARY_FOLDER)


def library_db_path() -> str:
    return os.path.join(library_folder(), "library.sqlite")


def weight_encoder_stem() -> str:
    return os.path.join(library_folder(), WEIGHT_ENCODER_STEM)


# ------------------------------------------------------------------------------------- text encoders
def load_clip_l_file(path: str | os.PathLike[str]) -> TextEncoder:
    """Load a CLIP-L safetensors file through ComfyUI (as ``CLIPLoader`` type ``stable_diffusion``) and wrap it."""
    import comfy.sd

    from .clip_text_encoder import ComfyClipTextEncoder

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP-L file {path} does not exist")
    clip = comfy.sd.load_clip(ckpt_paths=[path], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    logger.info("library text encoder: CLIP-L from %s", path)
    return ComfyClipTextEncoder(clip, label=os.path.basename(path))


def clip_text_encoder(clip: Any) -> TextEncoder:
    """The TextEncoder for a ComfyUI ``CLIP`` object (a node's CLIP input)."""
    from .clip_text_encoder import ComfyClipTextEncoder

    return ComfyClipTextEncoder(clip)


def configured_clip_l() -> str | None:
    """The CLIP-L file named in ``library.json`` (``clip_l``), resolved; ``None`` when none is configured."""
    settings_path = os.path.join(library_folder(), "library.json")
    if not os.path.isfile(settings_path):
        return None
    with open(settings_path, encoding="utf-8") as fh:
        try:
            settings = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{settings_path}: not valid JSON ({exc})") from exc
    name = settings.get("clip_l") if isinstance(settings, dict) else None
    if not name:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{settings_path}: field 'clip_l' must be a file name, got {name!r}")
    if os.path.isabs(name):
        return name
    for kind in ("text_encoders", "clip"):
        found = folder_paths.get_full_path(kind, name) if kind in folder_paths.folder_names_and_paths else None
        if found:
            return found
    raise FileNotFoundError(f"{settings_path}: clip_l {name!r} is not in your text_encoders/clip folders")


_ENCODERS: BoundedCache[str, TextEncoder] = BoundedCache("library text encoders", max_entries=2)
_LOCK = threading.Lock()


def default_text_encoder() -> TextEncoder:
    """The configured CLIP-L (loaded once), else the hashed encoder; see the module docstring for why."""
    path = configured_clip_l()
    key = path or "hashed"
    with _LOCK:
        return _ENCODERS.get_or_put(key, lambda: load_clip_l_file(path) if path else HashedTextEncoder())


def trained_weight_encoder(text_encoder: TextEncoder) -> WeightEncoder | None:
    """The weight encoder from ``loom library train`` if it maps into ``text_encoder``'s space, else None."""
    stem = weight_encoder_stem()
    if not os.path.isfile(stem + ".json"):
        return None
    encoder = load_weight_encoder(stem)
    if encoder.config.text_encoder != text_encoder.name:
        logger.info("weight encoder %s was trained for %s, not %s; using weight signatures only", stem,
                    encoder.config.text_encoder, text_encoder.name)
        return None
    return encoder


# --------------------------------------------------------------------------------------------- library
_LIBRARIES: BoundedCache[tuple[object, ...], Library] = BoundedCache("libraries", max_entries=8)
_SCANNED: BoundedCache[tuple[object, ...], bool] = BoundedCache("scanned libraries", max_entries=64)
_SCAN_LOCK = threading.Lock()


def _stamp(path: str) -> int:
    return os.stat(path).st_mtime_ns if os.path.isfile(path) else 0


def _library_key(text_encoder: TextEncoder | None) -> tuple[object, ...]:
    name = text_encoder.name if text_encoder is not None else ""
    return (library_db_path(), tuple(lora_roots()), name,
            _stamp(weight_encoder_stem() + ".safetensors") if text_encoder is not None else 0)


def server_library(text_encoder: TextEncoder | None = None, *, plain: bool = False) -> Library:
    """The process-wide :class:`Library` over ComfyUI's ``loras`` folders.

    ``text_encoder`` defaults to :func:`default_text_encoder`; ``plain=True`` gives an index without
    encoders or signatures (resolving and details need no model, and its scan opens only headers).
    """
    encoder = None if plain else (text_encoder or default_text_encoder())
    key = _library_key(encoder)
    with _LOCK:
        library = _LIBRARIES.get(key)
        if library is None:
            if encoder is None:
                library = Library(key[0], list(key[1]))
            else:
                library = Library(key[0], list(key[1]), text_encoder=encoder, weight_signatures=True,
                                  weight_encoder=trained_weight_encoder(encoder))
            _LIBRARIES.put(key, library)
        elif encoder is not None:
            library.text_encoder = encoder  # same weights (same name); drop the reference to an older CLIP
    return library


def scan_library(library: Library, progress: ProgressCallback | None = None, wait: bool = True) -> ScanReport:
    """Scan ``library`` (one scan at a time per process; ``wait=False`` raises :class:`ScanBusy` instead)."""
    if not _SCAN_LOCK.acquire(blocking=wait):
        raise ScanBusy("a library scan is already running; wait for it to finish")
    try:
        report = library.scan(progress)
        _SCANNED.put(_library_key(library.text_encoder), True)
        logger.info("library scan: %d files, %d added, %d updated, %d removed, %d errors in %.2f s", report.total,
                    report.added, report.updated, report.removed, len(report.errors), report.seconds)
        return report
    finally:
        _SCAN_LOCK.release()


def ensure_scanned(library: Library, progress: ProgressCallback | None = None) -> ScanReport | None:
    """Scan once per process and library (incremental: an unchanged library costs a directory walk)."""
    if _library_key(library.text_encoder) in _SCANNED:
        return None
    return scan_library(library, progress)


def send_ui_event(event: str, payload: dict[str, Any]) -> None:
    """Broadcast ``event`` to the browser through ComfyUI's websocket (no-op outside the server)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, payload)


def ui_progress(also: Callable[[int, int], None] | None = None, interval: float = 0.25) -> ProgressCallback:
    """A scan progress callback sending ``loom.library.progress`` events (``done``, ``total``, ``file``) at
    most every ``interval`` seconds and at the end; ``also(done, total)`` sees every call (ComfyUI bars)."""
    last = [0.0]

    def progress(done: int, total: int, relpath: str) -> None:
        if also is not None:
            also(done, total)
        now = time.monotonic()
        if done >= total or now - last[0] >= interval:
            last[0] = now
            send_ui_event(PROGRESS_EVENT, {"done": done, "total": total, "file": relpath})

    return progress


# ------------------------------------------------------------------------------------------- resolving
def lora_file(name: str) -> str | None:
    """The LoRA ``name`` (relative to a loras folder) through the one confinement check, or ``None`` when no
    loras folder has it. Absolute names, ``..``, links leading outside and pickles raise ``OutsideFoldersError``."""
    from ..composition.comfy_bridge.model_files import model_file

    try:
        return model_file("loras", name)
    except FileNotFoundError:
        return None


def resolve_lora(name: str, sha256: str | None = None) -> str:
    """The file for a LoRA reference. With a sha256, the file must have that hash: a same-named file with other
    content is refused rather than silently used; a renamed file is found by hash through the library index.
    (The loader hashes the file again when it opens it: a pinned load never trusts a size/mtime shortcut.)"""
    path = lora_file(name)
    if path is not None and sha256:
        from ..composition.loading import cached_sha256

        actual = cached_sha256(path)
        if actual != sha256:
            found = find_by_hash(sha256, name)
            if found:
                logger.info("LoRA %r: %s has another hash; using %s which matches %s", name, path, found, sha256[:12])
                return found
            raise ValueError(f"LoRA {name!r}: the file {path} has sha256 {actual[:12]}…, but the workflow asks "
                             f"for {sha256[:12]}…; refusing to use a different LoRA")
    if path is not None:
        return path
    if sha256:
        found = find_by_hash(sha256, name)
        if found:
            logger.info("LoRA %r is not in your loras folders by that name; using %s, which has its sha256 %s",
                        name, found, sha256[:12])
            return found
    hint = f" (sha256 {sha256})" if sha256 else ""
    raise FileNotFoundError(f"LoRA {name!r}{hint} is not in your loras folders: {', '.join(lora_roots())}")


def _rescan_plain_library() -> None:
    scan_library(server_library(plain=True))


_RESCANS = RescanScheduler(_rescan_plain_library)


def request_rescan(wait: float | None = 0.0) -> bool:
    """Ask for the shared background rescan of the loras folders (see :class:`.rescan.RescanScheduler`);
    ``True`` when one finished within ``wait`` seconds, so a second lookup is worth it."""
    return _RESCANS.request(wait)


def find_by_hash(sha256: str, name: str | None = None, wait: float | None = None) -> str | None:
    """The file inside the loras folders whose content has ``sha256`` (same file name preferred), looked up
    in the index. When the index does not know it, the shared background rescan is requested (at most one at
    a time, throttled; see :mod:`.rescan`) and, if it finishes within ``wait`` seconds (``None``: however long
    it takes), looked up once more. Never a file with other content, never a file outside the folders."""
    library = server_library(plain=True)
    base = os.path.basename((name or "").replace("\\", "/")) or None
    found = library.resolve(base, sha256)
    if found is None and request_rescan(wait):
        found = library.resolve(base, sha256)
    if found is None:
        return None
    from ..composition.comfy_bridge.model_files import confined_model_path
    from ..files.folders import OutsideFoldersError

    try:
        return confined_model_path("loras", found)
    except (OutsideFoldersError, OSError):
        return None


def comfy_progress_bar() -> Callable[[int, int], None]:
    """``(done, total)`` → a ComfyUI progress bar on the running node, created when the total is first known."""
    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:
            import comfy.utils

            bars.append(comfy.utils.ProgressBar(max(total, 1)))
        bars[0].update_absolute(done, max(total, 1))

    return update


# ------------------------------------------------------------------------------------------ the node
@dataclass(frozen=True)
class LibraryPick:
    """What ``Loom Library Search`` outputs: LORA_STACK tuples, loaded LOOM_ADAPTERS entries, the hits text."""

    lora_stack: list[tuple[str, float, float]]
    entries: tuple[StackEntry, ...]
    hits: tuple[Hit, ...]
    text: str


def pick_summary(pick: LibraryPick) -> list[dict[str, Any]]:
    """What the node shows of its picks: file, title and fused score of each (JSON-ready)."""
    return [{"lora": h.relpath, "title": h.title or h.name, "score": round(h.score, 4)} for h in pick.hits]


def _tags(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def pick_adapters(prompt: str, top_k: int, strength: float, base_model: str = "", folder: str = "",
                  include_tags: str = "", exclude_tags: str = "", clip: Any = None,
                  rescan: bool = False) -> LibraryPick:
    """Search the library for ``prompt`` and load the best ``top_k`` adapters at ``strength``.

    Scans first on the first call of the process (and when ``rescan``), with a ComfyUI progress bar and
    ``loom.library.progress`` events. Each picked row carries the file's sha256, so a workflow saved from this
    run finds the same files on another machine.
    """
    from ..composition.comfy_bridge.stack import load_entries
    from ..composition.stack import StackRow

    library = server_library(clip_text_encoder(clip) if clip is not None else None)
    progress = ui_progress(also=comfy_progress_bar())
    if rescan:
        scan_library(library, progress)
    else:
        ensure_scanned(library, progress)
    filters = SearchFilters(base_model=base_model.strip(), folder=folder.strip(), tags_include=_tags(include_tags),
                            tags_exclude=_tags(exclude_tags))
    hits = tuple(library.search(prompt, top_k=top_k, filters=filters))
    rows = [StackRow(lora=h.relpath, strength=strength, sha256=h.sha256 or None) for h in hits]
    entries = tuple(load_entries(rows, resolve_lora))
    return LibraryPick(lora_stack=[(h.relpath, strength, strength) for h in hits], entries=entries, hits=hits,
                       text=hits_text(list(hits), prompt))


# ---------------------------------------------------------------------------------- compatibility
# Model loader node → the model folder its file-name widget reads (its value is what the frontend sends).
MODEL_LOADERS = {"UNETLoader": "diffusion_models", "CheckpointLoaderSimple": "checkpoints",
                 "CheckpointLoader": "checkpoints", "ImageOnlyCheckpointLoader": "checkpoints"}
PLAYGROUND_LOADER = "LoomPlaygroundModel"


def model_targets_for(loader: str, name: str = "") -> Targets:
    """The width and block counts of the model a loader node loads (``Targets()`` when the loader or its file
    is unknown); only files inside ComfyUI's configured model folders are read, and only their headers."""
    from .header import HeaderError, read_header

    if loader == PLAYGROUND_LOADER:
        from ..playground.model import MODEL_FILE

        path = str(MODEL_FILE) if MODEL_FILE.is_file() else None
    elif loader in MODEL_LOADERS and name:
        from ..composition.comfy_bridge.model_files import OutsideFoldersError, model_file

        try:
            path = model_file(MODEL_LOADERS[loader], name)
        except (OutsideFoldersError, FileNotFoundError) as exc:
            logger.info("model %s: %s", name, exc)
            path = None
    else:
        path = None
    if path is None:
        return Targets()
    try:
        header = read_header(path)
    except (HeaderError, OSError) as exc:
        logger.info("model %s: cannot read its header (%s)", name or loader, exc)
        return Targets()
    return model_targets({key: entry.shape for key, entry in header.tensors.items()})
