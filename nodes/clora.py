"""CLoRA nodes: ``Loom CLoRA Concept``, ``Loom CLoRA``, ``Loom CLoRA Masks``."""
from __future__ import annotations

from comfy_api.latest import io

from ..composition.clora import MORPHOLOGY, CLoraOptions
from ..composition.comfy_bridge.clora import clora
from ..composition.comfy_bridge.clora_masks import clora_masks
from ..composition.runtime.clora import CLoraConcept
from .checks import LoomNode
from .regions import LoomRegions
from .types import LoomAdapters

LoomCLoraConcepts = io.Custom("LOOM_CLORA_CONCEPTS")  # tuple[CLoraConcept, ...]
LoomCLoraHandle = io.Custom("LOOM_CLORA")             # the CLoRA controller (masks of the latest run)


class LoomCLoraConcept(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomCLoraConcept",
            display_name="Loom CLoRA Concept",
            category="loom/clora",
            description="One LoRA of a CLoRA composition: its adapters, its own prompt and the concept word(s) it "
                        "paints (found in the base prompt and in this prompt). Chain concepts through 'concepts'.",
            inputs=[
                LoomAdapters.Input("adapters", tooltip="from Loom LoRA Stack: this concept's LoRAs"),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="the full prompt for this LoRA, e.g. the base prompt with its trigger word"),
                io.String.Input("concept", default="", tooltip="the concept's word(s), e.g. 'cat' or 'red fox'"),
                io.String.Input("prompt_tokens", default="", optional=True,
                                tooltip="power users: content-token indices in this prompt (e.g. '2,3'), "
                                        "instead of the word search"),
                io.String.Input("base_tokens", default="", optional=True,
                                tooltip="power users: content-token indices in the base prompt"),
                LoomCLoraConcepts.Input("concepts", optional=True, tooltip="earlier concepts; this one is appended"),
            ],
            outputs=[LoomCLoraConcepts.Output(display_name="concepts")],
        )

    @classmethod
    def execute(cls, adapters, prompt: str, concept: str, prompt_tokens: str = "", base_tokens: str = "",
                concepts=None) -> io.NodeOutput:
        item = CLoraConcept(prompt, concept, tuple(adapters or ()), prompt_tokens or "", base_tokens or "")
        return io.NodeOutput(tuple(concepts or ()) + (item,))


class LoomCLora(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = CLoraOptions()
        return io.Schema(
            node_id="LoomCLora",
            display_name="Loom CLoRA",
            category="loom/clora",
            description="CLoRA: several LoRAs without drawn regions. Each step runs the base prompt and one pass per "
                        "LoRA, steers each LoRA's attention to its concept (contrastive latent updates in the first "
                        "steps) and fuses the predictions with attention masks. Feed the model WITHOUT those LoRAs "
                        "merged; use MODEL and CONDITIONING with any sampler.",
            inputs=[
                io.Model.Input("model", tooltip="the Flux model, without the concepts' LoRAs merged in"),
                io.Clip.Input("clip", tooltip="the text encoder that reads the prompts"),
                io.String.Input("base_prompt", multiline=True, default="",
                                tooltip="the whole picture in words, naming every concept, e.g. 'a cat and a dog'"),
                LoomCLoraConcepts.Input("concepts", tooltip="from Loom CLoRA Concept: one per LoRA"),
                io.Float.Input("step_size", default=d.step_size, min=0.0, max=1000.0, step=0.5,
                               tooltip="how hard each early step pushes the picture so every concept gets its own "
                                       "place (0: no push)"),
                io.Float.Input("update_end_percent", default=d.update_end_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="latent updates while sampling is below this fraction (0 = none)"),
                io.Int.Input("iterations", default=d.iterations, min=0, max=50,
                             tooltip="gradient steps per updated sampling step"),
                io.Float.Input("temperature", default=d.temperature, min=0.01, max=10.0, step=0.01,
                               tooltip="how sharply concepts are told apart while pushing (lower: sharper)"),
                io.Float.Input("alpha", default=d.alpha, min=0.0, max=1.0, step=0.01,
                               tooltip="how much of the picture each concept's mask takes: pixels where its "
                                       "attention is above this share of its peak"),
                io.Combo.Input("morphology", options=list(MORPHOLOGY), default=d.morphology,
                               tooltip="tidy the masks: close fills small holes, open removes specks, "
                                       "none keeps them raw"),
                io.Int.Input("kernel", default=d.kernel, min=1, max=15, step=2,
                             tooltip="size in map pixels of the tidying above (odd; larger: smoother masks)"),
                io.Float.Input("fuse_start_percent", default=d.fuse_start_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="masked fusion from this fraction of sampling on (before: LoRAs averaged)"),
                io.Int.Input("map_size", default=d.map_size, min=4, max=128,
                             tooltip="longest side of the attention maps (image queries are strided)"),
                io.String.Input("map_blocks", default=d.map_blocks,
                                tooltip="blocks whose attention is read: 'all-double', 'all' or e.g. 'd6-12 s0-3'"),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Conditioning.Output(display_name="CONDITIONING"),
                     LoomCLoraHandle.Output(display_name="clora")],
        )

    @classmethod
    def execute(cls, model, clip, base_prompt: str, concepts, step_size: float, update_end_percent: float,
                iterations: int, temperature: float, alpha: float, morphology: str, kernel: int,
                fuse_start_percent: float, map_size: int, map_blocks: str) -> io.NodeOutput:
        options = CLoraOptions(temperature=temperature, step_size=step_size, update_end_percent=update_end_percent,
                               iterations=iterations, alpha=alpha, morphology=morphology, kernel=kernel,
                               fuse_start_percent=fuse_start_percent, map_size=map_size, map_blocks=map_blocks)
        result = clora(model, clip, base_prompt, list(concepts), options)
        return io.NodeOutput(result.model, result.conditioning, result.composition)


class LoomCLoraMasks(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomCLoraMasks",
            display_name="Loom CLoRA Masks",
            category="loom/clora",
            description="After sampling: CLoRA's concept masks (one per LoRA), a preview and regions for Loom Compose "
                        "(automatic regions). Connect the sampler's LATENT so this runs after it.",
            inputs=[LoomCLoraHandle.Input("clora", tooltip="from Loom CLoRA: the run whose masks to show"),
                    io.Latent.Input("samples", tooltip="the sampler's output, so this runs after sampling"),
                    io.Int.Input("batch_index", default=0, min=0, max=63, tooltip="which image of the batch")],
            outputs=[io.Mask.Output(display_name="MASK"), io.Image.Output(display_name="IMAGE"),
                     LoomRegions.Output(display_name="regions")],
        )

    @classmethod
    def execute(cls, clora, samples, batch_index: int = 0) -> io.NodeOutput:
        result = clora_masks(clora, samples, batch_index)
        return io.NodeOutput(result.masks, result.preview, result.regions)


NODES = [LoomCLoraConcept, LoomCLora, LoomCLoraMasks]
