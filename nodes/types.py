"""Custom socket types shared by the pack's nodes."""
from comfy_api.latest import io

LoraStack = io.Custom("LORA_STACK")        # [(lora_name, model_strength, clip_strength), ...] as other packs use
LoomAdapters = io.Custom("LOOM_ADAPTERS")  # tuple[StackEntry, ...]: loaded adapters for the composition nodes
