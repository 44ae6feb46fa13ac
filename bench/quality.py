"""``loom bench quality``: composition quality with ground truth, on the playground world.

For every case of :data:`~..playground.scoring.CASES` in the chosen split (``tune``, ``heldout`` or ``all``) and
every seed of that case's split (:func:`~..playground.scoring.case_seeds`), each method builds its MODEL and positive
CONDITIONING with the pack's real nodes (``execute`` of ``Loom LoRA Stack``, ``Loom Region``, ``Loom Compose``,
``Loom CLoRA Concept``, ``Loom CLoRA``), samples with ComfyUI's own ``comfy.sample.sample`` (what the stock
KSampler calls: same seed, steps, sampler, scheduler, cfg and empty negative for all methods), decodes the
playground latent exactly and scores the image with the exact detector (:mod:`..playground.scoring`).

Methods: ``base`` (no LoRA, reference), ``merged`` (every case LoRA merged by ComfyUI's patches; the naive
baseline), ``switch`` / ``composite`` (Loom LoRA Stack modes), ``regional`` / ``regional+refine`` (one Loom LoRA
Stack per half -> Loom Region with the region prompt -> Loom Compose, refinement off / on; other Compose
options at their node defaults: rules for every step), ``regional@0.4`` (the same with the attention rules
stopping at 40 % of sampling, Regional-Prompting-FLUX's schedule), ``clora`` (one Loom CLoRA Concept per LoRA
with the words naming its object, e.g. "red toy", as a user disambiguates a shared class word -> Loom CLoRA at
its node defaults). LoRA ``playground_<concept>.safetensors`` is found through ComfyUI's ``loras`` folders,
with the pack's playground folder registered first for the run (:func:`playground_loras`).

Seconds per image are wall clock, node set-up (once per case and method) amortised over the case's seeds, after
one untimed warm-up sample. A method that raises is reported with its error and no images or scores; the others
still run.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import comfy.sample
import folder_paths
import numpy as np
from PIL import Image, ImageDraw

from ..composition.clora import CLoraOptions
from ..nodes.clora import LoomCLora, LoomCLoraConcept
from ..nodes.lora_stack import LoomLoraStack
from ..nodes.regions import LoomCompose, LoomRegion
from ..playground import latent
from ..playground.model import LORA_DIR, PlaygroundModel, load_playground, lora_path
from ..playground.scoring import CASES, SPLITS, Case, ImageScore, Rates, aggregate, case_named, case_seeds, score_image
from ..playground.world import concept

logger = logging.getLogger(__name__)

METHODS = ("base", "merged", "switch", "composite", "regional", "regional+refine", "regional@0.4", "clora")
BASELINE = "merged"
GRID_SCALE, GRID_GAP, GRID_LABEL_WIDTH, GRID_HEADER = 2, 2, 112, 14


# Node inputs an ablation may override (everything but the wiring: model, clip, prompts, regions / concepts).
COMPOSE_INPUTS = frozenset(inspect.signature(LoomCompose.execute).parameters) - {"model", "clip", "global_prompt",
                                                                                  "regions"}
CLORA_INPUTS = frozenset(f.name for f in fields(CLoraOptions))


class QualityError(ValueError):
    """A benchmark option is out of range; the message names it."""


@dataclass(frozen=True)
class QualityConfig:
    """The cases of ``split`` (``tune``, ``heldout`` or ``all``), narrowed to ``cases`` by name when given;
    ``seeds`` per case from its split's first seed + ``first_seed`` on, sampler settings shared by every method,
    image ``size`` in pixels and the ``methods`` to run (in this order). ``compose`` / ``clora`` override Loom
    Compose / Loom CLoRA node inputs by name (``(("base_ratio", 0.0),)``) for ablations; empty: node defaults.
    ``clora_words``: each CLoRA concept is named by the words of its object (``subject``: "red toy") or by its
    trigger word alone (``trigger``: "toy"; a style, which has none, by its object's noun)."""

    cases: tuple[str, ...] = ()
    split: str = "all"
    seeds: int = 4
    first_seed: int = 0
    steps: int = 20
    cfg: float = 3.0
    sampler: str = "euler"
    scheduler: str = "simple"
    size: int = 64
    methods: tuple[str, ...] = METHODS
    compose: tuple[tuple[str, Any], ...] = ()
    clora: tuple[tuple[str, Any], ...] = ()
    clora_words: str = "subject"

    def selected_cases(self) -> tuple[Case, ...]:
        if self.split not in (*SPLITS, "all"):
            raise QualityError(f"quality.split: {self.split!r} is not one of {(*SPLITS, 'all')}")
        try:
            named = [case_named(n) for n in self.cases]
        except KeyError as exc:
            raise QualityError(f"quality.cases: {exc.args[0]}") from exc
        cases = tuple(c for c in (named or CASES) if self.split in ("all", c.split))
        if not cases:
            raise QualityError(f"quality.cases: none of {list(self.cases)} is in the {self.split!r} split")
        return cases

    def validate(self) -> QualityConfig:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise QualityError(f"quality.methods: {unknown or 'none'} not among {METHODS}")
        if self.seeds < 1 or self.steps < 1 or self.cfg <= 0 or self.size < 16 or self.size % 16:
            raise QualityError(f"quality: seeds {self.seeds} and steps {self.steps} must be >= 1, cfg {self.cfg} "
                               f"> 0, size {self.size} a multiple of 16")
        self.selected_cases()
        if self.clora_words not in ("subject", "trigger"):
            raise QualityError(f"quality.clora_words: {self.clora_words!r} is not 'subject' or 'trigger'")
        for name, node, allowed in (("compose", "Loom Compose", COMPOSE_INPUTS), ("clora", "Loom CLoRA", CLORA_INPUTS)):
            unknown = [key for key, _ in getattr(self, name) if key not in allowed]
            if unknown:
                raise QualityError(f"quality.{name}: {unknown} are not {node} inputs; known: {sorted(allowed)}")
        return self


@dataclass(frozen=True)
class QualityRow:
    """One method over every case and seed: rates from :func:`~..playground.scoring.aggregate`, wall-clock
    ``seconds_per_image`` and the ``error`` that stopped it (empty when it ran)."""

    method: str
    images: int
    presence: float
    clean: float
    complete: float
    vanishing: float
    confusion: float
    leakage: float
    seconds_per_image: float
    error: str = ""


@dataclass(frozen=True)
class QualityReport:
    """The rows (config order), every score per method and the first seed's image per (case, method); a failed
    method has neither."""

    config: QualityConfig
    rows: tuple[QualityRow, ...]
    scores: dict[str, tuple[ImageScore, ...]] = field(default_factory=dict)
    samples: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def below_baseline(self, baseline: str = BASELINE) -> list[str]:
        """Methods that ran and whose presence rate is below ``baseline``'s (empty when it did not run)."""
        base = next((r for r in self.rows if r.method == baseline and not r.error), None)
        if base is None:
            return []
        return [r.method for r in self.rows if r.method != baseline and not r.error and r.presence < base.presence]

    def rates(self, method: str, keep: Callable[[Case], bool] = lambda case: True) -> Rates:
        """``method``'s rates over the cases ``keep`` accepts (e.g. the interfering ones, one split)."""
        cases = {case.name: case for case in self.config.selected_cases()}
        return aggregate([s for s in self.scores.get(method, ()) if keep(cases[s.case])])

    def to_json(self) -> str:
        return json.dumps({"config": {f.name: getattr(self.config, f.name) for f in fields(self.config)},
                           "rows": [{f.name: getattr(r, f.name) for f in fields(r)} for r in self.rows]}, indent=1)


@contextlib.contextmanager
def playground_loras() -> Iterator[None]:
    """The playground LoRA folder is ComfyUI's first ``loras`` folder while the benchmark runs; the previous
    folder list is restored after."""
    before = list(folder_paths.get_folder_paths("loras"))
    folder_paths.add_model_folder_path("loras", str(LORA_DIR), is_default=True)
    try:
        yield
    finally:
        folder_paths.folder_names_and_paths["loras"][0][:] = before


def lora_rows(concepts: Sequence[str]) -> str:
    """A Loom LoRA Stack's rows JSON: one row per concept's LoRA file, by name (resolved in ``loras``)."""
    return json.dumps([{"lora": lora_path(name).name, "on": True, "strength": 1.0} for name in concepts])


def encode(clip: Any, text: str) -> list:
    """What the stock CLIPTextEncode does."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _stack(model: Any, concepts: Sequence[str], clip: Any = None, mode: str = "auto") -> tuple:
    return LoomLoraStack.execute(model, lora_rows(concepts), clip=clip, mode=mode).result


def method_setup(method: str, playground: PlaygroundModel, case: Case,
                 config: QualityConfig = QualityConfig()) -> tuple[Any, list, list]:
    """(MODEL, positive, negative) for ``method`` on ``case``, built with the real nodes as a workflow wires them
    (node defaults but for ``config.compose`` / ``config.clora``)."""
    model, clip = playground.patcher, playground.clip
    if method == "base":
        return model, encode(clip, case.prompt), encode(clip, "")
    if method in ("merged", "switch", "composite"):
        stacked, stacked_clip = _stack(model, case.concepts, clip, mode=method)[:2]
        return stacked, encode(stacked_clip, case.prompt), encode(stacked_clip, "")
    if method in ("regional", "regional+refine", "regional@0.4"):
        regions = None
        for region in case.regions:
            adapters = _stack(model, region.concepts)[2] if region.concepts else None
            regions = LoomRegion.execute(region.prompt, *region.box, adapters=adapters, regions=regions).result[0]
        inputs = dict(config.compose)
        if method == "regional+refine":
            inputs["refinement"] = True
        if method == "regional@0.4":
            inputs["rules_end_percent"] = 0.4
        composed, positive = LoomCompose.execute(model, clip, case.prompt, regions, **inputs).result
        return composed, positive, encode(clip, "")
    if method == "clora":
        concepts = None
        for name in case.concepts:
            adapters = _stack(model, [name])[2]
            words = case.subject_of(name)
            if config.clora_words == "trigger":
                words = concept(name).trigger or words.split()[-1]
            concepts = LoomCLoraConcept.execute(adapters, case.prompt, words, concepts=concepts).result[0]
        d = replace(CLoraOptions(), **dict(config.clora))
        fused, positive = LoomCLora.execute(
            model, clip, case.prompt, concepts, step_size=d.step_size, update_end_percent=d.update_end_percent,
            iterations=d.iterations, temperature=d.temperature, alpha=d.alpha, morphology=d.morphology,
            kernel=d.kernel, fuse_start_percent=d.fuse_start_percent, map_size=d.map_size,
            map_blocks=d.map_blocks).result[:2]
        return fused, positive, encode(clip, "")
    raise QualityError(f"quality: unknown method {method!r}; known: {METHODS}")


def generate(model: Any, positive: list, negative: list, seed: int, config: QualityConfig) -> np.ndarray:
    """One image ``[size, size, 3]`` (float32, 0..1): ComfyUI's sampler, as the stock KSampler calls it."""
    empty = latent.empty(1, config.size, config.size)
    noise = comfy.sample.prepare_noise(empty, seed)
    samples = comfy.sample.sample(model, noise, config.steps, config.cfg, config.sampler, config.scheduler,
                                  positive, negative, empty, seed=seed, disable_pbar=True)
    return latent.decode(samples)[0].numpy()


def run_quality(config: QualityConfig = QualityConfig(), playground: PlaygroundModel | None = None,
                progress: Callable[[str], None] | None = None) -> QualityReport:
    """Generate and score every (case, seed, method); ``playground`` defaults to the committed model."""
    config.validate()
    playground = playground or load_playground()
    cases = config.selected_cases()
    scores: dict[str, list[ImageScore]] = {m: [] for m in config.methods}
    seconds = dict.fromkeys(config.methods, 0.0)
    errors: dict[str, str] = {}
    samples: dict[tuple[str, str], np.ndarray] = {}
    with playground_loras():
        warm_up = method_setup("base", playground, cases[0])  # first-call costs (model load) stay out of the timing
        generate(*warm_up, config.first_seed, replace(config, steps=1))
        for case in cases:
            for method in config.methods:
                if method in errors:
                    continue
                start = time.perf_counter()
                try:
                    model, positive, negative = method_setup(method, playground, case, config)
                    for seed in case_seeds(case, config.seeds, config.first_seed):
                        image = generate(model, positive, negative, seed, config)
                        scores[method].append(score_image(image, case))
                        samples.setdefault((case.name, method), image)
                except Exception as exc:  # noqa: BLE001 (one failing method must not hide the others' rows)
                    errors[method] = f"{type(exc).__name__}: {exc}"
                    logger.warning("quality: %s failed on case %s: %s", method, case.name, errors[method])
                    continue
                finally:
                    seconds[method] += time.perf_counter() - start
                if progress is not None:
                    progress(f"{case.name} {method}: {seconds[method]:.1f}s so far")
    rows = []
    for method in config.methods:
        rates = aggregate(scores[method] if method not in errors else [])
        images = rates.images
        rows.append(QualityRow(method=method, images=images, presence=rates.presence, clean=rates.clean,
                               complete=rates.complete,
                               vanishing=rates.vanishing, confusion=rates.confusion, leakage=rates.leakage,
                               seconds_per_image=seconds[method] / images if images else 0.0,
                               error=errors.get(method, "")))
    return QualityReport(config, tuple(rows), {m: tuple(s) for m, s in scores.items() if m not in errors},
                         {key: image for key, image in samples.items() if key[1] not in errors})


def concept_vanishing(report: QualityReport) -> dict[str, dict[str, float]]:
    """Per method, per concept name: the share of that concept's appearances in the cases where it vanished."""
    cases = {case.name: case for case in report.config.selected_cases()}
    table: dict[str, dict[str, float]] = {}
    for method, scores in report.scores.items():
        counts: dict[str, list[int]] = {}
        for score in scores:
            for name, vanished in zip(cases[score.case].concepts, score.vanished):
                counts.setdefault(name, [0, 0])
                counts[name][0] += int(vanished)
                counts[name][1] += 1
        table[method] = {name: gone / total for name, (gone, total) in counts.items()}
    return table


def grid_image(report: QualityReport) -> Image.Image:
    """The first seed's images, cases down and methods across, labelled (a failed method's cells stay blank)."""
    cases = report.config.selected_cases()
    methods = report.config.methods
    cell = report.config.size * GRID_SCALE + GRID_GAP
    width, height = GRID_LABEL_WIDTH + len(methods) * cell, GRID_HEADER + len(cases) * cell
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for column, method in enumerate(methods):
        draw.text((GRID_LABEL_WIDTH + column * cell + 2, 1), method, fill=(0, 0, 0))
    for row, case in enumerate(cases):
        top = GRID_HEADER + row * cell
        draw.text((2, top + cell // 2 - 6), case.name, fill=(0, 0, 0))
        for column, method in enumerate(methods):
            image = report.samples.get((case.name, method))
            if image is None:
                continue
            tile = Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8))
            tile = tile.resize((cell - GRID_GAP, cell - GRID_GAP), Image.NEAREST)
            canvas.paste(tile, (GRID_LABEL_WIDTH + column * cell, top))
    return canvas
