"""The LoRA Stack row editor in real headless Chromium against the real server: add a row from the UI (the
library pins the file's sha256 on it), export the workflow JSON, reload it, queue it from the UI and see the
output image."""
import hashlib
import json
import time
from pathlib import Path

import torch
from browser import comfy_page, export_workflow, load_workflow
from demo_workflows import demo
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"


def write_demo_lora(path: Path, seed: int = 0, rank: int = 4) -> None:
    """A kohya-format LoRA for the demo Flux (hidden 3072): image-stream qkv of double block 0."""
    g = torch.Generator().manual_seed(seed)
    save_file({
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(rank, 3072, generator=g) * 0.02,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(9216, rank, generator=g) * 0.02,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(float(rank)),
    }, str(path), metadata={"modelspec.trigger_phrase": "loomtest", "ss_output_name": path.stem})


def wait_for_new_prompt(server, before: set, timeout: float = 60) -> str:
    """The id of the prompt the UI queued (it shows up in /queue or /history)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = server.get_json("/queue")
        ids = {item[1] for item in queue["queue_running"] + queue["queue_pending"]} | set(server.get_json("/history"))
        new = ids - before
        if new:
            return new.pop()
        time.sleep(0.3)
    raise TimeoutError("the UI did not queue a prompt")


def stack_rows(page) -> list:
    return json.loads(page.evaluate(
        "() => window.app.graph._nodes.find(n => n.type === 'LoomLoraStack')"
        ".widgets.find(w => w.name === 'rows').value"))


def test_stack_editor_adds_row_round_trips_and_queues(comfy_server, loras_dir, object_info):
    write_demo_lora(loras_dir / "web_test_lora.safetensors")
    sha256 = hashlib.sha256((loras_dir / "web_test_lora.safetensors").read_bytes()).hexdigest()
    example = demo(object_info)
    with comfy_page(comfy_server, ARTIFACTS) as page:
        load_workflow(page, example)
        editor = page.locator(".loom-stack")
        assert editor.count() == 1
        page.locator(".loom-stack-add").click()
        page.wait_for_function("() => document.querySelectorAll('.loom-stack-row').length === 1")
        # the new row takes the first LoRA in the list (a demo LoRA); pick ours in its select
        page.locator(".loom-stack-row select").select_option("web_test_lora.safetensors")
        page.wait_for_function("() => { const r = JSON.parse(window.app.graph._nodes.find(n => n.type === "
                               "'LoomLoraStack').widgets.find(w => w.name === 'rows').value)[0];"
                               " return r?.lora === 'web_test_lora.safetensors' && r.sha256; }")
        rows = stack_rows(page)
        assert rows == [{"lora": "web_test_lora.safetensors", "on": True, "strength": 1, "sha256": sha256}]
        strength = page.locator(".loom-stack-row input[type=number]").first
        strength.fill("0.75")
        strength.dispatch_event("change")
        assert stack_rows(page)[0]["strength"] == 0.75
        page.screenshot(path=str(ARTIFACTS / "web_stack_editor.png"))

        exported = export_workflow(page)
        node = next(n for n in exported["nodes"] if n["type"] == "LoomLoraStack")
        assert json.loads(node["widgets_values"][0])[0]["strength"] == 0.75
        load_workflow(page, example)
        assert stack_rows(page) == []
        load_workflow(page, exported)
        assert stack_rows(page)[0] == {"lora": "web_test_lora.safetensors", "on": True, "strength": 0.75,
                                       "sha256": sha256}
        assert page.locator(".loom-stack-row").count() == 1

        before = set(comfy_server.get_json("/history"))
        page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        queued = wait_for_new_prompt(comfy_server, before)
        entry = comfy_server.wait(queued)
        images = comfy_server.output_images(entry)
        assert images and images[0].is_file()
        page.screenshot(path=str(ARTIFACTS / "web_stack_after_queue.png"))
        ours = [e for e in page.errors if "loom" in e.lower()]
        assert not ours, ours


def test_stack_editor_renames_a_row_whose_file_has_another_name_here(comfy_server, loras_dir, object_info):
    """A workflow from another machine names `their_name.safetensors`; here the same bytes are
    `renamed/here.safetensors`: the editor asks the library by sha256 and points the row at the local file."""
    (loras_dir / "renamed").mkdir()
    write_demo_lora(loras_dir / "renamed" / "here.safetensors", seed=5)
    sha256 = hashlib.sha256((loras_dir / "renamed" / "here.safetensors").read_bytes()).hexdigest()
    workflow = demo(object_info)
    node = next(n for n in workflow["nodes"] if n["type"] == "LoomLoraStack")
    node["widgets_values"][0] = json.dumps([{"lora": "their_name.safetensors", "on": True, "strength": 0.5,
                                             "sha256": sha256}])
    with comfy_page(comfy_server, ARTIFACTS) as page:
        load_workflow(page, workflow)
        page.wait_for_function("() => JSON.parse(window.app.graph._nodes.find(n => n.type === 'LoomLoraStack')"
                               ".widgets.find(w => w.name === 'rows').value)[0].lora !== 'their_name.safetensors'")
        assert stack_rows(page) == [{"lora": "renamed/here.safetensors", "on": True, "strength": 0.5, "sha256": sha256}]
