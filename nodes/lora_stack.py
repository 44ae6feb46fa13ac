"""``Loom LoRA Stack``: any number of LoRA rows merged into MODEL/CLIP (or gated per token), plus LOOM_ADAPTERS."""
from __future__ import annotations

from comfy_api.latest import io

from ..composition.comfy_bridge.stack import STACK_MODES, apply_stack
from ..retrieval.comfy_bridge import resolve_lora
from .checks import LoomNode
from .gates import LoomGate
from .types import LoomAdapters, LoraStack

ROWS_HELP = ('JSON list of rows: {"lora": "file.safetensors", "on": true, "strength": 1.0, '
             '"clip_strength": null, "blocks": "double3-5=0.5", "sha256": "..."}. The Loom web UI edits this '
             'for you; "blocks" takes an Inspire-style preset, spec or 58-value vector.')
MODE_HELP = ("auto: merged, or gated when a gate is connected. merged: weights patched once (no gates). gated: "
             "per token, each row x its gate over steps and blocks (no re-patching). switch: LoRA Switch, one "
             "row per step in turn. composite: LoRA Composite, one pass per row averaged (N x slower; a baseline)")


class LoomLoraStack(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomLoraStack",
            display_name="Loom LoRA Stack",
            category="loom",
            description="Load any number of Flux LoRAs of any format and merge them into the model (and CLIP). "
                        "Also outputs the loaded adapters for Loom's composition nodes.",
            inputs=[
                io.Model.Input("model", tooltip="the Flux model the LoRAs are applied to"),
                io.Clip.Input("clip", optional=True,
                              tooltip="the text encoder; LoRAs with text-encoder parts change it too"),
                io.String.Input("rows", multiline=True, default="[]", tooltip=ROWS_HELP),
                LoraStack.Input("lora_stack", optional=True,
                                tooltip="LORA_STACK from rgthree / Easy-Use / LoRA Manager; applied first"),
                LoomGate.Input("gates", optional=True,
                               tooltip="from Loom Gate Schedule / Learned Gate / Prompt Schedule: each gate "
                                       "attaches to the row of its LoRA name (empty name: every row)"),
                io.Combo.Input("mode", options=list(STACK_MODES), default="auto", optional=True, tooltip=MODE_HELP),
                io.Int.Input("switch_every", default=1, min=1, max=1000, optional=True,
                             tooltip="LoRA Switch: steps before the next row takes over"),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Clip.Output(display_name="CLIP"),
                LoomAdapters.Output(display_name="adapters"),
                LoraStack.Output(display_name="lora_stack"),
                io.String.Output(display_name="trigger_words"),
            ],
        )

    @classmethod
    def execute(cls, model, rows: str, clip=None, lora_stack=None, gates=None, mode: str = "auto",
                switch_every: int = 1) -> io.NodeOutput:
        result = apply_stack(model, clip, rows, lora_stack, resolve=resolve_lora, gates=gates, mode=mode,
                             switch_every=switch_every)
        return io.NodeOutput(result.model, result.clip, result.entries, result.lora_stack, result.trigger_words)


NODES = [LoomLoraStack]
