"""``Loom Library Search`` in a real workflow: the demo example with the search node (prompt + the demo
CLIP) feeding its LORA_STACK into ``Loom LoRA Stack`` on the demo Flux; the run makes an image and the node's
hits text names the LoRA the prompt describes."""
from __future__ import annotations

from pathlib import Path

import torch
from demo_workflows import demo
from loomdev.workflow import ui_to_api
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]


def write_demo_lora(path: Path, seed: int, metadata: dict[str, str], rank: int = 1) -> None:
    """A rank-``rank`` kohya LoRA that fits the demo Flux (hidden 3072): image qkv of double block 0."""
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(rank, 3072, generator=g) * 0.02,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(9216, rank, generator=g) * 0.02,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(float(rank)),
    }, str(path), metadata=metadata)


def search_workflow(object_info: dict, prompt: str, **search_inputs: object) -> tuple[dict, str]:
    """The demo example in API form with a ``LoomLibrarySearch`` node feeding ``LoomLoraStack.lora_stack``."""
    api = ui_to_api(demo(object_info), object_info)
    stack = next(k for k, n in api.items() if n["class_type"] == "LoomLoraStack")
    clip = next(k for k, n in api.items() if n["class_type"] == "CLIPLoader")
    search = "900"
    api[search] = {"class_type": "LoomLibrarySearch",
                   "inputs": {"prompt": prompt, "top_k": 1, "strength": 0.8, "clip": [clip, 0], "rescan": True,
                              **search_inputs}}
    api[stack]["inputs"]["lora_stack"] = [search, 0]
    return api, search


def test_search_node_feeds_the_stack_and_names_its_hit(comfy_server, object_info, loras_dir) -> None:
    assert "LoomLibrarySearch" in object_info
    outputs = object_info["LoomLibrarySearch"]["output"]
    assert outputs == ["LORA_STACK", "LOOM_ADAPTERS", "STRING"]
    write_demo_lora(loras_dir / "library" / "glasswing_butterfly.safetensors", 1,
                    {"ss_output_name": "glasswing butterfly", "modelspec.trigger_phrase": "glsw"})
    write_demo_lora(loras_dir / "library" / "rusted_locomotive.safetensors", 2,
                    {"ss_output_name": "rusted locomotive"})
    api, search = search_workflow(object_info, "a glasswing butterfly on a leaf")
    entry = comfy_server.wait(comfy_server.queue(api))
    images = comfy_server.output_images(entry)
    assert images and images[0].is_file()
    hits = entry["outputs"][search]["text"][0]
    assert hits.startswith("1. library/glasswing_butterfly.safetensors") and "why: matched name: glasswing" in hits
    assert "rusted_locomotive" not in hits


def test_search_node_with_no_hit_runs_with_an_empty_stack(comfy_server, object_info, loras_dir) -> None:
    write_demo_lora(loras_dir / "library" / "rusted_locomotive.safetensors", 2, {"ss_output_name": "rusted locomotive"})
    api, search = search_workflow(object_info, "rusted locomotive", folder="no_such_folder")
    entry = comfy_server.wait(comfy_server.queue(api))
    assert comfy_server.output_images(entry)
    assert entry["outputs"][search]["text"][0] == "no LoRA in the library matches 'rusted locomotive'"
