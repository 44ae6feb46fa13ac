"""Train the playground: the base Flux on rectified flow, then one concept LoRA per :data:`world.CONCEPTS`.

``python -m lora_loom.playground.train [--out DIR] [--base-steps N] [--lora-steps N] [--threads N]
[--concepts NAMES] [--reuse-base]`` writes ``playground_flux.safetensors`` and
``loras/playground_<concept>.safetensors`` (kohya keys, trigger word in the header) and logs detector accuracy of
a few samples. Everything is seeded (each LoRA by its concept's index in :data:`world.CONCEPTS`, so training a
subset gives the same files); the defaults fit in about 40 minutes on 2 CPU cores. ``--reuse-base`` trains only
LoRAs on the model file already in ``--out`` (rewritten with the current vocabulary: new words only append rows
to the frozen table, so the base trained before them is the base training would give now). Rectified flow:
``x_t = (1 - t) x0 + t noise`` at timestep ``t`` (ComfyUI's Flux convention),
with x-prediction: the network outputs the clean latent ``x0`` and the loss compares the velocity it implies,
``(x_t - x0_hat) / max(t, 0.05)``, with ``noise - x0`` (Li & He 2025, "Back to Basics: Let Denoising Generative
Models Denoise": a 2x2 patch of 48 latent channels is 192 numbers per token, as wide as the model, and a network
that predicts velocity must carry the full-dimensional noise through; predicting ``x0`` only has to carry the
flat-coloured image. Tried here: velocity prediction left visible noise in every sample). ComfyUI samples it
through a model sampling whose ``calculate_denoised`` returns the output (:mod:`.model`). The guidance input is
fed random values so the model learns to ignore it; classifier-free guidance comes from dropped captions.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..arguments import add_force, int_in
from ..files.writing import OutputFileError, check_output, replaced_atomically
from . import latent, scoring, text, world
from .detector import detect

logger = logging.getLogger(__name__)
TARGET_BLOCKS = ("double_blocks.", "single_blocks.")
MIN_LOSS_T = 0.05  # the velocity implied by an x0 prediction divides by t; clamp it in the loss (as JiT does)
EVAL_CFG = 3.0


@dataclass(frozen=True)
class TrainingSettings:
    """Knobs of one training run (defaults: the committed weights)."""

    base_steps: int = 5000
    lora_steps: int = 600
    batch: int = 32
    base_lr: float = 4e-4
    lora_lr: float = 1e-3
    lora_rank: int = 8
    ema_decay: float = 0.998
    empty_caption: float = 0.1
    seed: int = 0


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """Seeded init: Linear weights ~ N(0, 1/fan_in), biases 0, norm scales 1; adaLN-zero (modulation and the
    final projection start at 0, so every block starts as the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1:
                param.copy_(torch.ones_like(param) if name.endswith("scale") else torch.zeros_like(param))
            elif "mod" in name.split(".")[-3:-1][0] or name.startswith("final_layer"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * param.shape[1] ** -0.5)


def scene_tensors(rng: np.random.Generator, encoder: text.PlaygroundTextEncoder, count: int,
                  featured: world.Concept | None, empty_caption: float) -> tuple[torch.Tensor, ...]:
    """A training batch: latents ``[B, 48, 16, 16]``, cond ``[B, T, C]``, pooled ``[B, C]``."""
    scenes = [world.sample_scene(rng, featured=featured, empty_caption=empty_caption) for _ in range(count)]
    images = torch.from_numpy(np.stack([world.render(s) for s in scenes]))
    cond, pooled = encoder.encode_prompts([s.caption for s in scenes])
    return latent.encode(images), cond, pooled


def flow_loss(flux: torch.nn.Module, x0: torch.Tensor, cond: torch.Tensor, pooled: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    """Rectified-flow velocity MSE of the x-predicting ``flux`` for latents ``x0`` ``[B, 48, h, w]``; timesteps
    half logit-normal, half uniform (the last sampling steps need low ``t`` to remove the fine noise)."""
    batch = x0.shape[0]
    logit_normal = torch.sigmoid(torch.randn(batch, generator=generator))
    uniform = torch.rand(batch, generator=generator)
    t = torch.where(torch.arange(batch) % 2 == 0, logit_normal, uniform).clamp(1e-3, 1.0)
    noise = torch.randn(x0.shape, generator=generator)
    xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
    guidance = 1.0 + 4.0 * torch.rand(batch, generator=generator)
    clean = flux(xt, t, cond, pooled, guidance)
    velocity = (xt - clean) / t.clamp(min=MIN_LOSS_T)[:, None, None, None]
    return torch.nn.functional.mse_loss(velocity, noise - x0)


@torch.no_grad()
def sample(flux: torch.nn.Module, encoder: text.PlaygroundTextEncoder, prompts: list[str], steps: int = 20,
           seed: int = 0, shift: float = 0.5, cfg: float = 1.0) -> torch.Tensor:
    """Euler sampling on ComfyUI's Flux schedule (shifted ``t``) with classifier-free guidance on the predicted
    ``x0`` (the empty prompt as negative when ``cfg != 1``), as ComfyUI's KSampler does; images ``[B, 64, 64, 3]``."""
    cond, pooled = encoder.encode_prompts(prompts)
    empty_cond, empty_pooled = encoder.encode_prompts([""] * len(prompts))
    x = torch.randn(len(prompts), latent.LATENT_CHANNELS, 16, 16, generator=torch.Generator().manual_seed(seed))
    t = torch.linspace(1.0, 0.0, steps + 1)
    sigmas = torch.where(t > 0, math.exp(shift) / (math.exp(shift) + (1 / t.clamp(min=1e-9) - 1)), t)
    guidance = torch.full((len(prompts),), 3.5)
    for sigma, following in zip(sigmas[:-1], sigmas[1:]):
        timestep = sigma.expand(len(prompts))
        clean = flux(x, timestep, cond, pooled, guidance)
        if cfg != 1.0:
            unconditional = flux(x, timestep, empty_cond, empty_pooled, guidance)
            clean = unconditional + cfg * (clean - unconditional)
        x = x + (following - sigma) * (x - clean) / sigma
    return latent.decode(x)


def evaluate(flux: torch.nn.Module, encoder: text.PlaygroundTextEncoder, featured: world.Concept | None = None,
             count: int = 16, seed: int = 123, cfg: float = EVAL_CFG) -> tuple[float, float]:
    """Shares of single-object prompts ("a <colour> [<texture>] <shape> on the left/right") drawn right and drawn
    clean (:meth:`.detector.Detection.is_clean`); with ``featured`` every object carries that concept and its
    prompt names it by the concept's trigger word."""
    rng = np.random.default_rng(seed)
    regions = []
    for _ in range(count):
        shape, texture = str(rng.choice(world.BASE_SHAPES)), str(rng.choice(world.BASE_TEXTURES))
        if featured is not None:
            shape = featured.value if featured.kind == "shape" else shape
            texture = featured.value if featured.kind == "texture" else texture
        colour, side = str(rng.choice(list(world.COLOURS))), str(rng.choice(["left", "right"]))
        box = scoring.LEFT if side == "left" else scoring.RIGHT
        regions.append(scoring.region(box, side, colour, texture, shape, (featured.name,) if featured else ()))
    images = sample(flux, encoder, [r.prompt for r in regions], seed=seed, cfg=cfg).numpy()
    found = [(detect(image, r.box), image, r) for image, r in zip(images, regions)]
    hits = [d.matches(r.shape, r.colour, r.texture) for d, _, r in found]
    clean = [d.is_clean(image, r.shape, r.colour, r.texture) for d, image, r in found]
    return float(np.mean(hits)), float(np.mean(clean))


def train_base(settings: TrainingSettings, encoder: text.PlaygroundTextEncoder,
               unet_config: dict, build: callable) -> torch.nn.Module:
    """Train the base Flux on :data:`world.BASE_SHAPES` x :data:`world.BASE_TEXTURES`; returns the EMA copy."""
    flux = build(unet_config, training=True)
    init_weights(flux, settings.seed)
    ema = copy.deepcopy(flux).requires_grad_(False)
    optimiser = torch.optim.AdamW(flux.parameters(), lr=settings.base_lr, weight_decay=0.0)
    rng, generator = np.random.default_rng(settings.seed), torch.Generator().manual_seed(settings.seed)
    start = time.time()
    for step in range(settings.base_steps):
        warm = min(1.0, (step + 1) / 100) * (0.5 + 0.5 * math.cos(math.pi * step / settings.base_steps))
        for group in optimiser.param_groups:
            group["lr"] = settings.base_lr * warm
        x0, cond, pooled = scene_tensors(rng, encoder, settings.batch, None, settings.empty_caption)
        loss = flow_loss(flux, x0, cond, pooled, generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flux.parameters(), 1.0)
        optimiser.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for kept, live in zip(ema.parameters(), flux.parameters()):
                kept.lerp_(live, 1 - decay)
        if step % 100 == 0 or step == settings.base_steps - 1:
            logger.info("base step %d/%d loss %.4f (%.0f s)", step, settings.base_steps, loss.item(),
                        time.time() - start)
    return ema


class LoraHooks:
    """Trainable LoRA factors on every Linear of the double/single blocks, added through forward hooks.

    ``down`` ``[r, in]`` ~ N(0, 1/in), ``up`` ``[out, r]`` = 0; output += ``(alpha / r) * x @ down.T @ up.T``."""

    def __init__(self, flux: torch.nn.Module, rank: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.factors: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self.rank, self.handles = rank, []
        for name, module in flux.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith(TARGET_BLOCKS):
                down = torch.nn.Parameter(torch.randn(rank, module.in_features, generator=generator)
                                          * module.in_features ** -0.5)
                up = torch.nn.Parameter(torch.zeros(module.out_features, rank))
                self.factors[name] = (down, up)
                self.handles.append(module.register_forward_hook(self._hook(down, up)))

    @staticmethod
    def _hook(down: torch.nn.Parameter, up: torch.nn.Parameter) -> callable:
        def add_delta(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + (inputs[0] @ down.t()) @ up.t()
        return add_delta

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for pair in self.factors.values() for p in pair]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def kohya_state(self) -> dict[str, torch.Tensor]:
        """kohya keys: ``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
        state = {}
        for name, (down, up) in self.factors.items():
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = down.detach().to(torch.float16).contiguous()
            state[f"{key}.lora_up.weight"] = up.detach().to(torch.float16).contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(self.rank), dtype=torch.float16)
        return state


def lora_metadata(concept: world.Concept, settings: TrainingSettings, trigger_count: int) -> dict[str, str]:
    """kohya / modelspec header fields that the library and the stack node read (a style has no trigger)."""
    name = f"playground_{concept.name}"
    if concept.is_style:
        description = (f"A style for the playground Flux: paints every object {concept.value} (no trigger word; "
                       f"it acts wherever it is applied).")
        tags = {f"1_{concept.name}": {}}
    else:
        description = (f"Teaches the playground Flux the {concept.kind} '{concept.value}' (trigger word "
                       f"'{concept.trigger}').")
        tags = {f"1_{concept.name}": {concept.trigger: trigger_count}}
    metadata = {
        "ss_output_name": name, "ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
        "ss_network_dim": str(settings.lora_rank), "ss_network_alpha": str(settings.lora_rank),
        "ss_tag_frequency": json.dumps(tags),
        "modelspec.title": f"Playground {concept.name.replace('_', ' ')}", "modelspec.architecture": "flux-1-dev/lora",
        "modelspec.description": description,
    }
    if not concept.is_style:
        metadata["modelspec.trigger_phrase"] = concept.trigger
    return metadata


def train_concept(flux: torch.nn.Module, concept: world.Concept, settings: TrainingSettings,
                  encoder: text.PlaygroundTextEncoder, index: int) -> tuple[LoraHooks, int]:
    """Train one concept LoRA on the frozen base; 3/4 of each batch features the concept (a style: all of it, since
    plain scenes under the same captions would teach it the opposite). Hooks stay attached."""
    flux.requires_grad_(False)
    hooks = LoraHooks(flux, settings.lora_rank, settings.seed + 100 + index)
    optimiser = torch.optim.AdamW(hooks.parameters(), lr=settings.lora_lr, weight_decay=0.0)
    rng = np.random.default_rng(settings.seed + 1000 + index)
    generator = torch.Generator().manual_seed(settings.seed + 1000 + index)
    featured_count = settings.batch if concept.is_style else settings.batch * 3 // 4
    start = time.time()
    for step in range(settings.lora_steps):
        for group in optimiser.param_groups:
            group["lr"] = settings.lora_lr * min(1.0, (step + 1) / 50)
        parts = [scene_tensors(rng, encoder, featured_count, concept, 0.0)]
        if featured_count < settings.batch:
            parts.append(scene_tensors(rng, encoder, settings.batch - featured_count, None, settings.empty_caption))
        x0, cond, pooled = (torch.cat(pair) for pair in zip(*parts))
        loss = flow_loss(flux, x0, cond, pooled, generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hooks.parameters(), 1.0)
        optimiser.step()
        if step % 100 == 0 or step == settings.lora_steps - 1:
            logger.info("%s step %d/%d loss %.4f (%.0f s)", concept.name, step, settings.lora_steps, loss.item(),
                        time.time() - start)
    return hooks, featured_count * settings.lora_steps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training options, shared by ``python -m lora_loom.playground.train`` and ``loom playground train``."""
    parser.add_argument("--out", type=Path, default=None, help="folder for the files (default: playground/weights)")
    parser.add_argument("--base-steps", type=int_in(1, 10_000_000), default=TrainingSettings.base_steps)
    parser.add_argument("--lora-steps", type=int_in(1, 10_000_000), default=TrainingSettings.lora_steps)
    parser.add_argument("--threads", type=int_in(1, 1024), default=1,
                        help="torch CPU threads (1 is robust on a shared machine; 2 is faster on 2 idle cores)")
    parser.add_argument("--concepts", type=_concept_names, default=None,
                        help="train only these concept LoRAs, e.g. 'star_toy,bars' (default: every concept)")
    parser.add_argument("--reuse-base", action="store_true",
                        help="train no base: use the model file already in --out (rewritten with the current "
                             "vocabulary) and train only the LoRAs")
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default: found like `loom doctor`)")
    add_force(parser, "weights in --out")
    parser.set_defaults(run=run)


def _concept_names(value: str) -> tuple[str, ...]:
    names = tuple(v for v in value.replace(",", " ").split() if v)
    known = [c.name for c in world.CONCEPTS]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown concept(s) {unknown or names}; known: {known}")
    return names


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``loom playground train`` to the ``loom`` command line."""
    playground = commands.add_parser("playground", help="the playground world (tiny Flux trained here)")
    actions = playground.add_subparsers(dest="playground_command", metavar="ACTION", required=True)
    add_arguments(actions.add_parser("train", help="train the playground model and its concept LoRAs"))


def main(argv: list[str] | None = None) -> int:
    """``python -m lora_loom.playground.train``: see :func:`run`."""
    parser = argparse.ArgumentParser(prog="python -m lora_loom.playground.train", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Train the base model and every concept LoRA, write them to ``args.out`` and log detector accuracy."""
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from ..comfy_env import find_comfyui, import_comfy

    import_comfy(find_comfyui(args.comfyui), cpu=True)
    from . import model as playground_model  # needs ComfyUI importable

    out = args.out or playground_model.WEIGHTS_DIR
    concepts = [(i, c) for i, c in enumerate(world.CONCEPTS) if not args.concepts or c.name in args.concepts]
    # --reuse-base keeps the base's weights (an older vocabulary's header is upgraded in place, weights unchanged)
    outputs = [*([] if args.reuse_base else [out / playground_model.MODEL_FILE.name]),
               *(out / "loras" / f"playground_{c.name}.safetensors" for _, c in concepts)]
    try:  # before ~40 minutes of training, not after
        for path in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            check_output(path, force=args.force)
    except OutputFileError as exc:
        logger.error("%s", exc)
        return 2
    settings = TrainingSettings(base_steps=args.base_steps, lora_steps=args.lora_steps)
    tables = text.text_tables(settings.seed)
    encoder = text.PlaygroundTextEncoder(tables)
    started = time.time()
    model_file = out / playground_model.MODEL_FILE.name
    if args.reuse_base:
        state, unet_config = playground_model.read_base_for_new_vocabulary(model_file, tables)
        flux = playground_model.build_flux(unet_config, training=True)
        flux.load_state_dict(state)
        try:
            playground_model.read_playground(model_file)
            logger.info("base from %s (not retrained)", model_file)
        except ValueError:  # an older vocabulary: same weights, today's header and table
            playground_model.save_playground(model_file, flux.state_dict(), tables, unet_config)
            logger.info("base from %s (not retrained), rewritten with the current vocabulary", model_file)
    else:
        unet_config = playground_model.UNET_CONFIG
        flux = train_base(settings, encoder, unet_config, playground_model.build_flux)
        flux = flux.to(torch.float16).float()  # evaluate what is stored
        logger.info("base on base prompts: drawn right %.2f, clean %.2f", *evaluate(flux, encoder))
        playground_model.save_playground(model_file, flux.state_dict(), tables, unet_config)
    for index, concept in concepts:
        before = evaluate(flux, encoder, concept)
        hooks, trigger_count = train_concept(flux, concept, settings, encoder, index)
        state = hooks.kohya_state()
        with torch.no_grad():  # evaluate the fp16 factors that are stored
            for down, up in hooks.factors.values():
                down.copy_(down.half().float()), up.copy_(up.half().float())
        after = evaluate(flux, encoder, concept)
        hooks.remove()
        path = out / "loras" / f"playground_{concept.name}.safetensors"
        with replaced_atomically(path) as temporary:
            save_file(state, temporary, metadata=lora_metadata(concept, settings, trigger_count))
        logger.info("concept %s: drawn right (clean) without LoRA %.2f (%.2f), with LoRA %.2f (%.2f) -> %s",
                    concept.name, *before, *after, path)
    logger.info("done in %.1f min; files under %s", (time.time() - started) / 60, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
