"""The pack's shape: pure layers import without ComfyUI, the entry module exports only what ComfyUI reads,
versions agree, pyproject carries the registry fields."""
import ast
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
PURE = ("composition", "kernels", "retrieval")

PROBE = r"""
import importlib, importlib.util, pkgutil, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("lora_loom", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec); sys.modules["lora_loom"] = pack; spec.loader.exec_module(pack)
try:
    import comfy  # noqa
    raise SystemExit("ComfyUI is importable in the probe; the test would prove nothing")
except ImportError:
    pass
names = []
for layer in sys.argv[2:]:
    pkg = importlib.import_module("lora_loom." + layer)
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if info.name.endswith("comfy_bridge") or ".comfy_bridge." in info.name:
            continue
        importlib.import_module(info.name); names.append(info.name)
bad = [m for m in sys.modules if m == "comfy" or m.startswith(("comfy.", "comfy_api", "folder_paths"))]
print(len(names), "modules;", "comfy modules:", bad)
raise SystemExit(1 if bad else 0)
"""


def test_pure_layers_import_with_comfyui_absent(tmp_path):
    proc = subprocess.run([sys.executable, "-I", "-c", PROBE, str(REPO), *PURE], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    count = int(proc.stdout.split()[0])
    assert count >= 5, proc.stdout


def test_pure_layers_never_import_comfy_outside_their_bridges():
    offenders = []
    for layer in PURE:
        for path in (REPO / layer).rglob("*.py"):
            if "comfy_bridge" in path.parts or path.name == "comfy_bridge.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                              if n.split(".")[0] in ("comfy", "comfy_api", "folder_paths", "nodes", "server")]
    assert not offenders


def test_entry_module_exports_only_what_comfyui_reads():
    tree = ast.parse((REPO / "__init__.py").read_text())
    top = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    top |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    assert top == {"WEB_DIRECTORY", "comfy_entrypoint"}
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body), "entry module imports eagerly"


def test_versions_and_registry_fields_agree():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    from lora_loom.version import __version__

    assert project["project"]["name"] == "lora-loom"
    assert project["project"]["version"] == __version__
    comfy = project["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "includes", "web"} <= set(comfy)
    assert (REPO / comfy["web"]).is_dir()
    assert "torch" not in " ".join(project["project"]["dependencies"]), "ComfyUI owns torch"
