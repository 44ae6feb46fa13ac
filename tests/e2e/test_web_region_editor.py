"""The region editor in real headless Chromium against the real server: on the two-region example, draw a new
box, move it and resize it with the mouse on Loom Region's canvas (the latent's aspect ratio), see every region
on Loom Compose, export the workflow JSON, reload it exactly, queue it from the UI and see the output image."""
from __future__ import annotations

from pathlib import Path

import pytest
from browser import comfy_page, export_workflow, load_workflow
from demo_workflows import two_regions
from test_web_stack import wait_for_new_prompt

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
KEYS = ("x0", "y0", "x1", "y1")

BOXES_JS = """() => window.app.graph._nodes.filter(n => n.type === 'LoomRegion').sort((a, b) => a.id - b.id)
    .map(n => Object.fromEntries(['x0', 'y0', 'x1', 'y1'].map(k => [k, n.widgets.find(w => w.name === k).value])))"""


def region_id(page, title: str) -> int | str:
    return page.evaluate("(t) => window.app.graph._nodes.find(n => n.title === t).id", title)


def show_node(page, node_id: int) -> None:
    """Pan and zoom the canvas so the node is in view at zoom 1, then let the DOM widgets follow."""
    page.evaluate("""(id) => { const c = window.app.canvas; const n = window.app.graph.getNodeById(id);
        c.ds.scale = 1; c.ds.offset = [-n.pos[0] + 420, -n.pos[1] + 120]; c.setDirty(true, true); }""", node_id)
    page.wait_for_timeout(400)


def to_client(page, node_id: int, x: float, y: float) -> tuple[float, float]:
    """A normalised point of the region's canvas (0..1 over the latent) on the screen."""
    return tuple(page.evaluate("""([id, x, y]) => { const s = window.app.graph.getNodeById(id).loomRegion.surface;
        const r = s.canvas.getBoundingClientRect();
        const kx = r.width / s.canvas.width, ky = r.height / s.canvas.height;
        return [r.left + (s.view.left + x * s.view.width) * kx, r.top + (s.view.top + y * s.view.height) * ky]; }""",
                               [node_id, x, y]))


def mouse_drag(page, start: tuple[float, float], end: tuple[float, float]) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=8)
    page.mouse.up()


def test_region_editor_draw_move_resize_round_trip_and_queue(comfy_server, object_info):
    example = two_regions(object_info)
    with comfy_page(comfy_server, ARTIFACTS) as page:
        load_workflow(page, example)
        assert page.locator(".loom-region-editor").count() == 2
        assert page.locator(".loom-compose-view").count() == 1
        first = region_id(page, "Region 1")
        show_node(page, first)
        before = page.evaluate(BOXES_JS)
        assert before[0] == {"x0": 0.0, "y0": 0.1, "x1": 0.5, "y1": 0.9}

        # draw: press outside the box, drag to the opposite corner
        mouse_drag(page, to_client(page, first, 0.7, 0.15), to_client(page, first, 0.95, 0.6))
        assert page.evaluate(BOXES_JS)[0] == pytest.approx({"x0": 0.7, "y0": 0.15, "x1": 0.95, "y1": 0.6}, abs=0.011)
        # move: press inside, drag left and down
        mouse_drag(page, to_client(page, first, 0.8, 0.3), to_client(page, first, 0.5, 0.5))
        assert page.evaluate(BOXES_JS)[0] == pytest.approx({"x0": 0.4, "y0": 0.35, "x1": 0.65, "y1": 0.8}, abs=0.021)
        # resize: the south-east corner
        corner = page.evaluate(BOXES_JS)[0]
        mouse_drag(page, to_client(page, first, corner["x1"], corner["y1"]), to_client(page, first, 0.9, 0.95))
        edited = page.evaluate(BOXES_JS)[0]
        assert edited == pytest.approx({"x0": corner["x0"], "y0": corner["y0"], "x1": 0.9, "y1": 0.95}, abs=0.011)
        assert all(round(v, 2) == v for v in edited.values())  # on the widgets' 0.01 grid
        assert page.evaluate(BOXES_JS)[1] == before[1]  # the other region is untouched
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "web_region_editor.png"))

        # the latent's aspect: a 256x128 latent makes the drawing area twice as wide as high
        page.evaluate("""() => { const n = window.app.graph._nodes.find(n => n.type === 'EmptySD3LatentImage');
            n.widgets.find(w => w.name === 'width').value = 256; window.app.canvas.setDirty(true, true); }""")
        page.wait_for_function(f"""() => {{ const v = window.app.graph.getNodeById({first}).loomRegion.surface.view;
            return Math.abs(v.width / v.height - 2) < 0.01; }}""")
        compose = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'LoomCompose').id")
        show_node(page, compose)
        regions = page.evaluate(f"() => window.app.graph.getNodeById({compose}).loomCompose.draw()")
        assert [r["prompt"] for r in regions] == ["loomred a red fox", "loomblue a blue bird"]
        assert {k: regions[0]["box"][k] for k in KEYS} == edited
        assert regions[0]["loras"] == ["loom_demo_red.safetensors"]
        page.screenshot(path=str(ARTIFACTS / "web_region_compose_view.png"))

        exported = export_workflow(page)
        # the live graph's node ids are strings from frontend 1.4x on; serialize() writes numbers
        node = next(n for n in exported["nodes"] if str(n["id"]) == str(first))
        assert node["widgets_values"][1:5] == [edited[k] for k in KEYS]
        load_workflow(page, example)
        assert page.evaluate(BOXES_JS)[0] == before[0]
        load_workflow(page, exported)
        assert page.evaluate(BOXES_JS)[0] == edited

        queued_before = set(comfy_server.get_json("/history"))
        page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        entry = comfy_server.wait(wait_for_new_prompt(comfy_server, queued_before))
        images = comfy_server.output_images(entry)
        assert len(images) == 2 and all(p.is_file() for p in images)
        ours = [e for e in page.errors if "loom" in e.lower()]
        assert not ours, ours
