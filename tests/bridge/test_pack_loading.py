"""ComfyUI's own custom-node loader imports the pack and registers its V3 nodes."""
import asyncio
import sys
from pathlib import Path

import nodes as comfy_nodes  # ComfyUI's top-level module

REPO = Path(__file__).resolve().parents[2]


def test_comfyui_loader_registers_loom_nodes_without_shadowing_its_own_modules():
    before = set(comfy_nodes.NODE_CLASS_MAPPINGS)
    assert asyncio.run(comfy_nodes.load_custom_node(str(REPO)))
    ours = set(comfy_nodes.NODE_CLASS_MAPPINGS) - before
    assert "LoomLoraStack" in ours
    assert all(n.startswith("Loom") for n in ours)
    assert Path(sys.modules["nodes"].__file__).parent != REPO / "nodes", "our nodes/ shadows ComfyUI's nodes"
    for node_id in ours:
        schema = comfy_nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert schema.display_name.startswith("Loom ")
        assert schema.category.startswith("loom")
