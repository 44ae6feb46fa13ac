"""Readers for the files other tools leave beside a LoRA: ``<name>.civitai.info`` (civitai helper),
``<name>.metadata.json`` (LoRA Manager), ``<name>.rgthree-info.json`` (rgthree), ``<name>.txt`` (free notes),
``<name>.sha256`` and same-named preview images.

A sidecar that cannot be parsed does not stop indexing; its problem is returned with the file name and the
offending field so the library can show it (``details().problems``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ..files.json_text import parse_json
from .metadata import AdapterFacts, clean_text, normalise_sha256, split_words

logger = logging.getLogger(__name__)

MAX_SIDECAR_BYTES = 16 * 1024 * 1024
PREVIEW_SUFFIXES = (".preview.png", ".preview.jpg", ".preview.jpeg", ".preview.webp",
                    ".png", ".jpg", ".jpeg", ".webp")
SIDECAR_KINDS = ("civitai.info", "metadata.json", "rgthree-info.json", "txt", "sha256")


@dataclass(frozen=True)
class SidecarSet:
    """File names (not paths) of the sidecars found beside one adapter, by kind; ``preview`` may be ``""``."""

    files: dict[str, str]
    preview: str

    def names(self) -> tuple[str, ...]:
        """Every sidecar file name, previews included, in a stable order (for change detection)."""
        return tuple(sorted(self.files.values())) + ((self.preview,) if self.preview else ())


def find_sidecars(file_name: str, directory_names: Collection[str]) -> SidecarSet:
    """Sidecars of ``file_name`` among ``directory_names`` (one listing per folder, no extra syscalls).

    Both ``x.civitai.info`` and ``x.safetensors.civitai.info`` spellings are accepted (tools differ).
    """
    stem = file_name.rsplit(".", 1)[0] if "." in file_name else file_name
    files: dict[str, str] = {}
    for kind in SIDECAR_KINDS:
        for base in (stem, file_name):
            candidate = f"{base}.{kind}"
            if candidate in directory_names:
                files[kind] = candidate
                break
    preview = next((stem + suffix for suffix in PREVIEW_SUFFIXES if stem + suffix in directory_names), "")
    return SidecarSet(files=files, preview=preview)


def _read_json(path: str) -> dict:
    with open(path, "rb") as fh:
        raw = fh.read(MAX_SIDECAR_BYTES + 1)
    if len(raw) > MAX_SIDECAR_BYTES:
        raise ValueError(f"{path}: sidecar larger than {MAX_SIDECAR_BYTES} bytes")
    parsed = parse_json(raw.removeprefix(b"\xef\xbb\xbf"), path)
    if not isinstance(parsed, dict):
        raise ValueError(f"{path}: top level is a JSON {type(parsed).__name__}, expected an object")
    return parsed


def _civitai_sha256(info: dict) -> str:
    """SHA256 of the model file among ``files[].hashes`` (prefer ``primary``/type ``Model``)."""
    files = [f for f in info.get("files") or [] if isinstance(f, dict)]
    files.sort(key=lambda f: (not f.get("primary", False), f.get("type", "Model") != "Model"))
    for entry in files:
        hashes = entry.get("hashes") or {}
        if isinstance(hashes, dict):
            digest = normalise_sha256(hashes.get("SHA256") or hashes.get("sha256") or "")
            if digest:
                return digest
    return ""


def _civitai_facts(info: dict, source: str) -> AdapterFacts:
    """Facts from a civitai model-version object (as saved by civitai helpers and nested by LoRA Manager)."""
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    return AdapterFacts(
        source=source,
        name=str(model.get("name") or info.get("name") or "").strip(),
        title=str(info.get("name") or "").strip() if model.get("name") else "",
        description=clean_text(model.get("description") or info.get("description") or ""),
        base_model=str(info.get("baseModel") or "").strip(),
        trigger_words=split_words(info.get("trainedWords") or []),
        tags=split_words(model.get("tags") or info.get("tags") or []),
        declared_sha256=_civitai_sha256(info),
    )


def read_civitai_info(path: str) -> AdapterFacts:
    """``<name>.civitai.info``: model name, trainedWords, baseModel, tags, description, files[].hashes.SHA256."""
    return _civitai_facts(_read_json(path), "civitai.info")


def read_lora_manager(path: str) -> AdapterFacts:
    """``<name>.metadata.json`` (LoRA Manager): ``model_name``, ``base_model``, ``sha256``, ``tags``, ``notes``,
    ``modelDescription`` and the civitai version object under ``civitai``."""
    info = _read_json(path)
    civitai = info.get("civitai") if isinstance(info.get("civitai"), dict) else {}
    nested = _civitai_facts(civitai, "metadata.json") if civitai else AdapterFacts(source="metadata.json")
    return AdapterFacts(
        source="metadata.json",
        name=str(info.get("model_name") or "").strip() or nested.name,
        title=nested.title,
        description=clean_text(info.get("modelDescription") or "") or nested.description,
        base_model=str(info.get("base_model") or "").strip() or nested.base_model,
        trigger_words=split_words(list(split_words(info.get("trainedWords") or [])) + list(nested.trigger_words)),
        tags=split_words(list(split_words(info.get("tags") or [])) + list(nested.tags)),
        notes=clean_text(info.get("notes") or ""),
        declared_sha256=normalise_sha256(info.get("sha256") or "") or nested.declared_sha256,
    )


def read_rgthree_info(path: str) -> AdapterFacts:
    """``<name>.rgthree-info.json``: ``name``, ``baseModel``, ``sha256``, ``trainedWords`` (``[{"word": ..}]``),
    ``userNote`` and the raw civitai object under ``raw.civitai``."""
    info = _read_json(path)
    raw = info.get("raw") if isinstance(info.get("raw"), dict) else {}
    civitai = raw.get("civitai") if isinstance(raw.get("civitai"), dict) else {}
    nested = _civitai_facts(civitai, "rgthree-info.json") if civitai else AdapterFacts(source="rgthree-info.json")
    return AdapterFacts(
        source="rgthree-info.json",
        name=str(info.get("name") or "").strip() or nested.name,
        title=nested.title,
        description=nested.description,
        base_model=str(info.get("baseModel") or "").strip() or nested.base_model,
        trigger_words=split_words(list(split_words(info.get("trainedWords") or [])) + list(nested.trigger_words)),
        tags=split_words(list(split_words(info.get("tags") or [])) + list(nested.tags)),
        notes=clean_text(info.get("userNote") or ""),
        declared_sha256=normalise_sha256(info.get("sha256") or "") or nested.declared_sha256,
    )


def read_notes(path: str) -> AdapterFacts:
    """``<name>.txt``: free text (often trigger words or usage notes), indexed as notes."""
    with open(path, "rb") as fh:
        text = fh.read(MAX_SIDECAR_BYTES).decode("utf-8", errors="replace")
    return AdapterFacts(source="txt", notes=clean_text(text))


def read_sha256_file(path: str) -> AdapterFacts:
    """``<name>.sha256``: a hex digest, optionally followed by a file name (``sha256sum`` output)."""
    with open(path, "rb") as fh:
        text = fh.read(4096).decode("utf-8", errors="replace")
    digest = normalise_sha256(text)
    if not digest:
        raise ValueError(f"{path}: does not start with a 64-hex SHA-256 digest")
    return AdapterFacts(source="sha256", declared_sha256=digest)


SIDECAR_READERS: dict[str, Callable[[str], AdapterFacts]] = {
    "civitai.info": read_civitai_info,
    "metadata.json": read_lora_manager,
    "rgthree-info.json": read_rgthree_info,
    "txt": read_notes,
    "sha256": read_sha256_file,
}


def read_sidecars(directory: str, sidecars: SidecarSet) -> tuple[list[AdapterFacts], list[str]]:
    """Read every sidecar in ``sidecars``; returns the facts and the problems (one line per bad file)."""
    facts: list[AdapterFacts] = []
    problems: list[str] = []
    for kind, name in sidecars.files.items():
        try:
            facts.append(SIDECAR_READERS[kind](os.path.join(directory, name)))
        except (OSError, ValueError) as exc:
            problems.append(str(exc))
        except Exception as exc:  # a sidecar of an unexpected shape costs its facts, never the LoRA's row
            logger.warning("sidecar %s: %s: %s", name, type(exc).__name__, exc)
            problems.append(f"{name}: unreadable ({type(exc).__name__}: {exc})"[:300])
    return facts, problems
