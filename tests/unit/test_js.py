"""The web extensions' DOM-free logic, tested with Node's own test runner (tests live outside web/, because
ComfyUI loads every .js file in web/)."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_node_test_runner_passes_for_web_logic():
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is required for the web logic tests (apt-get install nodejs)")
    files = sorted(str(p) for p in (REPO / "tests" / "js").glob("*.test.mjs"))
    assert files
    proc = subprocess.run([node, "--test", *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# fail 0" in proc.stdout
