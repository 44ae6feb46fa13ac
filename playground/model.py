"""The playground model as ComfyUI objects: a real ``ModelPatcher`` around ComfyUI's own Flux, and a real ``CLIP``.

ComfyUI's checkpoint detection derives Flux's head count from the hidden size (``hidden / 128``), which a tiny
Flux breaks, so the stored ``unet_config`` (sizes, heads, channels) is completed by that detection run on the
weights (every field the running ComfyUI release needs) and built with a model config whose latent format has
the playground's 48 channels (:mod:`.latent`); the weights load through the config's ``process_unet_state_dict``
(see ``composition/comfy_bridge/flux_model.py``). The text encoder (:mod:`.text`) is wrapped as a
``comfy.sd.CLIP`` so stock ``CLIPTextEncode`` and every node that takes CLIP work; its tokens are
``{"playground": [[(id, weight), ...]]}``. Files: ``weights/playground_flux.safetensors`` (Flux weights in
fp16 under ``diffusion_model.`` with BFL checkpoint names, the frozen text tables under ``text_encoder.``, the
config in the header).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import comfy.latent_formats
import comfy.ldm.flux.model
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..composition.comfy_bridge.flux_model import FluxModelError, checkpoint_state, complete_config, flux_model
from ..composition.runtime.training_mode import training_scope
from ..files.writing import replaced_atomically
from . import latent, text

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_FILE = WEIGHTS_DIR / "playground_flux.safetensors"
LORA_DIR = WEIGHTS_DIR / "loras"
SAMPLING_SHIFT = 0.5  # ModelSamplingFlux shift: sigma = e^s / (e^s + 1/t - 1)
# hidden_size >= the 192 features of a 2x2 latent patch: a narrower model cannot pass the noise through and
# leaves part of it in every sample (tried: hidden 128 kept a third of the initial noise).
UNET_CONFIG: dict = dict(
    image_model="flux", in_channels=latent.LATENT_CHANNELS, out_channels=latent.LATENT_CHANNELS,
    vec_in_dim=text.TEXT_WIDTH, context_in_dim=text.TEXT_WIDTH, hidden_size=192, mlp_ratio=4.0, num_heads=4,
    depth=2, depth_single_blocks=2, axes_dim=[8, 20, 20], theta=10000, patch_size=2, qkv_bias=True,
    guidance_embed=True,
)
META_CONFIG, META_VOCABULARY = "loom.playground.unet_config", "loom.playground.vocabulary"
META_PREDICTION, PREDICTION = "loom.playground.prediction", "x0"


def lora_path(concept_name: str) -> Path:
    """The committed concept LoRA file of ``concept_name`` (kohya format)."""
    return LORA_DIR / f"playground_{concept_name}.safetensors"


class TrainingOps(comfy.ops.disable_weight_init):
    """ComfyUI's ops with a LayerNorm that normalises a copy of its input: Flux's blocks add residuals in place
    (``img += ...``) onto the tensor LayerNorm saved for backward, which autograd rejects. Same weights, same
    math; used only for training."""

    class LayerNorm(comfy.ops.disable_weight_init.LayerNorm):
        def forward(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: A002 (torch's name)
            return super().forward(input.clone(), *args, **kwargs)


class TrainingFlux(comfy.ldm.flux.model.Flux):
    """ComfyUI's ``Flux`` whose forward runs in ComfyUI's training mode (differentiable RoPE from 0.33 on; see
    ``composition/runtime/training_mode.py``); used only for training."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        with training_scope():
            return super().forward(*args, **kwargs)


def build_flux(unet_config: dict | None = None, training: bool = False) -> comfy.ldm.flux.model.Flux:
    """ComfyUI's ``Flux`` module with ``unet_config`` (default :data:`UNET_CONFIG`) completed by ComfyUI's
    detection, float32, uninitialised."""
    config = complete_config(unet_config or UNET_CONFIG)
    ops = TrainingOps if training else comfy.ops.disable_weight_init
    flux_class = TrainingFlux if training else comfy.ldm.flux.model.Flux
    return flux_class(dtype=torch.float32, device="cpu", operations=ops, **config)


class PlaygroundLatentFormat(comfy.latent_formats.LatentFormat):
    """48 channels, identity scale; preview = mean colour of each 4x4 cell."""

    latent_channels = latent.LATENT_CHANNELS
    latent_dimensions = 2
    scale_factor = 1.0
    shift_factor = 0.0

    def __init__(self) -> None:
        self.latent_rgb_factors = latent.preview_factors()
        self.latent_rgb_factors_bias = None
        self.taesd_decoder_name = None


class FlowX0(comfy.model_sampling.CONST):
    """Rectified flow (ComfyUI's ``CONST``: same noise scaling and inputs) for a model that predicts the clean
    latent: the denoised latent is the model output itself (see playground/train.py for why x-prediction)."""

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor,
                           model_input: torch.Tensor) -> torch.Tensor:
        return model_output


class PlaygroundSampling(comfy.model_sampling.ModelSamplingFlux, FlowX0):
    """ComfyUI's Flux sigma schedule (shifted) with :class:`FlowX0` predictions."""


class PlaygroundFluxConfig(comfy.supported_models.Flux):
    """ComfyUI's Flux (dev) model config with the playground latent format, sampling shift and x-prediction."""

    latent_format = PlaygroundLatentFormat
    sampling_settings = {"shift": SAMPLING_SHIFT}
    memory_usage_factor = 0.05

    def get_model(self, state_dict: dict, prefix: str = "", device: torch.device | str | None = None) -> object:
        model = super().get_model(state_dict, prefix, device=device)
        model.model_sampling = PlaygroundSampling(self)
        return model


def model_patcher(diffusion_state: dict[str, torch.Tensor], unet_config: dict,
                  dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """A ``ModelPatcher`` around ComfyUI's ``model_base.Flux`` holding ``diffusion_state`` (checkpoint keys
    without prefix; model names such as ``*_norm.weight`` are accepted too)."""
    try:
        model = flux_model(unet_config, diffusion_state, dtype, PlaygroundFluxConfig)
    except FluxModelError as error:
        raise ValueError(f"playground/model.py: {error}") from error
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


class PlaygroundTokenizer:
    """ComfyUI tokenizer interface over :func:`text.tokenize`: ``{"playground": [[(id, weight[, word]), ...]]}``.

    It also carries the ``SDTokenizer`` attributes that word-to-token alignment reads (CLoRA's concept search,
    ``composition/comfy_bridge/tokens.py``): ``embedding_key``, the special ids and a per-word ``tokenizer``."""

    embedding_key = "playground"
    start_token = text.VOCABULARY.index(text.START)
    end_token = None
    pad_token = text.VOCABULARY.index(text.PAD)
    tokens_start = 1
    tokenizer_adds_end_token = False

    def __init__(self, embedding_directory: str | None = None, tokenizer_data: dict | None = None) -> None:
        self.embedding_directory = embedding_directory

    def tokenizer(self, words: str) -> dict[str, list[int]]:
        """``{"input_ids": [start, id...]}`` without padding, as a Hugging Face tokenizer returns for ``words``."""
        tokens = text.tokenize(words)
        return {"input_ids": list(tokens.ids[:1 + len(tokens.words)])}

    def tokenize_with_weights(self, prompt: str, return_word_ids: bool = False, **kwargs) -> dict[str, list]:
        ids = text.tokenize(prompt).ids
        word_ids = [0] + list(range(1, len(ids)))
        pairs = [(i, 1.0, w) if return_word_ids else (i, 1.0) for i, w in zip(ids, word_ids)]
        return {"playground": [pairs]}

    def untokenize(self, token_weight_pair: list) -> list:
        return [(pair, text.VOCABULARY[pair[0]]) for pair in token_weight_pair]

    def state_dict(self) -> dict:
        return {}


class PlaygroundClipModel(torch.nn.Module):
    """The ``cond_stage_model`` of the playground ``CLIP``: the frozen text encoder under ``encoder.``."""

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 model_options: dict | None = None, **kwargs) -> None:
        super().__init__()
        self.encoder = text.PlaygroundTextEncoder()
        self.dtypes = {torch.float32}

    def set_clip_options(self, options: dict) -> None:
        """Accepted and ignored: the playground encoder has no layers to skip and no projection."""

    def reset_clip_options(self) -> None:
        """Nothing to reset (see :meth:`set_clip_options`)."""

    def encode_token_weights(self, token_weight_pairs: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens from :class:`PlaygroundTokenizer` -> (cond ``[B, T, C]``, pooled ``[B, C]``) on the CPU."""
        if "playground" not in token_weight_pairs:
            raise ValueError(f"playground/model.py: tokens {list(token_weight_pairs)} are not playground tokens")
        batches = token_weight_pairs["playground"]
        device = self.encoder.embedding.device
        ids = torch.tensor([[pair[0] for pair in batch] for batch in batches], dtype=torch.long, device=device)
        weights = torch.tensor([[float(pair[1]) for pair in batch] for batch in batches], device=device)
        cond, pooled = self.encoder(ids, weights)
        return cond.cpu(), pooled.cpu()

    def load_sd(self, state: dict[str, torch.Tensor]) -> object:
        return self.encoder.load_state_dict(state, strict=True)


def playground_clip(tables: dict[str, torch.Tensor]) -> comfy.sd.CLIP:
    """A ``comfy.sd.CLIP`` holding the playground text encoder with ``tables`` (embedding, position)."""
    target = comfy.supported_models_base.ClipTarget(PlaygroundTokenizer, PlaygroundClipModel)
    clip = comfy.sd.CLIP(target=target, parameters=0, model_options={"dtype": torch.float32})
    clip.load_sd({name: tables[name].float() for name in ("embedding", "position")})
    return clip


@dataclass(frozen=True)
class PlaygroundModel:
    """The loaded playground: ``patcher`` (MODEL), ``clip`` (CLIP) and the Flux ``unet_config`` they came from."""

    patcher: comfy.model_patcher.ModelPatcher
    clip: comfy.sd.CLIP
    unet_config: dict
    path: Path


def save_playground(path: Path, diffusion_state: dict[str, torch.Tensor], tables: dict[str, torch.Tensor],
                    unet_config: dict) -> None:
    """Write the model file: Flux weights (``diffusion_state``: model or checkpoint names) in fp16 under
    ``diffusion_model.`` with checkpoint names, text tables in fp32."""
    tensors = {f"diffusion_model.{k}": v.detach().to(torch.float16).contiguous()
               for k, v in checkpoint_state(diffusion_state).items()}
    tensors.update({f"text_encoder.{k}": v.detach().float().contiguous() for k, v in tables.items()})
    metadata = {META_CONFIG: json.dumps(unet_config), META_VOCABULARY: json.dumps(list(text.VOCABULARY)),
                META_PREDICTION: PREDICTION,
                "modelspec.title": "LoRA Loom playground Flux", "modelspec.architecture": "flux-1-dev/playground"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)


def read_playground(path: Path = MODEL_FILE) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Read the model file: (Flux state without prefix, text tables, unet_config); raises naming what is wrong."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"playground/model.py: no playground model at {path}; train one with "
                                f"`python -m lora_loom.playground.train`")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if META_CONFIG not in metadata:
            raise ValueError(f"{path}: header has no {META_CONFIG!r}; not a playground model file")
        if metadata.get(META_PREDICTION) != PREDICTION:
            raise ValueError(f"{path}: header field {META_PREDICTION!r} is {metadata.get(META_PREDICTION)!r}, "
                             f"expected {PREDICTION!r} (a model from an older trainer; retrain it)")
        vocabulary = json.loads(metadata.get(META_VOCABULARY, "[]"))
        if vocabulary != list(text.VOCABULARY):
            raise ValueError(f"{path}: vocabulary {vocabulary} differs from playground/text.py's")
        diffusion = {k[len("diffusion_model."):]: handle.get_tensor(k).float() for k in handle.keys()
                     if k.startswith("diffusion_model.")}
        tables = {k[len("text_encoder."):]: handle.get_tensor(k) for k in handle.keys()
                  if k.startswith("text_encoder.")}
    try:
        text.PlaygroundTextEncoder(tables)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    return diffusion, tables, json.loads(metadata[META_CONFIG])


def read_base_for_new_vocabulary(path: Path, tables: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(Flux state, unet_config) of a model file whose vocabulary is a prefix of the current one and whose text
    tables are ``tables``' first rows: a base trained before words were appended, which never saw those words
    and so is the base that training with the current vocabulary gives. Raises naming what differs."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        stored = json.loads(metadata.get(META_VOCABULARY, "[]"))
        if not stored or list(text.VOCABULARY[: len(stored)]) != stored:
            raise ValueError(f"{path}: vocabulary {stored} is not a prefix of playground/text.py's; retrain the base")
        for name, table in tables.items():
            if not torch.equal(handle.get_tensor(f"text_encoder.{name}"), table[: len(stored) if name == "embedding"
                                                                                else None]):
                raise ValueError(f"{path}: text table {name!r} differs from playground/text.py's; retrain the base")
    if metadata.get(META_PREDICTION) != PREDICTION:
        raise ValueError(f"{path}: header field {META_PREDICTION!r} is {metadata.get(META_PREDICTION)!r}, "
                         f"expected {PREDICTION!r}; retrain the base")
    with safe_open(str(path), framework="pt") as handle:
        diffusion = {k[len("diffusion_model."):]: handle.get_tensor(k).float() for k in handle.keys()
                     if k.startswith("diffusion_model.")}
    return diffusion, json.loads(metadata[META_CONFIG])


def load_playground(path: Path = MODEL_FILE, dtype: torch.dtype = torch.float32) -> PlaygroundModel:
    """Load the committed playground model as a ComfyUI MODEL + CLIP."""
    diffusion, tables, unet_config = read_playground(path)
    logger.info("playground model %s: %d tensors, hidden %d", path, len(diffusion), unet_config["hidden_size"])
    return PlaygroundModel(patcher=model_patcher(diffusion, unet_config, dtype), clip=playground_clip(tables),
                           unet_config=unet_config, path=Path(path))
