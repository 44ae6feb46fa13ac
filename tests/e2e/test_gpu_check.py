"""bench/gpu_check.sh end to end on the CPU (``--tiny``): the script a GPU machine runs is checked here first, so
GPU minutes are spent measuring, not debugging."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METHODS = {"base", "merged", "regional", "regional_noblend", "gates", "hooks", "composite", "dense_per_head"}


def test_gpu_check_runs_every_step_at_tiny_size(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, LOOM_PYTHON=sys.executable)  # the tier's own ComfyUI runtime (0.3.75 or 0.33)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--tiny", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "all steps passed" in summary and summary.count(": exit 0 in") == 3, summary
    suite = ET.parse(out / "kernels.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 10 and suite.get("failures") == "0" and suite.get("errors") == "0"
    for folder in ("perf-64", "dynamic"):
        with open(out / folder / "perf.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        measured = {r["method"] for r in rows if float(r["step_ms"]) > 0}
        assert measured == (METHODS if folder == "perf-64" else {"base", "merged"}), rows
        assert (out / folder / "perf.png").stat().st_size > 1000
    env_txt = (out / "env.txt").read_text()
    assert "torch" in env_txt and "16 registered" in env_txt
