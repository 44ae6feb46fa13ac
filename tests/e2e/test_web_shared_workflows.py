"""Shared workflows: every example appears in ComfyUI's template browser and loads in the real UI with all its
LoRAs found; a workflow naming a LoRA missing here is resolved by sha256 or named, with its hash, in a message,
and never pointed at a different LoRA."""
from __future__ import annotations

import hashlib
import json
import urllib.parse
from pathlib import Path

from browser import comfy_page, load_workflow
from demo_workflows import two_regions

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
EXAMPLES = sorted((REPO / "example_workflows").glob("*.json"))
GONE_SHA = "ab" * 32

ROWS_JS = """() => window.app.graph._nodes.filter(n => n.type === 'LoomLoraStack').sort((a, b) => a.id - b.id)
    .map(n => JSON.parse(n.widgets.find(w => w.name === 'rows').value))"""


def test_examples_are_in_the_template_browser(comfy_server):
    templates = comfy_server.get_json("/workflow_templates")
    assert sorted(templates["lora-loom"]) == sorted(p.stem for p in EXAMPLES)
    for path in EXAMPLES:
        status, body = comfy_server.request(f"/api/workflow_templates/lora-loom/{urllib.parse.quote(path.name)}")
        assert status == 200 and json.loads(body)["nodes"], path.name
        # the thumbnail the template browser asks for: <name>.jpg
        status, body = comfy_server.request(f"/api/workflow_templates/lora-loom/{urllib.parse.quote(path.stem)}.jpg")
        assert status == 200 and body[:3] == b"\xff\xd8\xff", path.stem


def test_every_example_loads_in_the_ui_with_its_loras_found(comfy_server):
    with comfy_page(comfy_server, ARTIFACTS) as page:
        for path in EXAMPLES:
            workflow = json.loads(path.read_text())
            load_workflow(page, workflow)
            page.wait_for_function("() => window.app.loomWorkflowLoras !== undefined")
            check = page.evaluate("() => window.app.loomWorkflowLoras")
            assert check == {"missing": [], "resolved": []}, path.name
            page.evaluate("() => { delete window.app.loomWorkflowLoras; }")
            types = sorted(page.evaluate("() => window.app.graph._nodes.map(n => n.type)"))
            assert types == sorted(n["type"] for n in workflow["nodes"]), path.name
        ours = [e for e in page.errors if "loom" in e.lower()]
        assert not ours, ours


def test_missing_lora_is_resolved_by_hash_or_named_with_its_hash(comfy_server, loras_dir, object_info):
    red_sha = hashlib.sha256((loras_dir / "loom_demo_red.safetensors").read_bytes()).hexdigest()
    workflow = two_regions(object_info)
    stacks = [n for n in workflow["nodes"] if n["type"] == "LoomLoraStack"]
    # region 1 names the red LoRA by its name on another machine; region 2 a file nobody here has
    stacks[0]["widgets_values"][0] = json.dumps([{"lora": "their/red_v2.safetensors", "on": True, "strength": 0.9,
                                                  "sha256": red_sha}])
    stacks[1]["widgets_values"][0] = json.dumps([{"lora": "gone.safetensors", "on": True, "strength": 1.0,
                                                  "sha256": GONE_SHA}])
    with comfy_page(comfy_server, ARTIFACTS) as page:
        load_workflow(page, workflow)
        page.wait_for_function("() => window.app.loomWorkflowLoras !== undefined")
        check = page.evaluate("() => window.app.loomWorkflowLoras")
        assert [(r["lora"], r["found"]) for r in check["resolved"]] == [
            ("their/red_v2.safetensors", "loom_demo_red.safetensors")]
        assert [(r["lora"], r["sha256"]) for r in check["missing"]] == [("gone.safetensors", GONE_SHA)]
        rows = page.evaluate(ROWS_JS)
        assert rows[0] == [{"lora": "loom_demo_red.safetensors", "on": True, "strength": 0.9, "sha256": red_sha}]
        assert rows[1] == [{"lora": "gone.safetensors", "on": True, "strength": 1, "sha256": GONE_SHA}]
        notice = page.locator(".loom-notice", has_text="gone.safetensors")
        notice.wait_for()
        assert GONE_SHA in notice.inner_text()
        # the message leaves the Run button free, and the row itself says what is missing and what to do
        run = page.get_by_role("button", name="Run").first.bounding_box()
        box = notice.bounding_box()
        assert (box["x"] + box["width"] <= run["x"] or run["x"] + run["width"] <= box["x"]
                or box["y"] + box["height"] <= run["y"] or run["y"] + run["height"] <= box["y"]), (box, run)
        missing_row = page.locator(".loom-stack-row-missing")
        missing_row.wait_for()
        assert "gone.safetensors" in missing_row.locator("select").input_value()
        assert GONE_SHA[:12] in missing_row.inner_text() and missing_row.locator(".loom-stack-find").is_enabled()
        page.screenshot(path=str(ARTIFACTS / "web_shared_workflow_missing_lora.png"))
