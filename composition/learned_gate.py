"""AutoLoRA's learned gate (arXiv 2508.02107), one per targeted Flux Linear, per output channel and token.

For a layer with base output ``o`` ``[B, L, C]`` (or ``[B, C]`` for modulation layers) and adapter
outputs ``Δ_i = x·A_iᵀ·B_iᵀ`` of the same shape::

    g_i = σ(w_b ⊙ LN_b(o) + w_l ⊙ LN_l(Δ_i) + w_c ⊙ LN_b(o) ⊙ LN_l(Δ_i) + b)
    out = o + Σ_i w_out ⊙ g_i ⊙ Δ_i

Checked against DiffSynth-Studio's ``LoraMerger`` (diffsynth/models/flux_lora_patcher.py and
diffsynth/lora/flux_lora.py): the two LayerNorms are ``torch.nn.LayerNorm(C, eps=1e-5)`` with their
default *affine* weight and bias, so LN here is affine too and its parameters are loaded. No timestep
input: time enters only through the activations.

Checkpoint layout of ``DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev`` (``model.safetensors``): the
``state_dict()`` of DiffSynth's ``FluxLoraPatcher``, i.e. ``model_dict.<layer>.<parameter>`` where
``<layer>`` is a DiffSynth module path with ``.`` written ``___`` (``blocks___3___attn___a_to_qkv``) and
``<parameter>`` is one of :data:`GATE_PARAMETERS`. Its training script saves ``lora_patcher.state_dict()``
unchanged, which gives that prefix; the released file itself could not be opened here, so keys without
the ``model_dict.`` prefix are accepted too. Layer names map to ComfyUI's as in :data:`DOUBLE_LAYERS` /
:data:`SINGLE_LAYERS` (``a`` = image stream, ``b`` = text stream). Assumption: DiffSynth's fused layers
keep BFL's output-channel order (q, k, v, mlp in ``linear1``; shift, scale, gate in modulations), since
DiffSynth converts BFL checkpoints by renaming; per-channel vectors are therefore used as stored.

Training (:func:`gate_training_step`): rectified-flow matching (``x_σ = (1-σ)·x0 + σ·ε``, target
``ε - x0``) plus a hinge asking the prediction under a mismatched prompt to be worse by a margin. The
paper's exact hinge form could not be read here; this ranking form is our assumption.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..files.safetensors_header import HeaderError, read_header

logger = logging.getLogger(__name__)

DOUBLE_LAYERS: dict[str, str] = {
    "attn.a_to_qkv": "img_attn.qkv", "attn.a_to_out": "img_attn.proj", "ff_a.0": "img_mlp.0",
    "ff_a.2": "img_mlp.2", "norm1_a.linear": "img_mod.lin",
    "attn.b_to_qkv": "txt_attn.qkv", "attn.b_to_out": "txt_attn.proj", "ff_b.0": "txt_mlp.0",
    "ff_b.2": "txt_mlp.2", "norm1_b.linear": "txt_mod.lin",
}
SINGLE_LAYERS: dict[str, str] = {"to_qkv_mlp": "linear1", "proj_out": "linear2", "norm.linear": "modulation.lin"}
GATE_PARAMETERS = ("weight_base", "weight_lora", "weight_cross", "weight_out", "bias",
                   "norm_base.weight", "norm_base.bias", "norm_lora.weight", "norm_lora.bias")
CHECKPOINT_PREFIX = "model_dict."
LAYER_NORM_EPS = 1e-5
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

Deltas = torch.Tensor | Sequence[torch.Tensor]


class LearnedGateError(ValueError):
    """A gate checkpoint or input that does not fit; names the file and key."""


def comfy_module_for_diffsynth(layer: str) -> str:
    """``blocks.3.attn.a_to_qkv`` -> ``double_blocks.3.img_attn.qkv``;
    ``single_blocks.0.to_qkv_mlp`` -> ``...linear1``."""
    parts = layer.split(".", 2)
    if len(parts) == 3 and parts[1].isdigit():
        if parts[0] == "blocks" and parts[2] in DOUBLE_LAYERS:
            return f"double_blocks.{parts[1]}.{DOUBLE_LAYERS[parts[2]]}"
        if parts[0] == "single_blocks" and parts[2] in SINGLE_LAYERS:
            return f"single_blocks.{parts[1]}.{SINGLE_LAYERS[parts[2]]}"
    raise LearnedGateError(f"DiffSynth layer {layer!r} is not a gated Flux layer "
                           f"(blocks.N.{{{', '.join(DOUBLE_LAYERS)}}} "
                           f"or single_blocks.N.{{{', '.join(SINGLE_LAYERS)}}})")


def diffsynth_layer_for_comfy(module: str) -> str:
    """Inverse of :func:`comfy_module_for_diffsynth`."""
    parts = module.split(".", 2)
    if len(parts) == 3 and parts[1].isdigit():
        table, prefix = {"double_blocks": (DOUBLE_LAYERS, "blocks"), "single_blocks": (SINGLE_LAYERS, "single_blocks")
                         }.get(parts[0], ({}, ""))
        for theirs, ours in table.items():
            if ours == parts[2]:
                return f"{prefix}.{parts[1]}.{theirs}"
    raise LearnedGateError(f"ComfyUI module {module!r} has no learned gate in DiffSynth's layout")


class LearnedGate(torch.nn.Module):
    """The gate of one layer with ``channels`` output channels; parameters named as in DiffSynth.

    Fresh gates start at ``w_b = w_l = w_c = b = 0`` and ``w_out = 2`` so ``g = 0.5`` and the output equals
    plain LoRA stacking ``o + Σ Δ_i`` (DiffSynth starts from random values instead).
    """

    def __init__(self, channels: int, eps: float = LAYER_NORM_EPS) -> None:
        super().__init__()
        self.channels = channels
        self.weight_base = torch.nn.Parameter(torch.zeros(channels))
        self.weight_lora = torch.nn.Parameter(torch.zeros(channels))
        self.weight_cross = torch.nn.Parameter(torch.zeros(channels))
        self.weight_out = torch.nn.Parameter(torch.full((channels,), 2.0))
        self.bias = torch.nn.Parameter(torch.zeros(channels))
        self.norm_base = torch.nn.LayerNorm(channels, eps=eps)
        self.norm_lora = torch.nn.LayerNorm(channels, eps=eps)

    def _stacked(self, base: torch.Tensor, deltas: Deltas) -> torch.Tensor:
        stacked = deltas if isinstance(deltas, torch.Tensor) else torch.stack(list(deltas))
        if stacked.shape[1:] != base.shape or base.shape[-1] != self.channels:
            raise LearnedGateError(f"gate of {self.channels} channels got base {tuple(base.shape)} and "
                                   f"deltas {tuple(stacked.shape)} (expected [N, *base.shape])")
        return stacked

    def gates(self, base: torch.Tensor, deltas: Deltas) -> torch.Tensor:
        """``g`` ``[N, ..., C]`` for base ``[..., C]`` and deltas ``[N, ..., C]`` (computed in float32)."""
        stacked = self._stacked(base, deltas).float()
        normed_base = self.norm_base(base.float())
        normed_lora = self.norm_lora(stacked)
        logits = (self.weight_base * normed_base + self.weight_lora * normed_lora
                  + self.weight_cross * normed_base * normed_lora + self.bias)
        return torch.sigmoid(logits)

    def forward(self, base: torch.Tensor, deltas: Deltas) -> torch.Tensor:
        """``o + Σ_i w_out ⊙ g_i ⊙ Δ_i`` in the dtype of ``base``; ``[..., C]``."""
        stacked = self._stacked(base, deltas)
        mixed = (self.weight_out * self.gates(base, stacked) * stacked.float()).sum(dim=0)
        return base + mixed.to(base.dtype)


class LearnedGates(torch.nn.Module):
    """All learned gates of a model, keyed by canonical ComfyUI module name (``double_blocks.0.img_attn.qkv``)."""

    def __init__(self, gates: dict[str, LearnedGate]) -> None:
        super().__init__()
        self._names = sorted(gates)
        self._by_name = {name: gates[name] for name in self._names}
        self.by_key = torch.nn.ModuleDict({name.replace(".", "___"): gates[name] for name in self._names})

    def module_names(self) -> list[str]:
        """The ComfyUI module names that have a gate."""
        return list(self._names)

    def gate_for(self, module: str) -> LearnedGate | None:
        """The gate of ``module`` or None when the checkpoint has none."""
        return self._by_name.get(module.removeprefix("diffusion_model."))


def load_learned_gates(path: str | Path, device: str | torch.device = "cpu") -> LearnedGates:
    """Read a DiffSynth LoRA-fusion checkpoint (layout in the module docstring) into :class:`LearnedGates`.

    The header goes through the pack's one validator first; every parameter must be finite."""
    try:
        header = read_header(path)
    except HeaderError as exc:
        raise LearnedGateError(str(exc)) from None
    for key, entry in header.tensors.items():
        if entry.dtype not in FLOAT_DTYPES:
            raise LearnedGateError(f"{path}: key {key!r} has dtype {entry.dtype}; gate parameters are floating point")
    tensors = load_file(str(path), device=str(device))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor.float()).all()):
            raise LearnedGateError(f"{path}: key {key!r} holds NaN or infinite values")
        layer_key, _, parameter = key.removeprefix(CHECKPOINT_PREFIX).partition(".")
        if parameter not in GATE_PARAMETERS:
            raise LearnedGateError(f"{path}: key {key!r} is not a gate parameter ({', '.join(GATE_PARAMETERS)})")
        try:
            module = comfy_module_for_diffsynth(layer_key.replace("___", "."))
        except LearnedGateError as error:
            raise LearnedGateError(f"{path}: key {key!r}: {error}") from error
        grouped.setdefault(module, {})[parameter] = tensor
    if not grouped:
        raise LearnedGateError(f"{path}: no gate parameters found")
    gates: dict[str, LearnedGate] = {}
    for module, parameters in grouped.items():
        missing = [name for name in GATE_PARAMETERS if name not in parameters]
        if missing:
            raise LearnedGateError(f"{path}: layer {diffsynth_layer_for_comfy(module)!r} lacks {missing}")
        channels = parameters["bias"].shape[0]
        for name, tensor in parameters.items():
            if tuple(tensor.shape) != (channels,):
                raise LearnedGateError(f"{path}: {diffsynth_layer_for_comfy(module)}.{name} has shape "
                                       f"{tuple(tensor.shape)}, expected ({channels},)")
        gate = LearnedGate(channels).to(device)
        gate.load_state_dict({name: tensor.float() for name, tensor in parameters.items()})
        gates[module] = gate
    logger.info("loaded %d learned gates from %s", len(gates), path)
    return LearnedGates(gates)


def flux_gate_channels(hidden_size: int, mlp_ratio: float = 4.0) -> dict[str, int]:
    """Output channels of each gated layer kind (DiffSynth names) for a Flux of ``hidden_size``."""
    mlp = int(hidden_size * mlp_ratio)
    channels: dict[str, int] = {}
    for stream in ("a", "b"):
        channels.update({f"attn.{stream}_to_qkv": 3 * hidden_size, f"attn.{stream}_to_out": hidden_size,
                         f"ff_{stream}.0": mlp, f"ff_{stream}.2": hidden_size,
                         f"norm1_{stream}.linear": 6 * hidden_size})
    channels.update({"to_qkv_mlp": 3 * hidden_size + mlp, "proj_out": hidden_size, "norm.linear": 3 * hidden_size})
    return channels


def write_synthetic_checkpoint(path: str | Path, hidden_size: int = 8, double_blocks: int = 1,
                               single_blocks: int = 1, mlp_ratio: float = 4.0, seed: int = 0,
                               prefix: str = CHECKPOINT_PREFIX) -> list[str]:
    """Write random gate parameters in DiffSynth's layout for a small Flux; returns the ComfyUI module names."""
    generator = torch.Generator().manual_seed(seed)
    channels = flux_gate_channels(hidden_size, mlp_ratio)
    layers = [f"blocks.{i}.{name}" for i in range(double_blocks) for name in DOUBLE_LAYERS]
    layers += [f"single_blocks.{i}.{name}" for i in range(single_blocks) for name in SINGLE_LAYERS]
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        width = channels[layer.split(".", 2)[2]]
        for parameter in GATE_PARAMETERS:
            tensors[f"{prefix}{layer.replace('.', '___')}.{parameter}"] = torch.randn(width, generator=generator)
    save_file(tensors, str(path))
    return [comfy_module_for_diffsynth(layer) for layer in layers]


@dataclass(frozen=True)
class GateTrainingReport:
    """Losses of one training step (floats, detached)."""

    loss: float
    flow_loss: float
    hinge_loss: float


Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def gate_training_step(predict: Predict, optimizer: torch.optim.Optimizer, clean: torch.Tensor, noise: torch.Tensor,
                       sigma: torch.Tensor, cond: torch.Tensor, mismatched_cond: torch.Tensor | None = None,
                       margin: float = 0.05, hinge_weight: float = 1.0) -> GateTrainingReport:
    """One optimiser step on the gates that ``predict(latent, sigma, cond) -> velocity`` closes over.

    ``clean`` and ``noise`` are ``[B, ...]`` latents, ``sigma`` ``[B]`` in (0, 1). Loss =
    ``mse(v, ε - x0) + hinge_weight · relu(margin + mse(v, target) - mse(v_mismatched, target))``.
    Runs with gradients enabled even inside ComfyUI's inference mode (inputs are cloned out of it).
    """
    with torch.inference_mode(False), torch.enable_grad():
        clean, noise, sigma, cond = clean.clone(), noise.clone(), sigma.clone(), cond.clone()
        scale = sigma.reshape(-1, *([1] * (clean.dim() - 1)))
        latent = (1.0 - scale) * clean + scale * noise
        target = noise - clean
        flow = F.mse_loss(predict(latent, sigma, cond).float(), target.float())
        hinge = torch.zeros((), device=flow.device)
        if mismatched_cond is not None:
            mismatched = F.mse_loss(predict(latent, sigma, mismatched_cond.clone()).float(), target.float())
            hinge = torch.relu(margin + flow - mismatched)
        loss = flow + hinge_weight * hinge
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return GateTrainingReport(float(loss.detach()), float(flow.detach()), float(hinge.detach()))
