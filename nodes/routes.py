"""HTTP routes of the library panel on ComfyUI's server (aiohttp through ``PromptServer``). Thin: each handler
parses the query, runs one library call in a worker thread (SQLite and file reads never block the event
loop) and answers JSON. A reference (``ref``) is a sha256 or a path relative to a loras folder; absolute
paths, ``..`` segments and files outside the loras folders are refused with 400/404.

    GET  /loom/library/search?q=&k=&base_model=&folder=&include=&exclude=&loader=&model=&fits_only=
                             &writer=&variant=
    GET  /loom/library/details?ref=
    GET  /loom/library/preview?ref=
    POST /loom/library/rescan
    GET  /loom/library/resolve?name=&sha256=
    GET  /loom/library/fit?loader=&model=&refs=        which LoRAs fit the model a loader node loads
    GET  /loom/check/rule_blocks?spec=                  Loom Compose's rule_blocks checked while editing

``loader`` is the type of the node that loads the model (``UNETLoader``, ``CheckpointLoaderSimple``,
``LoomPlaygroundModel``) and ``model`` its file name; only headers inside the model folders are read.
"""
from __future__ import annotations

import asyncio
import logging
import mimetypes
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ..composition.comfy_bridge.model_files import confined_model_path
from ..composition.comfy_bridge.regional import parse_rule_blocks
from ..composition.plan import PlanError
from ..files.folders import OutsideFoldersError, relative_name
from ..retrieval.comfy_bridge import (
    PROGRESS_EVENT,
    ScanBusy,
    ensure_scanned,
    lora_file,
    model_targets_for,
    request_rescan,
    scan_library,
    send_ui_event,
    server_library,
    ui_progress,
)
from ..retrieval.explain import details_json, hit_json, scan_report_json
from ..retrieval.search import Hit, SearchFilters
from ..retrieval.targets import Targets, fit

logger = logging.getLogger(__name__)

PREFIX = "/loom/library"
MAX_TOP_K = 200
MAX_REFERENCE = 1024
RESOLVE_WAIT_S = 20.0
PREVIEW_TYPES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


class RouteError(Exception):
    """An answer other than 200: ``status`` and a message naming what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _reference(value: str | None, field: str = "ref") -> str:
    """A sha256 or a root-relative path; absolute paths and ``..`` are refused (400)."""
    ref = (value or "").strip()
    if not ref:
        raise RouteError(400, f"missing query parameter {field!r}")
    if len(ref) > MAX_REFERENCE:
        raise RouteError(400, f"{field} is {len(ref)} characters long (at most {MAX_REFERENCE})")
    try:
        relative_name(ref, field)
    except OutsideFoldersError:
        raise RouteError(400, f"{field} {ref[:200]!r} must be a sha256 or a path relative to a loras folder "
                              "(no absolute paths, no '..')") from None
    return ref


def _tags(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def _preview_url(ref: str) -> str:
    return f"{PREFIX}/preview?ref={urllib.parse.quote(ref)}"


def _model(query: dict[str, str]) -> Targets | None:
    """The targets of the model the query's ``loader``/``model`` name, or ``None`` when no loader is given."""
    loader = (query.get("loader") or "").strip()
    if not loader:
        return None
    name = (query.get("model") or "").strip()
    if name:
        _reference(name, "model")
    return model_targets_for(loader, name)


def _fit_json(targets: Targets, model: Targets | None) -> dict[str, Any] | None:
    if model is None:
        return None
    found = fit(targets, model)
    return {"ok": found.ok, "reason": found.reason}


def search(query: dict[str, str]) -> dict[str, Any]:
    """Search hits as JSON (the library is scanned first if this process has not scanned it yet). With a
    model (``loader``/``model``) every hit says whether it fits it, and ``fits_only=1`` keeps those that do.
    When a query matches nothing, ``closest`` lists the nearest LoRAs below the relevance floor."""
    try:
        top_k = int(query.get("k") or 20)
    except ValueError:
        raise RouteError(400, f"k must be an integer, got {query.get('k')!r}") from None
    if not 1 <= top_k <= MAX_TOP_K:
        raise RouteError(400, f"k must be between 1 and {MAX_TOP_K}, got {top_k}")
    folder = query.get("folder") or ""
    if folder:
        _reference(folder, "folder")
    library = server_library()
    ensure_scanned(library, ui_progress())
    filters = SearchFilters(base_model=query.get("base_model") or "", folder=folder,
                            tags_include=_tags(query.get("include")), tags_exclude=_tags(query.get("exclude")),
                            writer=query.get("writer") or "", flux_variant=query.get("variant") or "")
    model = _model(query)
    fits_only = model is not None and query.get("fits_only") in ("1", "true")
    text = query.get("q") or ""

    def answer(hits: list[Hit]) -> list[dict[str, Any]]:
        out = []
        for h in hits:
            item = hit_json(h, _preview_url(h.sha256 or h.relpath) if h.preview else None)
            item["fit"] = _fit_json(h.targets, model)
            if not (fits_only and item["fit"] and item["fit"]["ok"] is False):
                out.append(item)
        return out

    # fit is known per hit, not in the index query: with fits_only, rank deeper and keep the first top_k that fit
    hits = answer(library.search(text, top_k=top_k + (MAX_TOP_K if fits_only else 0), filters=filters))[:top_k]
    closest = answer(library.search(text, top_k=3, filters=filters, floor=False)) if not hits and text.strip() else []
    return {"query": text, "hits": hits, "closest": closest,
            "model": model.describe() if model is not None else None}


def fit_loras(query: dict[str, str]) -> dict[str, Any]:
    """For each of ``refs`` (comma-separated names as in a stack's rows): whether it fits the model."""
    model = _model(query)
    if model is None:
        raise RouteError(400, "pass loader= (the model loader node's type) and model= (its file name)")
    refs = [_reference(r, "refs") for r in (query.get("refs") or "").split(",") if r.strip()]
    library = server_library(plain=True)
    ensure_scanned(library, ui_progress())
    fits = {}
    for ref in refs:
        found = library.details(ref)
        fits[ref] = _fit_json(found.targets if found else Targets(), model) | {
            "targets": found.targets.describe() if found else "not in the library index"}
    return {"model": model.describe(), "fits": fits}


def check_rule_blocks(query: dict[str, str]) -> dict[str, Any]:
    """Whether a ``rule_blocks`` spec reads (Loom Compose's own parser): ``{"ok": true}`` or the message."""
    try:
        parse_rule_blocks(query.get("spec") or "")
    except PlanError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True}


def details(query: dict[str, str]) -> dict[str, Any]:
    """Header metadata and sidecar facts of one adapter; a file in the loras folders not yet indexed gets
    its sha256 (what the stack editor needs) and ``indexed: false``."""
    ref = _reference(query.get("ref"))
    library = server_library(plain=True)
    found = library.details(ref)
    if found is None:
        from ..composition.loading import cached_sha256

        try:
            path = lora_file(ref)
        except OutsideFoldersError:  # a link leading outside, a pickle: not ours to describe
            path = None
        if path is None:
            raise RouteError(404, f"no LoRA {ref!r} in the library or in your loras folders")
        return {"lora": ref.replace("\\", "/"), "sha256": cached_sha256(path), "indexed": False}
    return details_json(found, _preview_url(found.sha256 or found.relpath) if found.preview else None)


def preview(query: dict[str, str]) -> tuple[bytes, str]:
    """The preview image's bytes and content type; only images inside the loras folders."""
    ref = _reference(query.get("ref"))
    path = server_library(plain=True).preview_path(ref)
    try:
        if path is None:
            raise FileNotFoundError(ref)
        shown = confined_model_path("loras", path, PREVIEW_TYPES)
    except (OutsideFoldersError, OSError):
        raise RouteError(404, f"no preview image for {ref!r}") from None
    return Path(shown).read_bytes(), mimetypes.guess_type(shown)[0] or "application/octet-stream"


def rescan(_: dict[str, str]) -> dict[str, Any]:
    """Scan now (409 while another scan runs); progress goes out as ``loom.library.progress`` events."""
    try:
        report = scan_library(server_library(), ui_progress(), wait=False)
    except ScanBusy as exc:
        raise RouteError(409, str(exc)) from None
    result = scan_report_json(report)
    send_ui_event(PROGRESS_EVENT, {"done": report.total, "total": report.total, "file": "", "finished": True})
    return result


def resolve(query: dict[str, str]) -> dict[str, Any]:
    """Which local file a shared workflow's ``name`` + ``sha256`` means (404 naming both when none)."""
    name = query.get("name") or ""
    sha256 = (query.get("sha256") or "").strip().lower()
    if not name and not sha256:
        raise RouteError(400, "pass name= and/or sha256=")
    if name:
        _reference(name, "name")
    library = server_library(plain=True)
    try:
        found = library.resolve(name or None, sha256 or None)
        if found is None and sha256 and request_rescan(RESOLVE_WAIT_S):  # one shared, throttled rescan
            found = library.resolve(name or None, sha256)
        confined = confined_model_path("loras", found) if found is not None else None
    except (OutsideFoldersError, OSError):
        confined = None
    except ValueError as exc:
        raise RouteError(400, str(exc)) from None
    if confined is None:
        what = f"{name!r}" + (f" with sha256 {sha256}" if sha256 else "")
        raise RouteError(404, f"no file in your loras folders matches {what}")
    for root in library.roots:
        if str(found).startswith(root.rstrip(os.sep) + os.sep):
            relpath = os.path.relpath(found, root).replace(os.sep, "/")
            break
    else:
        relpath = os.path.basename(found)
    entry = library.details(relpath)
    return {"lora": relpath, "sha256": entry.sha256 if entry else sha256, "renamed": bool(name) and relpath != name}


async def _answer(call: Callable[[dict[str, str]], Any], request: web.Request) -> web.StreamResponse:
    query = dict(request.query)
    try:
        result = await asyncio.to_thread(call, query)
    except RouteError as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except Exception as exc:  # logged with its traceback; the panel gets JSON naming the failure, not HTML
        logger.exception("library route %s failed", request.path)
        return web.json_response({"error": f"{request.path} failed: {type(exc).__name__}: {exc}"}, status=500)
    if isinstance(result, tuple):
        body, content_type = result
        return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "max-age=60"})
    return web.json_response(result)


_registered: list[object] = []


def register() -> bool:
    """Add the library routes to ComfyUI's server; idempotent. Call it while the pack loads (ComfyUI 0.3.75
    never calls ``ComfyExtension.on_load``; ``get_node_list`` runs before the server adds its routes).
    Returns False (and does nothing) where no server runs, e.g. when a test loads the pack in-process."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        logger.debug("no PromptServer: library routes not registered")
        return False
    if instance in _registered:
        return True
    _registered.append(instance)
    routes = instance.routes
    for method, path, call in (("GET", f"{PREFIX}/search", search), ("GET", f"{PREFIX}/details", details),
                               ("GET", f"{PREFIX}/preview", preview), ("POST", f"{PREFIX}/rescan", rescan),
                               ("GET", f"{PREFIX}/resolve", resolve), ("GET", f"{PREFIX}/fit", fit_loras),
                               ("GET", "/loom/check/rule_blocks", check_rule_blocks)):
        async def handler(request: web.Request, call: Callable[[dict[str, str]], Any] = call) -> web.StreamResponse:
            return await _answer(call, request)

        routes.route(method, path)(handler)
    logger.debug("library routes registered under %s", PREFIX)
    return True
