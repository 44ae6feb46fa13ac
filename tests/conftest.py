"""Test tiers by folder: tests/unit (pure), tests/bridge (in-process ComfyUI), tests/e2e (real server, browser).

The pack is loaded under the fixed name ``lora_loom`` the way ComfyUI loads a custom node folder
(``spec_from_file_location`` with ``submodule_search_locations``), so tests import ``lora_loom.<module>``.
The repository root is never put on ``sys.path``: its ``nodes/`` folder must not shadow ComfyUI's ``nodes``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "lora_loom"
# ComfyUI used by the bridge and e2e tiers: a user's own ($COMFYUI_PATH) or the one dev/bootstrap.sh installed.
COMFYUI = Path(os.environ.get("COMFYUI_PATH") or REPO / ".loom" / "comfyui").resolve()

# `python -m pytest` puts the working directory (the repo root) on sys.path, where our nodes/ would shadow
# ComfyUI's top-level `nodes`. Remove it: the pack is only ever reached as `lora_loom`.
sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != REPO]

# Shared test factories (lora_factory, comfy_models, ...) live in tests/ and are imported by name.
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))


def load_pack() -> object:
    """Load the repository as the package ``lora_loom`` (idempotent)."""
    if PACK_NAME in sys.modules and Path(sys.modules[PACK_NAME].__file__).resolve() == REPO / "__init__.py":
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


load_pack()

_TIERS = {"unit", "bridge", "e2e"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its tier, taken from its folder (tests/<tier>/...)."""
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(REPO / "tests").parts
        if parts and parts[0] in _TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
