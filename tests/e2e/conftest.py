"""End-to-end tier: one real ComfyUI server per session on a free 127.0.0.1 port, started here, stopped after."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from loomdev.demo_loras import place_demo_loras
from loomdev.playground_loras import place_playground_loras
from loomdev.server import ComfyServer, prepare_workspace

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
sys.path.insert(0, str(Path(__file__).parent))  # browser.py


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """A fresh ComfyUI base directory for the session (pack linked, demo models and LoRAs placed)."""
    return prepare_workspace(tmp_path_factory.mktemp("comfy-workspace"))


@pytest.fixture(scope="session")
def comfy_server(workspace: Path):
    ARTIFACTS.mkdir(exist_ok=True)
    server = ComfyServer(workspace, log_path=ARTIFACTS / "comfyui-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def object_info(comfy_server) -> dict:
    return comfy_server.get_json("/object_info")


@pytest.fixture()
def loras_dir(workspace: Path) -> Path:
    """The server's loras folder (cleared of test files after each test; the demo and playground LoRAs stay)."""
    folder = workspace / "models" / "loras"
    yield folder
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    place_demo_loras(folder)
    place_playground_loras(folder)
