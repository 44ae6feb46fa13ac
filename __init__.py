"""LoRA Loom: a ComfyUI node pack for composing Flux LoRAs. ComfyUI reads only the two names below."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """V3 entry point: ComfyUI awaits this and registers the returned extension's nodes."""
    from .nodes import LoomExtension

    return LoomExtension()
