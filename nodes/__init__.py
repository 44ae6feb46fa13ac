"""V3 ComfyUI nodes of LoRA Loom. Each node's ``execute()`` calls one function of the pack; no math here."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


def node_list() -> list[type[io.ComfyNode]]:
    """Every node of the pack, in menu order."""
    from . import lora_stack, regions

    return [*lora_stack.NODES, *regions.NODES]


class LoomExtension(ComfyExtension):
    """The pack's extension object, returned by ``comfy_entrypoint``."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()
