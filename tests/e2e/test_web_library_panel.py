"""The LoRA Library sidebar tab in real headless Chromium against the real server: open the panel, search by
prompt, read a card (preview, trigger words, why) and its details, drag cards onto the canvas with the mouse
(onto a Loom LoRA Stack, then onto empty canvas, which creates a stack), export and reload the workflow JSON,
queue it from the UI and see the output image."""
from __future__ import annotations

import hashlib
from pathlib import Path

from browser import comfy_page, export_workflow, load_workflow
from demo_workflows import demo
from test_web_stack import wait_for_new_prompt

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
RED, BLUE = "loom_demo_red.safetensors", "loom_demo_blue.safetensors"

STACKS_JS = """() => window.app.graph._nodes.filter(n => n.type === 'LoomLoraStack').map(n => ({
    id: n.id, pos: [n.pos[0], n.pos[1]], rows: JSON.parse(n.widgets.find(w => w.name === 'rows').value)}))"""


def client_point(page, graph_pos: list[float]) -> tuple[float, float]:
    """Where a point of the graph is on the screen."""
    return tuple(page.evaluate("""(p) => { const c = window.app.canvas; const r = c.canvas.getBoundingClientRect();
        const [x, y] = c.ds.convertOffsetToCanvas(p); return [r.left + x, r.top + y]; }""", graph_pos))


def drag(page, source, to: tuple[float, float]) -> None:
    """A real mouse drag: press on the card, move in steps, release over the canvas."""
    box = source.bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + 60, box["y"] + box["height"] / 2, steps=4)
    page.mouse.move(*to, steps=12)
    page.mouse.up()


def card(page, lora: str):
    return page.locator(f".loom-lib-card[data-lora='{lora}']")


def test_library_panel_search_details_drag_round_trip_and_queue(comfy_server, loras_dir, object_info):
    sha = {name: hashlib.sha256((loras_dir / name).read_bytes()).hexdigest() for name in (RED, BLUE)}
    example = demo(object_info)
    with comfy_page(comfy_server, ARTIFACTS) as page:
        load_workflow(page, example)
        page.locator(".loom-library-tab-button").click()
        page.wait_for_selector(".loom-library .loom-lib-query")
        page.locator(".loom-lib-query").fill("red fox, crimson")
        page.locator(".loom-lib-query").press("Enter")
        page.wait_for_function(f"() => document.querySelector('.loom-lib-card')?.dataset.lora === '{RED}'")
        first = card(page, RED)
        assert "loomred" in first.locator(".loom-lib-trigger").all_inner_texts()
        assert "red" in first.locator(".loom-lib-why").inner_text()
        page.wait_for_function(
            f"() => document.querySelector(\".loom-lib-card[data-lora='{RED}'] img\")?.naturalWidth > 0")
        page.screenshot(path=str(ARTIFACTS / "web_library_panel_search.png"))

        first.locator(".loom-lib-details-button").click()
        page.wait_for_selector(".loom-lib-details table")
        details = page.locator(".loom-lib-details").inner_text()
        assert sha[RED] in details and "loomred" in details and "flux-1-dev/lora" in details
        page.screenshot(path=str(ARTIFACTS / "web_library_panel_details.png"))
        page.locator(".loom-lib-back").click()

        # a tag filter: excluding "red" drops the red LoRA from the same search
        page.locator(".loom-lib-filters summary").click()
        page.locator(".loom-lib-exclude").fill("red")
        page.locator(".loom-lib-exclude").press("Enter")
        page.wait_for_function("() => document.querySelector('.loom-lib-status')?.textContent.includes('“red fox')"
                               f" && !document.querySelector(\".loom-lib-card[data-lora='{RED}']\")")
        page.locator(".loom-lib-exclude").fill("")
        page.locator(".loom-lib-query").press("Enter")
        page.wait_for_function(f"() => document.querySelector('.loom-lib-card')?.dataset.lora === '{RED}'")

        # drop the red card on the example's (empty) stack node: its title bar
        [stack] = page.evaluate(STACKS_JS)
        drag(page, card(page, RED), client_point(page, [stack["pos"][0] + 60, stack["pos"][1] - 12]))
        page.wait_for_function(STACKS_JS.replace("=> window", "=> (window") + ")[0].rows.length === 1")
        assert page.evaluate(STACKS_JS)[0]["rows"] == [{"lora": RED, "on": True, "strength": 1, "sha256": sha[RED]}]

        # nothing selected: a drop on empty canvas creates a new stack at the drop point
        page.evaluate("() => window.app.canvas.deselectAll()")
        page.locator(".loom-lib-query").fill("blue bird, cobalt")
        page.locator(".loom-lib-query").press("Enter")
        page.wait_for_function(f"() => document.querySelector('.loom-lib-card')?.dataset.lora === '{BLUE}'")
        drop_at = [stack["pos"][0], stack["pos"][1] + 420]
        drag(page, card(page, BLUE), client_point(page, drop_at))
        page.wait_for_function(STACKS_JS.replace("=> window", "=> (window") + ").length === 2")
        created = page.evaluate(STACKS_JS)[1]
        assert created["rows"] == [{"lora": BLUE, "on": True, "strength": 1, "sha256": sha[BLUE]}]
        assert abs(created["pos"][0] - drop_at[0]) < 2 and abs(created["pos"][1] - drop_at[1]) < 2
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "web_library_panel_dropped.png"))

        exported = export_workflow(page)
        load_workflow(page, example)
        assert page.evaluate(STACKS_JS)[0]["rows"] == []
        load_workflow(page, exported)
        assert [s["rows"] for s in page.evaluate(STACKS_JS)] == [
            [{"lora": RED, "on": True, "strength": 1, "sha256": sha[RED]}],
            [{"lora": BLUE, "on": True, "strength": 1, "sha256": sha[BLUE]}]]

        before = set(comfy_server.get_json("/history"))
        page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        entry = comfy_server.wait(wait_for_new_prompt(comfy_server, before))
        images = comfy_server.output_images(entry)
        assert images and images[0].is_file()
        ours = [e for e in page.errors if "loom" in e.lower()]
        assert not ours, ours


def test_library_panel_shows_the_playground_concept_loras(comfy_server, loras_dir):
    """The playground's concept LoRAs are in the default workspace's library: a search by concept finds each one,
    with its trigger word (the two toys share "toy"; the style has none) and its preview (drawn by the playground
    renderer)."""
    with comfy_page(comfy_server, ARTIFACTS) as page:
        page.locator(".loom-library-tab-button").click()
        page.wait_for_selector(".loom-library .loom-lib-query")
        for query, lora, trigger in (("star shape", "playground_star.safetensors", "star"),
                                     ("ring shape", "playground_ring.safetensors", "ring"),
                                     ("striped texture", "playground_stripes.safetensors", "striped"),
                                     ("toy star", "playground_star_toy.safetensors", "toy"),
                                     ("toy ring", "playground_ring_toy.safetensors", "toy"),
                                     ("vertical bars style", "playground_bars.safetensors", None)):
            page.locator(".loom-lib-query").fill(query)
            page.locator(".loom-lib-query").press("Enter")
            page.wait_for_function(f"() => document.querySelector('.loom-lib-card')?.dataset.lora === '{lora}'")
            triggers = card(page, lora).locator(".loom-lib-trigger").all_inner_texts()
            assert trigger in triggers if trigger else not triggers, (lora, triggers)  # a style has no trigger
            page.wait_for_function(
                f"() => document.querySelector(\".loom-lib-card[data-lora='{lora}'] img\")?.naturalWidth > 0")
        page.screenshot(path=str(ARTIFACTS / "web_library_panel_playground.png"))
