"""Which tool wrote a Flux LoRA file and which Flux variant it targets, from the header alone (keys, shapes,
``__metadata__``), so the library index can tell without reading a tensor.

Writer: trainer metadata first (each tool's own fields), then key style. Sources, per rule:

* OneTrainer: ``ot_branch`` / ``ot_revision`` / ``ot_config`` (modelSaver/mixin/DtypeModelSaverMixin.py); its output
  mode (DIFFUSERS / KOHYA / COMFY / ORIGINAL / LEGACY) shows in the key style.
* ai-toolkit: ``software`` = ``{"name": "ai-toolkit", ...}`` (toolkit/metadata.py, info.py). Civitai's hosted
  Flux trainer runs ai-toolkit (developer.civitai.com, "Flux 1 LoRA training": ``"engine": "ai-toolkit"``) and
  its files carry no mark of their own, so they are named ai-toolkit.
* SimpleTuner: ``lycoris_config`` (LyCORIS saves), or ModelSpec written with ``global_step``
  (helpers/training/save_hooks.py ``_build_modelspec_metadata``).
* FluxGym: sd-scripts metadata with the fixed command line FluxGym generates (app.py ``gen_sh``: ``--fp8_base``,
  ``--discrete_flow_shift 3.1582``, ``--model_prediction_type raw``) and one of its own model files
  (models.yaml: ``flux1-dev.sft``, ``flux1-dev2pro.safetensors``) as ``ss_sd_model_name``.
* kohya / sd-scripts: ``ss_network_module`` / ``ss_sd_scripts_commit_hash`` (train_network.py).
* diffusers: ``lora_adapter_metadata`` (loaders/lora_base.py ``write_lora_layers``).
* key style: ``.processor.qkv_lora`` x-flux; ``blocks.N.attn.a_to_qkv`` DiffSynth-Studio;
  ``base_model.model.double_blocks.`` fal (diffusers' ``_convert_fal_kontext_lora_to_diffusers``); bare Flux names
  with replaced ``*_norm.scale`` BFL control LoRAs; ``lycoris_`` SimpleTuner's LyCORIS (ComfyUI's "simpletuner
  lycoris format"); ``lora_transformer_`` OneTrainer; ``lora_unet_`` kohya; ``diffusion_model.`` ComfyUI
  (LoraSave, TrainLoraNode); ``transformer.`` diffusers / PEFT.

Variant: the width of ``img_in``'s input when the file touches it (Flux-1 takes 64 features; the BFL Canny /
Depth models 128, Fill 384: a LoRA on those must be that wide), then the metadata's model names
(``modelspec.architecture``, ``ss_base_model_version``, OneTrainer's ``ot_config``, ``ss_sd_model_name``).
Canny and Depth share every shape; dev and schnell too.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ...files.json_text import JsonTextError, parse_json
from .parts import split_key

logger = logging.getLogger(__name__)

WRITERS: dict[str, str] = {
    "kohya": "kohya / sd-scripts", "fluxgym": "FluxGym (sd-scripts)", "ai-toolkit": "ai-toolkit",
    "onetrainer": "OneTrainer", "simpletuner": "SimpleTuner", "diffusers": "diffusers / PEFT", "fal": "fal",
    "xlabs": "XLabs x-flux", "diffsynth": "DiffSynth-Studio", "bfl": "Black Forest Labs", "comfyui": "ComfyUI",
}
VARIANTS = ("dev", "schnell", "fill", "canny", "depth", "canny-or-depth", "kontext", "krea", "chroma")
FLUX1_HIDDEN = 3072
IMG_IN_WIDTHS = {64: None, 128: "canny-or-depth", 384: "fill"}
FLUXGYM_MODEL_FILES = ("flux1-dev.sft", "flux1-dev2pro.safetensors")
_IMG_IN = re.compile(r"(^|[._])(img_in|x_embedder)$")
# Most specific first: "Flux.1-fill-dev" is Fill, "flux1-dev2pro" is dev.
_VARIANT_WORDS = (("fill", "fill"), ("canny", "canny"), ("depth", "depth"), ("kontext", "kontext"),
                  ("krea", "krea"), ("chroma", "chroma"), ("schnell", "schnell"), ("dev", "dev"))
_OUTPUT_MODES = (("transformer.", "DIFFUSERS"), ("lora_unet_", "KOHYA"), ("diffusion_model.", "COMFY"),
                 ("lora_transformer_", "LEGACY"), ("double_blocks.", "ORIGINAL"), ("single_blocks.", "ORIGINAL"))


@dataclass(frozen=True)
class Provenance:
    """``writer``: a key of :data:`WRITERS` or ``""``; ``variant``: one of :data:`VARIANTS` or None."""

    writer: str
    writer_evidence: str
    variant: str | None
    variant_evidence: str

    @property
    def writer_name(self) -> str:
        """Display name of the writer (``""`` when unknown)."""
        return WRITERS.get(self.writer, "")


def _json_field(metadata: Mapping[str, str], key: str) -> object:
    """A metadata value as JSON when it is JSON (``software``, ``ot_config``), else the text itself."""
    try:
        return parse_json(metadata.get(key) or "null", f"metadata {key!r}")
    except JsonTextError:
        return metadata.get(key)


def _output_mode(keys: Sequence[str]) -> str:
    for prefix, mode in _OUTPUT_MODES:
        if any(k.startswith(prefix) for k in keys):
            return mode
    return "unknown"


def _writer_from_metadata(metadata: Mapping[str, str], keys: Sequence[str]) -> tuple[str, str] | None:
    ot = [k for k in ("ot_revision", "ot_branch", "ot_config") if k in metadata]
    if ot:
        return "onetrainer", f"metadata {ot[0]}; {_output_mode(keys)} output keys"
    software = _json_field(metadata, "software")
    name = software.get("name") if isinstance(software, dict) else software
    if isinstance(name, str) and "ai-toolkit" in name.lower():
        return "ai-toolkit", "metadata software.name ai-toolkit"
    if "lycoris_config" in metadata:
        return "simpletuner", "metadata lycoris_config (SimpleTuner's LyCORIS save)"
    if "global_step" in metadata and "modelspec.sai_model_spec" in metadata:
        return "simpletuner", "metadata global_step beside ModelSpec (SimpleTuner's save hook)"
    sd_scripts = [k for k in ("ss_network_module", "ss_sd_scripts_commit_hash") if metadata.get(k)]
    if sd_scripts:
        fluxgym_flags = (metadata.get("ss_sd_model_name") in FLUXGYM_MODEL_FILES
                         and metadata.get("ss_fp8_base") == "True"
                         and metadata.get("ss_discrete_flow_shift") == "3.1582"
                         and metadata.get("ss_model_prediction_type") == "raw")
        if fluxgym_flags:
            return "fluxgym", (f"sd-scripts metadata with FluxGym's command line (model file "
                               f"{metadata['ss_sd_model_name']}, fp8_base, discrete_flow_shift 3.1582, raw prediction)")
        return "kohya", f"metadata {sd_scripts[0]} {metadata[sd_scripts[0]]}"
    if "lora_adapter_metadata" in metadata:
        return "diffusers", "metadata lora_adapter_metadata"
    return None


# Key styles in priority order (a file mixing styles is named by the first): a substring every such key holds
# (a cheap filter: headers have thousands of keys) and the pattern that confirms it.
_KEY_STYLES: tuple[tuple[str, str, re.Pattern[str]], ...] = tuple((writer, needle, re.compile(pattern)) for
                                                                   writer, needle, pattern in (
    ("xlabs", ".processor.", r"\.processor\.(qkv|proj)_lora"),
    ("diffsynth", "blocks.", r"^blocks\.\d+\.attn\.[ab]_to_"),
    ("fal", "base_model.model.", r"^base_model\.model\.(double|single)_blocks\."),
    ("bfl", "_norm.scale",
     r"^(double_blocks\.\d+\.(img|txt)_attn|single_blocks\.\d+)\.norm\.(query|key)_norm\.scale$"),
    ("simpletuner", "lycoris_", r"^lycoris_"), ("onetrainer", "lora_transformer_", r"^lora_transformer_"),
    ("kohya", "lora_", r"^lora_(unet|te\d?)_"), ("comfyui", "diffusion_model.", r"^diffusion_model\."),
    ("diffusers", ".", r"^(transformer|base_model\.model)\."),
))


def _writer_from_keys(keys: Sequence[str]) -> tuple[str, str] | None:
    for writer, needle, pattern in _KEY_STYLES:
        key = next((k for k in keys if needle in k and pattern.search(k)), None)
        if key is not None:
            return writer, f"key style ({key})"
    return None


def _img_in_width(shapes: Mapping[str, Sequence[int]]) -> tuple[int, str] | None:
    """``(input features, key)`` of the adapter on ``img_in`` / ``x_embedder`` when its rows are Flux-1's 3072."""
    parts: dict[str, dict[str, tuple[Sequence[int], str]]] = {}
    for key, shape in shapes.items():
        if "img_in" not in key and "x_embedder" not in key:
            continue
        split = split_key(key)
        if split is not None and _IMG_IN.search(split[0]):
            parts.setdefault(split[0], {})[split[1]] = (shape, key)
    for found in parts.values():
        def dim(part: str, axis: int) -> int | None:
            shape = found.get(part, ((), ""))[0]
            return int(shape[axis]) if len(shape) == 2 else None

        rows = dim("up", 0) or dim("diff", 0) or dim("set_weight", 0) or dim("hada_w1_a", 0)
        width = dim("down", 1) or dim("diff", 1) or dim("set_weight", 1) or dim("hada_w1_b", 1)
        if width is None and any(p.startswith("lokr_") for p in found):
            a2 = dim("lokr_w1", 1) or dim("lokr_w1_b", 1)
            b2 = dim("lokr_w2", 1) or dim("lokr_w2_b", 1)
            width = a2 * b2 if a2 and b2 else None
        if width is not None and rows in (None, FLUX1_HIDDEN):
            key = next(k for _, k in found.values())
            return width, key
    return None


def variant_from_text(text: str) -> str | None:
    """The Flux variant a model name or architecture string names (``"Flux.1-fill-dev/lora"`` -> ``fill``)."""
    low = text.lower()
    for word, variant in _VARIANT_WORDS:
        if re.search(rf"(^|[^a-z]){word}", low):
            return variant
    return None


def _variant_from_metadata(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    fields: list[tuple[str, str]] = [(k, metadata.get(k, "")) for k in ("modelspec.architecture",
                                                                           "ss_base_model_version")]
    ot_config = _json_field(metadata, "ot_config")
    if isinstance(ot_config, dict):
        fields += [(f"ot_config.{k}", str(ot_config.get(k) or "")) for k in ("model_type", "base_model_name")]
    fields.append(("ss_sd_model_name", metadata.get("ss_sd_model_name", "")))
    for name, value in fields:
        variant = variant_from_text(value) if value else None
        if variant is not None:
            return variant, f"metadata {name} {value!r}"
    return None


def identify(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str]) -> Provenance:
    """Writer and variant of a file from its header: ``shapes`` maps every tensor key to its shape."""
    keys = sorted(shapes)
    writer = _writer_from_metadata(metadata, keys) or _writer_from_keys(keys) or ("", "")
    by_shape = _img_in_width(shapes)
    by_metadata = _variant_from_metadata(metadata)
    variant, evidence = (by_metadata or (None, ""))
    if by_shape is not None:
        width, key = by_shape
        shape_variant = IMG_IN_WIDTHS.get(width)
        shape_evidence = f"img_in takes {width} input features ({key})"
        if shape_variant == "canny-or-depth" and variant in ("canny", "depth"):
            variant, evidence = variant, f"{shape_evidence}; {evidence}"
        elif shape_variant is not None:
            conflict = f"; {evidence} disagrees" if variant not in (None, shape_variant, "dev") else ""
            variant, evidence = shape_variant, shape_evidence + conflict
        elif width not in IMG_IN_WIDTHS:
            logger.debug("img_in width %d matches no Flux-1 variant", width)
    return Provenance(writer=writer[0], writer_evidence=writer[1], variant=variant, variant_evidence=evidence)
