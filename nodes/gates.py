"""Gate nodes: ``Loom Gate Schedule``, ``Loom Learned Gate``, ``Loom Prompt Schedule``.

Each outputs ``LOOM_GATE`` (a chainable tuple of gates, each naming the LoRA row it attaches to) for the
``gates`` input of ``Loom LoRA Stack``; the stack's ``adapters`` then carry the gates into regions.
"""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..composition.comfy_bridge.gate_nodes import (
    gate_checkpoint_names,
    gate_plot,
    import_prompt,
    learned_gate,
    schedule_gate,
)
from ..composition.gates import INTERPOLATIONS
from .checks import LoomNode

LoomGate = io.Custom("LOOM_GATE")  # tuple[AdapterGate, ...]: gates for Loom LoRA Stack rows, by LoRA name

LORA_HELP = "the row's LoRA (file name, path or name without .safetensors); empty = every row of the stack"
BLOCKS_HELP = ("block weights of the gate for Flux's 19 double + 38 single blocks: a preset (DOUBLE-ONLY), spec "
               "(double1-7=1,single=0.5) or 58-value vector; empty = every block")


class LoomGateSchedule(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomGateSchedule",
            display_name="Loom Gate Schedule",
            category="loom/gates",
            description="A LoRA's strength over sampling (keyframes) and across blocks, applied inside the layers "
                        "by Loom LoRA Stack without re-patching weights. The row strength is multiplied by it.",
            inputs=[
                io.String.Input("lora", default="", tooltip=LORA_HELP),
                io.String.Input("keyframes", default="0:1, 1:1",
                                tooltip="progress:value pairs, progress 0 = first step, 1 = end "
                                        "(e.g. '0:1, 0.4:0' = structure only); a single number = constant"),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="hold",
                               tooltip="hold: steps; linear / cosine: ramps between keyframes"),
                io.String.Input("blocks", default="", tooltip=BLOCKS_HELP),
                io.Int.Input("preview_steps", default=20, min=1, max=200, tooltip="steps drawn in the preview"),
                LoomGate.Input("gates", optional=True, tooltip="earlier gates; this one is appended"),
            ],
            outputs=[LoomGate.Output(display_name="gates"), io.Image.Output(display_name="preview")],
        )

    @classmethod
    def execute(cls, lora: str, keyframes: str, interpolation: str, blocks: str, preview_steps: int = 20,
                gates=None) -> io.NodeOutput:
        result = schedule_gate(lora, keyframes, interpolation, blocks, gates)
        image = gate_plot(result, preview_steps)
        return io.NodeOutput(result, image, ui=ui.PreviewImage(image, cls=cls))


class LoomLearnedGate(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomLearnedGate",
            display_name="Loom Learned Gate",
            category="loom/gates",
            description="AutoLoRA's learned gate (DiffSynth LoRAFusion checkpoint from models/loom_gates): per "
                        "layer, channel and token, out = o + sum_i w_out * g_i * delta_i. Each gated adapter is "
                        "computed on its own (slower than stacked LoRAs).",
            inputs=[
                io.Combo.Input("checkpoint", options=gate_checkpoint_names(),
                               tooltip="a learned gate file from models/loom_gates"),
                io.String.Input("lora", default="", tooltip=LORA_HELP),
                LoomGate.Input("gates", optional=True, tooltip="earlier gates; this one is appended"),
            ],
            outputs=[LoomGate.Output(display_name="gates")],
        )

    @classmethod
    def execute(cls, checkpoint: str, lora: str = "", gates=None) -> io.NodeOutput:
        return io.NodeOutput(learned_gate(checkpoint, lora, gates))


class LoomPromptSchedule(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomPromptSchedule",
            display_name="Loom Prompt Schedule",
            category="loom/gates",
            description="Import an A1111 / prompt-control prompt (<lora:name:0.8>, [<lora:x:1>::0.5], [a:b:0.3]): "
                        "gates for the stack rows of the LoRAs it names, the text, and (with CLIP) CONDITIONING "
                        "switching at the same points. Give those rows strength 1; the tag's weight is the gate.",
            inputs=[
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="an A1111 / prompt-control prompt with <lora:name:weight> tags"),
                io.Int.Input("steps", default=0, min=0, max=10000,
                             tooltip="> 0: whole numbers in [a:b:N] are steps out of this many (as prompt-control)"),
                io.String.Input("blocks", default="", tooltip=BLOCKS_HELP),
                io.Clip.Input("clip", optional=True, tooltip="connect to also get the prompt as CONDITIONING"),
                LoomGate.Input("gates", optional=True, tooltip="earlier gates; these are appended"),
            ],
            outputs=[LoomGate.Output(display_name="gates"), io.Conditioning.Output(display_name="CONDITIONING"),
                     io.String.Output(display_name="text")],
        )

    @classmethod
    def execute(cls, prompt: str, steps: int = 0, blocks: str = "", clip=None, gates=None) -> io.NodeOutput:
        imported = import_prompt(prompt, steps, blocks, clip, gates)
        return io.NodeOutput(imported.gates, imported.conditioning, imported.text)


NODES = [LoomGateSchedule, LoomLearnedGate, LoomPromptSchedule]
