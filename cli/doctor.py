"""``loom doctor``: where ComfyUI is, its version, torch and device, model folders, whether our nodes register."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform

from ..comfy_env import PACK_DIR, ComfyNotFound, comfyui_version, find_comfyui, import_comfy
from ..version import __version__

log = logging.getLogger(__name__)

MODEL_KINDS = ("loras", "diffusion_models", "text_encoders", "vae", "checkpoints")


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("doctor", help="check the ComfyUI installation and this pack")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the one holding this pack)")
    p.add_argument("--base-directory", help="ComfyUI --base-directory (models, custom_nodes, user)")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(run=run)


def diagnose(comfyui: str | None = None, base_directory: str | None = None) -> dict:
    """Collect the report; ``ok`` is False when ComfyUI is missing or our nodes fail to register."""
    report: dict = {"pack": {"version": __version__, "path": str(PACK_DIR)}, "python": platform.python_version(),
                    "problems": []}
    try:
        import torch

        device = "cpu"
        if torch.cuda.is_available():
            device = f"cuda ({torch.cuda.get_device_name(0)})"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        report["torch"] = {"version": torch.__version__, "device": device, "cuda_build": torch.version.cuda}
    except ImportError:
        report["torch"] = None
        report["problems"].append("torch is not installed in this Python")
    try:
        path = find_comfyui(comfyui)
    except ComfyNotFound as err:
        report["comfyui"] = None
        report["problems"].append(str(err))
        report["ok"] = False
        return report
    report["comfyui"] = {"path": str(path), "version": comfyui_version(path)}
    import_comfy(path, cpu=not (report["torch"] or {}).get("device", "cpu").startswith("cuda"),
                 base_directory=base_directory)
    import folder_paths

    report["model_folders"] = {kind: folder_paths.get_folder_paths(kind) for kind in MODEL_KINDS}
    report["nodes"] = _registered_nodes(report)
    report["ok"] = not report["problems"]
    return report


def _registered_nodes(report: dict) -> list[str]:
    """Load the pack exactly as ComfyUI does (nodes.load_custom_node) and list the node ids it registered."""
    import nodes as comfy_nodes  # ComfyUI's top-level nodes module, not ours

    before = set(comfy_nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(comfy_nodes.load_custom_node(str(PACK_DIR)))
    ours = sorted(set(comfy_nodes.NODE_CLASS_MAPPINGS) - before)
    if not ok:
        report["problems"].append("ComfyUI failed to load the pack (see the log above)")
    elif not ours:
        report["problems"].append("the pack loaded but registered no nodes")
    elif any(not n.startswith("Loom") for n in ours):
        report["problems"].append(f"node ids without the Loom prefix: {[n for n in ours if not n.startswith('Loom')]}")
    return ours


def run(args: argparse.Namespace) -> int:
    report = diagnose(args.comfyui, args.base_directory)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1


def format_report(report: dict) -> str:
    lines = [f"LoRA Loom {report['pack']['version']}  ({report['pack']['path']})", f"Python    {report['python']}"]
    t = report.get("torch")
    lines.append(f"torch     {t['version']} on {t['device']}" if t else "torch     MISSING")
    c = report.get("comfyui")
    lines.append(f"ComfyUI   {c['version']}  ({c['path']})" if c else "ComfyUI   NOT FOUND")
    for kind, folders in report.get("model_folders", {}).items():
        lines.append(f"  {kind:<17} {', '.join(folders) or '-'}")
    if "nodes" in report:
        lines.append(f"nodes     {len(report['nodes'])} registered: {', '.join(report['nodes'])}")
    lines += [f"PROBLEM   {p}" for p in report["problems"]]
    lines.append("status    " + ("ok" if report["ok"] else "NOT OK"))
    return "\n".join(lines)
