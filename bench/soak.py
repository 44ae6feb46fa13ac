"""``loom bench soak``: does one ComfyUI server's memory stay bounded while it works?

On one real server (ComfyUI's ``main.py``, a throw-away base directory with this pack in ``custom_nodes``):

1. **workflow** — the same workflow queued ``runs`` times (the playground Flux with two concept LoRAs through
   ``Loom LoRA Stack``, sampled and decoded; only the seed changes, as when a user presses Queue again);
2. **library** — ``Loom Library Search`` loading ``loras`` generated LoRAs (``lora_mib`` each), ``group`` at a
   time through tag filters, every LoRA loaded twice over two rounds.

The server's RSS is read after every prompt. The bound: after warm-up (the first ``warmup`` runs of each phase),
RSS stays below the warm-up RSS plus the adapter cache's bound (``LOOM_ADAPTER_CACHE_MB``, set for the server)
plus ``slack_mib`` for allocator noise. Without a bounded cache the library phase alone would hold every LoRA
(``loras`` x ``lora_mib``) for the life of the server.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..comfy_env import PACK_DIR
from .comfy_server import ComfyServer

logger = logging.getLogger(__name__)

PLAYGROUND_LORAS = ("playground_ring.safetensors", "playground_stripes.safetensors")
PROMPT = "a red ring on the left and a blue striped square on the right"
HIDDEN = 3072
MIB = 1 << 20


@dataclass(frozen=True)
class SoakConfig:
    """What the soak runs; ``validate`` names a bad field."""

    runs: int = 24
    loras: int = 200
    group: int = 25
    lora_mib: float = 1.5
    cache_mib: int = 96
    warmup: int = 2
    steps: int = 4
    slack_mib: int = 192

    def validate(self) -> SoakConfig:
        for name, low in (("runs", self.warmup + 1), ("loras", 1), ("group", 1), ("cache_mib", 1), ("warmup", 1),
                          ("steps", 1), ("slack_mib", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"soak: {name} must be at least {low}, got {getattr(self, name)}")
        if not 0.05 <= self.lora_mib <= 64:
            raise ValueError(f"soak: lora_mib must lie in [0.05, 64], got {self.lora_mib}")
        if self.group > 50:
            raise ValueError(f"soak: group must be at most 50 (Loom Library Search's top_k), got {self.group}")
        return self

    @property
    def groups(self) -> int:
        return (self.loras + self.group - 1) // self.group


@dataclass
class PhaseResult:
    """RSS samples (MiB) of one phase, one per prompt, and its seconds."""

    name: str
    samples: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class SoakReport:
    config: SoakConfig
    start_mib: float
    phases: tuple[PhaseResult, ...]
    bound_mib: float

    @property
    def peak_after_warmup_mib(self) -> float:
        return max(s for p in self.phases for s in p.samples[self.config.warmup:])

    @property
    def met(self) -> bool:
        return self.peak_after_warmup_mib <= self.bound_mib


def write_library(folder: Path, config: SoakConfig) -> list[str]:
    """``config.loras`` kohya LoRAs of about ``lora_mib`` each on Flux's double-block qkv layers, tagged
    ``soakgroupN`` by groups of ``config.group``; returns their tags."""
    folder.mkdir(parents=True, exist_ok=True)
    module_bytes = 4 * (4 * HIDDEN + 3 * HIDDEN * 4)  # float32 down [4, 3072] + up [9216, 4]
    modules = max(1, round(config.lora_mib * MIB / module_bytes))
    tags = []
    for i in range(config.loras):
        gen = torch.Generator().manual_seed(zlib.crc32(f"soak{i}".encode()))
        tensors: dict[str, torch.Tensor] = {}
        for m in range(modules):
            key = f"lora_unet_double_blocks_{m % 19}_{'img' if m < 19 else 'txt'}_attn_qkv"
            tensors[f"{key}.lora_down.weight"] = torch.randn(4, HIDDEN, generator=gen) * 0.01
            tensors[f"{key}.lora_up.weight"] = torch.randn(3 * HIDDEN, 4, generator=gen) * 0.01
            tensors[f"{key}.alpha"] = torch.tensor(4.0)
        tag = f"soakgroup{i // config.group}"
        tags.append(tag)
        save_file(tensors, str(folder / f"soak_{i:03d}.safetensors"), metadata={
            "ss_output_name": f"soak lora {i}", "modelspec.tags": tag})
    return sorted(set(tags))


def prepare(workspace: Path, config: SoakConfig) -> list[str]:
    """A ComfyUI base directory with this pack linked in, the playground LoRAs and the generated library."""
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models/loras"):
        (workspace / sub).mkdir(parents=True, exist_ok=True)
    (workspace / "custom_nodes" / "lora-loom").symlink_to(PACK_DIR)
    for name in PLAYGROUND_LORAS:
        shutil.copyfile(PACK_DIR / "playground" / "weights" / "loras" / name, workspace / "models" / "loras" / name)
    return write_library(workspace / "models" / "loras" / "soak", config)


def workflow_prompt(seed: int, steps: int) -> dict:
    """The playground Flux with two concept LoRAs merged by Loom LoRA Stack, sampled and decoded (API format)."""
    rows = [{"lora": PLAYGROUND_LORAS[0], "strength": 1.0}, {"lora": PLAYGROUND_LORAS[1], "strength": 0.8}]
    return {
        "model": {"class_type": "LoomPlaygroundModel", "inputs": {}},
        "stack": {"class_type": "LoomLoraStack", "inputs": {"model": ["model", 0], "clip": ["model", 1],
                                                            "rows": json.dumps(rows)}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["stack", 1], "text": PROMPT}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["stack", 1], "text": ""}},
        "latent": {"class_type": "LoomPlaygroundLatent", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["stack", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": steps, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}},
        "decode": {"class_type": "LoomPlaygroundDecode", "inputs": {"samples": ["sampler", 0]}},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }


def search_prompt(tag: str, top_k: int) -> dict:
    """``Loom Library Search`` loading every LoRA tagged ``tag`` (up to ``top_k``)."""
    return {"search": {"class_type": "LoomLibrarySearch", "inputs": {
                "prompt": "soak lora", "top_k": top_k, "strength": 1.0, "include_tags": tag}},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["search", 2]}}}


def run_soak(config: SoakConfig, comfyui: Path, progress: Callable[[str], None] | None = None,
             keep: Path | None = None) -> SoakReport:
    """Run both phases on one server; see the module docstring."""
    say = progress or (lambda line: None)
    workspace = keep or Path(tempfile.mkdtemp(prefix="loom-soak-"))
    try:
        tags = prepare(workspace, config)
        say(f"workspace {workspace}: {config.loras} LoRAs of ~{config.lora_mib} MiB")
        server = ComfyServer(comfyui, workspace, log_path=workspace / "comfyui-server.log",
                             env={"LOOM_ADAPTER_CACHE_MB": str(config.cache_mib)})
        with server:
            start = server.rss_bytes() / MIB
            phases = (PhaseResult("workflow"), PhaseResult("library"))
            began = time.perf_counter()
            for run in range(config.runs):
                server.wait(server.queue(workflow_prompt(seed=run, steps=config.steps)))
                phases[0].samples.append(server.rss_bytes() / MIB)
                say(f"workflow run {run + 1}/{config.runs}: RSS {phases[0].samples[-1]:.0f} MiB")
            phases[0].seconds = time.perf_counter() - began
            began = time.perf_counter()
            for round_ in range(2):
                for tag in tags:
                    entry = server.wait(server.queue(search_prompt(tag, config.group)))
                    text = entry["outputs"]["show"]["text"][0]
                    if text.count("soak/soak_") < min(config.group, config.loras):
                        raise RuntimeError(f"Library Search for {tag} found too few LoRAs:\n{text[:2000]}")
                    phases[1].samples.append(server.rss_bytes() / MIB)
                    say(f"library round {round_ + 1} {tag}: RSS {phases[1].samples[-1]:.0f} MiB")
            phases[1].seconds = time.perf_counter() - began
        warm = max(p.samples[config.warmup - 1] for p in phases)
        return SoakReport(config=config, start_mib=start, phases=phases,
                          bound_mib=warm + config.cache_mib + config.slack_mib)
    finally:
        if keep is None:
            shutil.rmtree(workspace, ignore_errors=True)


def format_report(report: SoakReport) -> str:
    """The table: one row per phase, RSS in MiB, and the bound with its verdict."""
    c = report.config
    header = ("phase", "prompts", "seconds", "RSS after warm-up", "peak after warm-up", "end", "growth")
    rows = []
    for phase in report.phases:
        after = phase.samples[c.warmup:]
        warm = phase.samples[c.warmup - 1]
        rows.append((phase.name, str(len(phase.samples)), f"{phase.seconds:.0f}", f"{warm:.0f}",
                     f"{max(after):.0f}", f"{phase.samples[-1]:.0f}", f"{phase.samples[-1] - warm:+.0f}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(cell.rjust(w) if i else cell.ljust(w)  # noqa: E731
                                   for i, (cell, w) in enumerate(zip(cells, widths)))
    verdict = "met" if report.met else "NOT met"
    return "\n".join([
        f"loom bench soak: one server, {c.runs} workflow runs ({c.steps} steps), {c.loras} LoRAs (~{c.lora_mib} "
        f"MiB each) loaded twice through Loom Library Search, {c.group} per prompt; adapter cache "
        f"{c.cache_mib} MiB; RSS in MiB (server start {report.start_mib:.0f})",
        line(header), line(["-" * w for w in widths]), *(line(r) for r in rows), "",
        f"bound: peak after warm-up <= RSS after warm-up {report.bound_mib - c.cache_mib - c.slack_mib:.0f} + "
        f"adapter cache {c.cache_mib} + slack {c.slack_mib} = {report.bound_mib:.0f}; peak "
        f"{report.peak_after_warmup_mib:.0f}: {verdict}",
        f"(without a bound the library phase would keep {c.loras} x {c.lora_mib} = {c.loras * c.lora_mib:.0f} MiB "
        "of adapters)"])
