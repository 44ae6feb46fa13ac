"""The `loom` command line as installed in the dev venv."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from loomdev.paths import comfyui_path

REPO = Path(__file__).resolve().parents[2]
LOOM = shutil.which("loom", path=str(Path(sys.executable).parent))


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([LOOM, *args], capture_output=True, text=True, timeout=300, **kw)


def test_version():
    from lora_loom.version import __version__

    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"lora-loom {__version__}"


def test_doctor_reports_comfyui_version_and_registered_nodes(workspace, comfy_server):
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path()))
    proc = run("doctor", "--json", "--base-directory", str(workspace), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and not report["problems"]
    assert report["comfyui"]["path"] == str(comfyui_path())
    # the version the ComfyUI server itself reports (0.3.75 or 0.33.0 in this project's runs)
    assert report["comfyui"]["version"] == comfy_server.get_json("/system_stats")["system"]["comfyui_version"]
    assert report["torch"]["version"].startswith("2.")
    assert "LoomLoraStack" in report["nodes"]
    assert report["model_folders"]["loras"] == [str(workspace / "models" / "loras")]


def test_doctor_without_comfyui_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["COMFYUI_PATH"] = str(tmp_path)
    proc = run("doctor", env=env)
    assert proc.returncode == 1
    assert "not a ComfyUI folder" in proc.stdout


def test_python_dash_m_from_custom_nodes(workspace):
    """`python -m lora-loom doctor` from ComfyUI/custom_nodes, as a user without the console script would."""
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path()))
    proc = subprocess.run([sys.executable, "-m", "lora-loom", "--version"], cwd=workspace / "custom_nodes",
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("lora-loom ")


def test_comfy_cli_validates_the_pack():
    comfy = shutil.which("comfy", path=str(Path(sys.executable).parent))
    proc = subprocess.run([comfy, "--skip-prompt", "node", "validate"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validation checks passed" in proc.stdout + proc.stderr


def test_comfy_node_pack_ships_only_the_pack(tmp_path):
    """`comfy node pack` zips tracked files honouring .comfyignore: no dev tooling, tests or CI in the archive."""
    import zipfile

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    comfy = shutil.which("comfy", path=str(Path(sys.executable).parent))
    proc = subprocess.run([comfy, "--skip-prompt", "node", "pack"], cwd=clone, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with zipfile.ZipFile(clone / "node.zip") as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {"__init__.py", "pyproject.toml", "nodes", "composition", "web", "example_workflows"} <= tops
    assert not tops & {"dev", "tests", ".ci", "Makefile", ".loom"}, tops
