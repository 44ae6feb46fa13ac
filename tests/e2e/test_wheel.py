"""The wheel a user builds from this checkout installs a working pack: built from the checkout's files (tracked and
new, not ignored) without the network, installed ``--no-deps`` into a scratch venv that sees the test
environment's packages (torch, safetensors, ComfyUI's requirements) but not this checkout, then ``loom --version``,
``loom inspect`` on a LoRA written here, and an import of every module of the installed package (ComfyUI found
by the installed pack's own ``comfy_env``)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lora_factory import FluxDims, build_lora, save_case
from lora_loom.comfy_env import find_comfyui
from lora_loom.version import __version__

REPO = Path(__file__).resolve().parents[2]

IMPORT_EVERY_MODULE = r"""
import importlib, json, pkgutil, sys
from pathlib import Path

import lora_loom
from lora_loom.comfy_env import find_comfyui, import_comfy

root = Path(lora_loom.__file__).parent
import_comfy(find_comfyui(), cpu=True, base_directory=sys.argv.pop())
failed = {}
names = [m.name for m in pkgutil.walk_packages(lora_loom.__path__, "lora_loom.",
                                               onerror=lambda name: failed.setdefault(name, "walk failed"))]
for name in names:
    try:
        importlib.import_module(name)
    except BaseException as exc:  # every failure is reported (a SystemExit too), not only the first
        failed[name] = f"{type(exc).__name__}: {exc}"
data = {folder: sorted(p.name for p in (root / folder).glob("*") if p.is_file())
        for folder in ("web", "example_workflows", "playground/weights", "playground/weights/loras")}
print(json.dumps({"root": str(root), "modules": names, "failed": failed, "data": data}))
"""


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    return proc


def checkout_copy(dest: Path) -> Path:
    """The files a clone of this checkout would have, plus new ones not ignored (so uncommitted work is built)."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def site_dirs() -> list[str]:
    """This environment's package folders except the one holding this checkout's editable install."""
    dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    return [p for p in dirs if not any(Path(p).glob("__editable__*lora_loom*"))]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A scratch venv with the wheel installed; returns its bin/ folder."""
    work = tmp_path_factory.mktemp("wheel")
    source = checkout_copy(work / "source")
    run([sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", work / "dist", source])
    wheel = next((work / "dist").glob("lora_loom-*.whl"))
    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(purelib) / "_test_env.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in site_dirs()))
    run([python, "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--no-index", wheel])
    return venv / "bin"


def test_loom_version(installed):
    assert run([installed / "loom", "--version"]).stdout.split() == ["lora-loom", __version__]


def test_loom_inspect_on_a_fixture(installed, tmp_path):
    lora = save_case(build_lora("kohya", "lora", FluxDims()), tmp_path / "fixture_kohya.safetensors")
    report = json.loads(run([installed / "loom", "inspect", "--json", lora], cwd=tmp_path).stdout)
    assert report["format"] == "kohya" and report["modules"] and not report["leftover_keys"]


def test_every_module_imports_from_the_installed_package(installed, tmp_path):
    env = {"PATH": str(installed), "COMFYUI_PATH": str(find_comfyui()), "HOME": str(tmp_path)}
    proc = run([installed / "python", "-c", IMPORT_EVERY_MODULE, tmp_path / "comfy-base"], cwd=tmp_path, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["root"]).is_relative_to(installed.parent), result["root"]  # not this checkout
    assert not result["failed"], result["failed"]
    shipped = {m.removeprefix("lora_loom.") for m in result["modules"]}
    expected = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                for folder in ("composition", "retrieval", "kernels", "files", "nodes", "cli", "bench", "playground")
                for p in (REPO / folder).rglob("*.py")}
    assert expected <= shipped, sorted(expected - shipped)
    data = result["data"]
    for folder in ("web", "example_workflows", "playground/weights", "playground/weights/loras"):
        assert data[folder] == sorted(p.name for p in (REPO / folder).glob("*") if p.is_file()), folder
