"""Regional composition nodes: ``Loom Region``, ``Loom Regions``, ``Loom Compose``, ``Loom Region Preview``."""
from __future__ import annotations

from comfy_api.latest import io

from ..composition.comfy_bridge.region_preview import combine_regions, make_region, preview_image
from ..composition.comfy_bridge.regional import compose
from ..composition.plan import BACKGROUND_MODES, ComposeOptions, parse_rule_blocks
from .checks import LoomNode
from .types import LoomAdapters

DEFAULTS = ComposeOptions()  # Loom Compose's input defaults are the options' (chosen in composition/plan.py)

LoomRegions = io.Custom("LOOM_REGIONS")  # tuple[ComposedRegion, ...]
COMBINE_INPUTS = 6


def _box_input(name: str, default: float) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.01,
                          tooltip="box edge as a fraction of the canvas (0 = left/top, 1 = right/bottom)")


class LoomRegion(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomRegion",
            display_name="Loom Region",
            category="loom/regions",
            description="One region of a regional composition: a box (or a mask), its own prompt and the LoRAs "
                        "that paint it. Chain regions through 'regions'.",
            inputs=[
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="what this region shows, in words (with its LoRA's trigger word)"),
                _box_input("x0", 0.25), _box_input("y0", 0.25), _box_input("x1", 0.75), _box_input("y1", 0.75),
                io.Boolean.Input("isolate", default=True,
                                 tooltip="keep other regions' image tokens out of this one (concept isolation)"),
                LoomAdapters.Input("adapters", optional=True,
                                   tooltip="from Loom LoRA Stack: the LoRAs applied inside this region only"),
                io.Mask.Input("mask", optional=True, tooltip="overrides the box"),
                LoomRegions.Input("regions", optional=True, tooltip="earlier regions; this one is appended"),
            ],
            outputs=[LoomRegions.Output(display_name="regions")],
        )

    @classmethod
    def execute(cls, prompt: str, x0: float, y0: float, x1: float, y1: float, isolate: bool = True,
                adapters=None, mask=None, regions=None) -> io.NodeOutput:
        return io.NodeOutput(make_region(prompt, (x0, y0, x1, y1), mask, tuple(adapters or ()), isolate, regions))


class LoomRegionsCombine(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomRegions",
            display_name="Loom Regions",
            category="loom/regions",
            description="Combine region lists in order (chain several of these for more).",
            inputs=[LoomRegions.Input(f"regions_{i}", optional=i > 1,
                                     tooltip="regions to add, in this order (from Loom Region or Loom Regions)")
                    for i in range(1, COMBINE_INPUTS + 1)],
            outputs=[LoomRegions.Output(display_name="regions")],
        )

    @classmethod
    def execute(cls, **groups) -> io.NodeOutput:
        return io.NodeOutput(combine_regions(*(groups.get(f"regions_{i}") for i in range(1, COMBINE_INPUTS + 1))))


class LoomCompose(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomCompose",
            display_name="Loom Compose",
            category="loom/regions",
            description="Regional composition (LoRA-Composer on Flux) in one pass per step: each region's LoRAs "
                        "act on its own tokens, attention keeps regions to their prompts. Feed the model "
                        "WITHOUT those LoRAs merged; use MODEL and CONDITIONING with any sampler.",
            inputs=[
                io.Model.Input("model", tooltip="the Flux model, WITHOUT the regions' LoRAs merged in"),
                io.Clip.Input("clip", tooltip="the text encoder that reads the prompts"),
                io.String.Input("global_prompt", multiline=True, default="",
                                tooltip="the whole picture in words; each region adds its own prompt"),
                LoomRegions.Input("regions", tooltip="from Loom Region / Loom Regions: boxes with prompts and LoRAs"),
                io.Combo.Input("background", options=list(BACKGROUND_MODES), default=DEFAULTS.background,
                               tooltip="global: background sees every region; isolated: background only sees "
                                       "background; shared: background also reads every region prompt"),
                io.Float.Input("base_ratio", default=DEFAULTS.base_ratio, min=0.0, max=1.0, step=0.01,
                               tooltip="how much each region still looks at the whole picture while the region "
                                       "rules apply (0: only its own region; higher: smoother seams, more mixing)"),
                io.Boolean.Input("injection", default=DEFAULTS.injection,
                                 tooltip="region prompts reach only their region"),
                io.Boolean.Input("isolation", default=DEFAULTS.isolation,
                                 tooltip="regions' image tokens do not see each other (LoRA-Composer's concept "
                                         "isolation; off by default: seeing the whole canvas is how the model forms "
                                         "whole objects, and each region's LoRAs stay on its own tokens anyway)"),
                io.String.Input("rule_blocks", default="all",
                                tooltip="which model blocks keep regions apart: 'all', or e.g. 'd0-18 s0-19' "
                                        "(d = double, s = single blocks, counted from 0)"),
                io.Float.Input("rules_end_percent", default=DEFAULTS.end_percent, min=0.0, max=1.0, step=0.01,
                               tooltip="the rules apply from the start to this fraction of sampling (1.0: every step, "
                                       "LoRA-Composer; ~0.4: early steps only, Regional-Prompting-FLUX)"),
                io.Boolean.Input("latent_reinit", default=DEFAULTS.latent_reinit,
                                 tooltip="start each region from the starting noise that best suits its concept "
                                         "(LoRA-Composer), so concepts appear where their boxes are"),
                io.Boolean.Input("refinement", default=DEFAULTS.refinement,
                                 tooltip="nudge the picture during the first steps so each concept stays in its box "
                                         "(LoRA-Composer; slow)"),
                io.Boolean.Input("global_text_adapters", default=DEFAULTS.global_text_adapters, optional=True,
                                 tooltip="read the global prompt's words with every region's LoRAs (trigger words "
                                         "there mean what the LoRAs taught); off (default): no region's LoRA "
                                         "reaches another region through the global prompt, which matters when "
                                         "LoRAs share a class word or a style has no trigger"),
                io.Boolean.Input("regions_see_global_prompt", default=DEFAULTS.regions_see_global, optional=True,
                                 tooltip="while the rules apply, regions also read the global prompt (off: each "
                                         "region reads only its own prompt, LoRA-Composer's concept injection)"),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, model, clip, global_prompt: str, regions, background: str = DEFAULTS.background,
                base_ratio: float = DEFAULTS.base_ratio, injection: bool = DEFAULTS.injection,
                isolation: bool = DEFAULTS.isolation, rule_blocks: str = "all",
                rules_end_percent: float = DEFAULTS.end_percent, latent_reinit: bool = DEFAULTS.latent_reinit,
                refinement: bool = DEFAULTS.refinement, global_text_adapters: bool = DEFAULTS.global_text_adapters,
                regions_see_global_prompt: bool = DEFAULTS.regions_see_global) -> io.NodeOutput:
        double_blocks, single_blocks = parse_rule_blocks(rule_blocks)
        options = ComposeOptions(background=background, base_ratio=base_ratio, injection=injection,
                                 isolation=isolation, double_blocks=double_blocks, single_blocks=single_blocks,
                                 end_percent=rules_end_percent, latent_reinit=latent_reinit, refinement=refinement,
                                 global_text_adapters=global_text_adapters,
                                 regions_see_global=regions_see_global_prompt)
        result = compose(model, clip, global_prompt, list(regions), options)
        return io.NodeOutput(result.model, result.conditioning)


class LoomRegionPreview(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomRegionPreview",
            display_name="Loom Region Preview",
            category="loom/regions",
            description="An image of the regions on the canvas: boxes or masks, prompts and LoRA names.",
            inputs=[LoomRegions.Input("regions", tooltip="the regions to draw"),
                    io.Int.Input("width", default=1024, min=16, max=8192, step=8, tooltip="image width in pixels"),
                    io.Int.Input("height", default=1024, min=16, max=8192, step=8, tooltip="image height in pixels")],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, regions, width: int, height: int) -> io.NodeOutput:
        return io.NodeOutput(preview_image(list(regions), width, height))


NODES = [LoomRegion, LoomRegionsCombine, LoomCompose, LoomRegionPreview]
