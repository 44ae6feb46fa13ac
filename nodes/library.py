"""``Loom Library Search``: find LoRAs in the user's library by prompt and output them as a stack."""
from __future__ import annotations

from comfy_api.latest import io

from ..retrieval.comfy_bridge import pick_adapters, pick_summary
from .checks import LoomNode
from .types import LoomAdapters, LoraStack


class LoomLibrarySearch(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomLibrarySearch",
            display_name="Loom Library Search",
            category="loom",
            description="Search your LoRA folders by prompt (words, meaning and weights) and output the best "
                        "matches as a LoRA stack. Each hit says why it matched; each row carries the file's "
                        "sha256 so shared workflows find the same files.",
            inputs=[
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="describe the LoRA you want: a style, a subject or a trigger word"),
                io.Int.Input("top_k", default=3, min=1, max=50, tooltip="how many LoRAs to output"),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="model and CLIP strength of every picked LoRA"),
                io.String.Input("base_model", default="", optional=True,
                                tooltip="only LoRAs for this base model, e.g. 'flux dev' (empty: any)"),
                io.String.Input("folder", default="", optional=True,
                                tooltip="only LoRAs under this folder of your loras folder, e.g. 'styles'"),
                io.String.Input("include_tags", default="", optional=True,
                                tooltip="comma-separated tags every hit must have"),
                io.String.Input("exclude_tags", default="", optional=True,
                                tooltip="comma-separated tags no hit may have"),
                io.Clip.Input("clip", optional=True,
                              tooltip="Flux's CLIP: its CLIP-L embeds the prompt and the metadata for search "
                                      "by meaning (without it: the library's configured encoder)"),
                io.Boolean.Input("rescan", default=False, optional=True,
                                 tooltip="rescan the loras folders before searching (new or changed files)"),
            ],
            outputs=[
                LoraStack.Output(display_name="lora_stack"),
                LoomAdapters.Output(display_name="adapters"),
                io.String.Output(display_name="hits"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, rescan: bool = False, **_: object) -> object:
        return float("nan") if rescan else None

    @classmethod
    def execute(cls, prompt: str, top_k: int, strength: float, base_model: str = "", folder: str = "",
                include_tags: str = "", exclude_tags: str = "", clip=None, rescan: bool = False) -> io.NodeOutput:
        pick = pick_adapters(prompt, top_k, strength, base_model, folder, include_tags, exclude_tags, clip, rescan)
        # the picks go to the node too, so the web extension shows them on it (and in the region views)
        return io.NodeOutput(pick.lora_stack, pick.entries, pick.text,
                             ui={"text": (pick.text,), "loom_picks": pick_summary(pick)})


NODES = [LoomLibrarySearch]
