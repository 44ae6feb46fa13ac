"""The pack's three web editors with the frontend's new node renderer ("Nodes 2.0", Vue nodes; setting
Comfy.VueNodes.Enabled) switched on, in real headless Chromium against the real server: on the two-region
example, each editor sits inside its Vue node; the region box editors and the Compose view have drawn their boxes
(their canvases read back, pixel colours compared with the region colours); a box resized by mouse lands in the
widget value that the workflow serialises and the Compose view redraws with it, as every editor does when the
latent's width is typed into its node; a stack row switched off by a click lands in the stack's serialised rows
(its rows JSON stays hidden). The setting is put back to the classic canvas afterwards."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from statistics import median

import pytest
from browser import comfy_page, export_workflow, load_workflow
from demo_workflows import two_regions
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from test_web_region_editor import BOXES_JS, mouse_drag, region_id, show_node, to_client

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
SETTING = "Comfy.VueNodes.Enabled"

# web/region_boxes.js REGION_COLORS and web/region_editor.js drawRegion/drawBackground: a box is its region's
# colour at 28% over the latent's #1b1b1b (12% for the earlier regions a Loom Region shows faintly).
BACKGROUND = (0x1B, 0x1B, 0x1B)
RED, BLUE = (0xE4, 0x57, 0x2E), (0x29, 0xA3, 0xE0)


def over_background(colour: tuple[int, int, int], alpha: float) -> tuple[float, ...]:
    return tuple(alpha * c + (1 - alpha) * b for c, b in zip(colour, BACKGROUND))


def pixel(page, node_id, x: float, y: float) -> tuple[float, ...]:
    """The colour a node's editor canvas holds at normalised latent point (x, y): the median of a 7x7 patch (a
    grid line or a letter of a label does not move it), read back from the canvas itself."""
    patch = page.evaluate("""([id, x, y]) => { const node = window.app.graph.getNodeById(id);
        const s = (node.loomRegion ?? node.loomCompose).surface;
        const px = Math.round(s.view.left + x * s.view.width), py = Math.round(s.view.top + y * s.view.height);
        return Array.from(s.canvas.getContext('2d').getImageData(px - 3, py - 3, 7, 7).data); }""", [node_id, x, y])
    return tuple(median(patch[c::4]) for c in range(3))


def assert_colour(page, node_id, point: tuple[float, float], expected: tuple[float, ...], what: str) -> None:
    got = pixel(page, node_id, *point)
    assert got == pytest.approx(expected, abs=6), f"{what} at {point}: canvas has {got}, expected {expected}"


@contextmanager
def vue_nodes(page, server):
    """The Vue node renderer switched on through the frontend's settings API (skipped where the frontend has no
    such setting), and back to the classic canvas afterwards (settings are stored per user on the server)."""
    known = page.evaluate("(id) => !!window.app.ui.settings.settingsLookup?.[id]", SETTING)
    if not known:
        version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? 'unknown'")
        pytest.skip(f"frontend {version} has no {SETTING} setting: it has no Vue node renderer to test")
    try:
        page.evaluate("async (id) => { await window.app.extensionManager.setting.set(id, true); }", SETTING)
        assert page.evaluate("(id) => window.app.extensionManager.setting.get(id)", SETTING) is True
        yield
    finally:
        server.request(f"/settings/{SETTING}", False)


def test_editors_draw_and_edit_inside_vue_nodes(comfy_server, object_info):
    example = two_regions(object_info)
    with comfy_page(comfy_server, ARTIFACTS) as page, vue_nodes(page, comfy_server):
        load_workflow(page, example)
        first, second = region_id(page, "Region 1"), region_id(page, "Region 2")
        compose = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'LoomCompose').id")
        stack = region_id(page, "LoRA for region 1")  # a node id by its title
        # each editor is inside its own Vue node (the renderer moved the DOM widget there)
        hosts = page.evaluate("""() => Object.fromEntries(['.loom-region-editor', '.loom-compose-view', '.loom-stack']
            .map(sel => [sel, [...document.querySelectorAll(sel)].map(e => e.closest('[data-node-id]')?.dataset.nodeId)
                .sort()]))""")
        assert hosts == {".loom-region-editor": sorted([str(first), str(second)]), ".loom-compose-view": [str(compose)],
                         ".loom-stack": sorted(str(i) for i in page.evaluate(
                             "() => window.app.graph._nodes.filter(n => n.type === 'LoomLoraStack').map(n => n.id)"))}
        show_node(page, first)
        try:
            page.wait_for_function("""(ids) => ids.every(id => { const n = window.app.graph.getNodeById(id);
                return (n.loomRegion ?? n.loomCompose).surface.view; })""",
                                   arg=[first, second, compose], timeout=15_000)
        except PlaywrightTimeout:
            pytest.fail("the region editors and the Compose view never drew inside their Vue nodes")

        # drawn: the canvases hold the boxes in the region colours, the latent's background outside them
        red, blue = over_background(RED, 0.28), over_background(BLUE, 0.28)
        assert_colour(page, first, (0.3, 0.7), red, "Region 1's box in its editor")
        assert_colour(page, first, (0.8, 0.7), BACKGROUND, "outside the boxes in Region 1's editor")
        assert_colour(page, second, (0.8, 0.7), blue, "Region 2's box in its editor")
        assert_colour(page, second, (0.3, 0.7), over_background(RED, 0.12), "Region 1 shown faintly on Region 2")
        assert_colour(page, compose, (0.3, 0.7), red, "Region 1's box on Loom Compose")
        assert_colour(page, compose, (0.8, 0.7), blue, "Region 2's box on Loom Compose")
        assert_colour(page, compose, (0.8, 0.04), BACKGROUND, "above the boxes on Loom Compose")
        page.screenshot(path=str(ARTIFACTS / "web_vue_nodes_drawn.png"))

        # edit by mouse: drag Region 1's bottom edge from y 0.9 up to y 0.5
        before = page.evaluate(BOXES_JS)
        assert before[0] == {"x0": 0.0, "y0": 0.1, "x1": 0.5, "y1": 0.9}
        mouse_drag(page, to_client(page, first, 0.3, 0.9), to_client(page, first, 0.3, 0.5))
        edited = page.evaluate(BOXES_JS)
        assert edited[0] == pytest.approx({"x0": 0.0, "y0": 0.1, "x1": 0.5, "y1": 0.5}, abs=0.011)
        assert edited[1] == before[1]
        node = next(n for n in export_workflow(page)["nodes"] if str(n["id"]) == str(first))
        assert node["widgets_values"][1:5] == [edited[0][k] for k in ("x0", "y0", "x1", "y1")]
        # both canvases redrew on their own: the box no longer reaches y 0.7, in the editor and on Loom Compose
        page.wait_for_timeout(300)
        assert_colour(page, first, (0.3, 0.7), BACKGROUND, "where Region 1's box was, in its editor")
        assert_colour(page, first, (0.3, 0.3), red, "Region 1's resized box in its editor")
        assert_colour(page, compose, (0.3, 0.7), BACKGROUND, "where Region 1's box was, on Loom Compose")
        assert_colour(page, compose, (0.3, 0.3), red, "Region 1's resized box on Loom Compose")
        page.screenshot(path=str(ARTIFACTS / "web_vue_nodes_edited.png"))

        # an edit in another Vue node reaches the editors: the latent's width typed in (256x128) makes their drawing
        # areas twice as wide as high
        latent = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'EmptySD3LatentImage').id")
        show_node(page, latent)
        width = page.locator(f'[data-node-id="{latent}"] input').first
        assert width.input_value() == "128"
        width.focus()  # typed as a user types (frontend 1.32's number field ignores a value filled in at once)
        page.keyboard.press("Control+A")
        page.keyboard.type("256")
        page.keyboard.press("Enter")
        try:
            page.wait_for_function("""(ids) => ids.every(id => { const n = window.app.graph.getNodeById(id);
                const v = (n.loomRegion ?? n.loomCompose).surface.view;
                return Math.abs(v.width / v.height - 2) < 0.01; })""",
                                   arg=[first, second, compose], timeout=10_000)
        except PlaywrightTimeout:
            pytest.fail("the editors did not redraw for the latent's new width typed into its Vue node")

        # the stack row editor: its row shows the LoRA; switching the row off by a click lands in the rows JSON
        show_node(page, stack)
        row = page.locator(f'[data-node-id="{stack}"] .loom-stack-row')
        assert row.count() == 1
        assert row.locator("select").input_value() == "loom_demo_red.safetensors"
        # the rows JSON the editor stands for is hidden, as on the classic canvas
        assert page.locator(f'[data-node-id="{stack}"] textarea:visible').count() == 0
        row.locator("input[type=checkbox]").click()
        page.wait_for_function(f"() => !JSON.parse(window.app.graph.getNodeById({json.dumps(stack)})"
                               ".widgets.find(w => w.name === 'rows').value)[0].on")
        node = next(n for n in export_workflow(page)["nodes"] if str(n["id"]) == str(stack))
        assert [r["on"] for r in json.loads(node["widgets_values"][0])] == [False]
        ours = [e for e in page.errors if "loom" in e.lower()]
        assert not ours, ours
