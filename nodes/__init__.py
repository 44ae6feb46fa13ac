"""V3 ComfyUI nodes of LoRA Loom. Each node's ``execute()`` calls one function of the pack; no math here."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


def node_list() -> list[type[io.ComfyNode]]:
    """Every node of the pack, in menu order."""
    from . import clora, gates, library, lora_stack, playground, regions

    return [*lora_stack.NODES, *gates.NODES, *regions.NODES, *clora.NODES, *library.NODES, *playground.NODES]


class LoomExtension(ComfyExtension):
    """The pack's extension object, returned by ``comfy_entrypoint``."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.75 never awaits ComfyExtension.on_load, so the web panel's routes are added here; the
        # server adds its routes to the app after every pack has loaded. register() is idempotent.
        from . import routes

        routes.register()
        return node_list()
