"""The first hour in the UI, in real headless Chromium against the real server (issue 19): the examples open
readable and without overlap (the playground one from the address `make run` prints), the stack editor fits its
node and flags a LoRA made for another model before Run, the library panel says when nothing matched, pages,
groups copies and badges fit, Library Search shows its picks on the node, the Compose view says it is a view
and flags overlaps, prompt boxes are as tall as CLIP Text Encode's and a bad rule_blocks is caught while
editing. Screenshots go to test-artifacts/."""
from __future__ import annotations

import json
import shutil
import urllib.parse
from pathlib import Path

import torch
from browser import comfy_page, load_workflow
from loomdev.examples import EXAMPLES_LIST, PLAYGROUND_EXAMPLE, example
from safetensors.torch import save_file
from test_web_stack import wait_for_new_prompt

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
FOLDER = REPO / "example_workflows"
RING, RED = "playground_ring.safetensors", "loom_demo_red.safetensors"

OVERLAPS_JS = """() => { const ns = window.app.graph._nodes, out = [];
  for (const a of ns) for (const b of ns) if (a.id < b.id) { const A = a.getBounding(), B = b.getBounding();
    if (A[0] < B[0] + B[2] && B[0] < A[0] + A[2] && A[1] < B[1] + B[3] && B[1] < A[1] + A[3])
      out.push([a.title, b.title]); }
  return out; }"""


def shot(page, name: str) -> None:
    page.wait_for_timeout(300)
    page.screenshot(path=str(ARTIFACTS / f"web_first_hour_{name}.png"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def open_panel(page) -> None:
    page.locator(".loom-library-tab-button").click()
    page.wait_for_selector(".loom-library .loom-lib-query")


def search(page, text: str) -> None:
    page.locator(".loom-lib-query").fill(text)
    page.locator(".loom-lib-query").press("Enter")


def status_has(page, text: str) -> None:
    page.wait_for_function("(t) => document.querySelector('.loom-lib-status')?.textContent.includes(t)", arg=text)


def test_make_run_address_opens_the_playground_readable(comfy_server):
    """What `make run` prints: the page opens the playground example itself, at a readable zoom, nothing overlaps."""
    address = f"/?{urllib.parse.urlencode({'loom_example': PLAYGROUND_EXAMPLE.title}, quote_via=urllib.parse.quote)}"
    with comfy_page(comfy_server, ARTIFACTS, path=address) as page:
        page.wait_for_function("() => window.app.graph._nodes.some(n => n.type === 'LoomCompose')", timeout=60_000)
        page.wait_for_timeout(1000)
        titles = page.evaluate("() => window.app.graph._nodes.map(n => n.title)")
        assert "Playground: a style in one region" in titles  # its note
        assert page.evaluate("() => window.app.canvas.ds.scale") >= 0.75
        assert page.evaluate(OVERLAPS_JS) == []
        assert "loom_example" not in page.url  # the address is cleaned: a reload keeps the user's own work
        shot(page, "make_run_playground")


def test_every_example_opens_readable_without_overlap(comfy_server):
    with comfy_page(comfy_server, ARTIFACTS) as page:
        for item in EXAMPLES_LIST:
            load_workflow(page, load(FOLDER / item.file_name))
            page.wait_for_timeout(800)  # editors draw and grow their nodes
            assert page.evaluate(OVERLAPS_JS) == [], item.title
            assert page.evaluate("() => window.app.canvas.ds.scale") >= 0.75, item.title
            shot(page, "example_" + item.result_prefix)
        ours = [e for e in page.errors if "loom" in e.lower()]
        assert not ours, ours


def test_template_browser_shows_the_thumbnails(comfy_server):
    with comfy_page(comfy_server, ARTIFACTS) as page:
        page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        page.get_by_text("lora-loom", exact=True).first.click()
        for item in EXAMPLES_LIST:
            page.get_by_text(item.title).first.wait_for()
        # the gallery shows each fetched thumbnail (as a blob: address); ours are 256 pixels high
        page.wait_for_function("""(n) => [...document.querySelectorAll('img')].filter(i =>
            i.complete && i.naturalHeight === 256).length >= n""", arg=len(EXAMPLES_LIST))
        shot(page, "template_browser")


def write_wide_lora(path: Path) -> None:
    """A LoRA for a Flux of width 3072 (the demo model), which the playground (width 192) cannot take."""
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 3072),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 2)}, str(path))


def stack_workflow() -> dict:
    """The stack example with three rows: a playground LoRA (fits), a demo LoRA (made for another width) and
    one nobody has."""
    workflow = load(FOLDER / example("Loom LoRA stack - base vs LoRA").file_name)
    stack = next(n for n in workflow["nodes"] if n["type"] == "LoomLoraStack")
    stack["widgets_values"][0] = json.dumps([{"lora": RING, "on": True, "strength": 1},
                                             {"lora": RED, "on": True, "strength": 1},
                                             {"lora": "gone/nowhere.safetensors", "on": True, "strength": 1,
                                              "sha256": "cd" * 32}])
    return workflow


def test_stack_editor_fits_its_node_and_flags_rows_before_run(comfy_server):
    with comfy_page(comfy_server, ARTIFACTS) as page:
        load_workflow(page, stack_workflow())
        page.wait_for_selector(".loom-stack-row-misfit")
        page.wait_for_selector(".loom-stack-row-missing")
        stack = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'LoomLoraStack').id")
        page.evaluate(f"""() => {{ const n = window.app.graph.getNodeById({stack}); const c = window.app.canvas;
            c.ds.scale = 1; c.ds.offset = [-n.pos[0] + 120, -n.pos[1] + 160]; c.setDirty(true, true); }}""")
        page.wait_for_timeout(500)
        # everything the editor draws lies inside the node, whatever its rows hold
        node_box = page.evaluate(f"""() => {{ const n = window.app.graph.getNodeById({stack});
            const c = window.app.canvas; const r = c.canvas.getBoundingClientRect();
            const [x, y] = c.ds.convertOffsetToCanvas(n.pos);
            return [r.left + x, r.top + y, n.size[0] * c.ds.scale, n.size[1] * c.ds.scale]; }}""")
        for element in page.locator(".loom-stack button, .loom-stack input, .loom-stack select").all():
            box = element.bounding_box()
            assert node_box[0] - 1 <= box["x"] and box["x"] + box["width"] <= node_box[0] + node_box[2] + 1, box
            assert box["y"] + box["height"] <= node_box[1] + node_box[3] + 1, (box, node_box)
        assert page.locator(".loom-stack-header").inner_text().split() == ["on", "LoRA", "strength", "CLIP", "blocks"]
        clip = page.locator(".loom-stack-row .loom-clip").first
        assert clip.get_attribute("aria-label").startswith("CLIP strength")
        assert clip.get_attribute("placeholder") == "same"
        rows = page.locator(".loom-stack-row")
        assert "loom-stack-row-misfit" not in rows.nth(0).get_attribute("class")
        assert "width 3072" in rows.nth(1).locator(".loom-stack-fit").inner_text()
        assert "missing here" in rows.nth(2).inner_text() and "cdcdcdcdcdcd" in rows.nth(2).inner_text()
        shot(page, "stack_editor")

        # keyboard: Tab moves through the fields; Delete edits the field, never deletes the node
        strength = rows.nth(0).locator("input[type=number]").first
        strength.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("0.5")
        page.keyboard.press("Tab")
        assert page.evaluate("() => document.activeElement.classList.contains('loom-clip')")
        page.keyboard.press("Delete")
        assert page.evaluate(f"() => !!window.app.graph.getNodeById({stack})")
        rows_json = page.evaluate(f"() => JSON.parse(window.app.graph.getNodeById({stack}).widgets[0].value)")
        assert rows_json[0]["strength"] == 0.5

        # a row added grows the node instead of hanging below it
        height = page.evaluate(f"() => window.app.graph.getNodeById({stack}).size[1]")
        page.locator(".loom-stack-add").click()
        page.wait_for_function(f"() => window.app.graph.getNodeById({stack}).size[1] > {height}")
        add = page.locator(".loom-stack-add").bounding_box()
        node_box = page.evaluate(f"""() => {{ const n = window.app.graph.getNodeById({stack});
            const c = window.app.canvas; const r = c.canvas.getBoundingClientRect();
            const [x, y] = c.ds.convertOffsetToCanvas(n.pos);
            return [r.left + x, r.top + y, n.size[0] * c.ds.scale, n.size[1] * c.ds.scale]; }}""")
        assert add["y"] + add["height"] <= node_box[1] + node_box[3] + 1
        shot(page, "stack_editor_grown")


def test_library_panel_nothing_matched_pages_copies_and_fit(comfy_server, loras_dir):
    for i in range(23):  # 23 distinct files sharing one word, and a byte-identical copy of one of them
        save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.full((2, 192), float(i)),
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(576, 2)},
                  str(loras_dir / f"pebble_{i:02d}.safetensors"), metadata={"ss_output_name": f"pebble {i}"})
    (loras_dir / "copies").mkdir()
    shutil.copy(loras_dir / "pebble_00.safetensors", loras_dir / "copies" / "pebble_again.safetensors")
    write_wide_lora(loras_dir / "pebble_wide.safetensors")
    with comfy_page(comfy_server, ARTIFACTS) as page:
        load_workflow(page, stack_workflow())  # one stack, on the playground model: the panel checks fit against it
        open_panel(page)
        page.locator(".loom-lib-rescan").click()
        page.wait_for_function("() => document.querySelector('.loom-lib-scan')?.textContent.includes('added')",
                               timeout=120_000)
        page.wait_for_timeout(1500)
        assert "rescan:" in page.locator(".loom-lib-scan").inner_text()  # still there after its search

        search(page, "xyzzyqq")
        status_has(page, "nothing matched “xyzzyqq”")
        status_has(page, "closest:")
        assert page.locator(".loom-lib-closest").count() >= 1
        shot(page, "panel_nothing_matched")

        page.locator(".loom-lib-filters summary").click()
        page.locator(".loom-lib-folder").fill("no_such_folder")
        search(page, "pebble")
        status_has(page, "with filters: folder no_such_folder")
        assert page.locator(".loom-lib-clear-filters").is_visible()
        shot(page, "panel_filters_empty")
        page.locator(".loom-lib-clear-filters").click()  # clears the fit filter too: switch it back on
        page.locator(".loom-lib-fits-only").check()

        page.wait_for_function("() => document.querySelectorAll('.loom-lib-card').length === 20")
        ranks = page.locator(".loom-lib-rank").all_inner_texts()
        assert [r.strip() for r in ranks] == [f"{i}." for i in range(1, 21)]
        assert page.locator(".loom-lib-more").is_visible()
        page.locator(".loom-lib-more").click()
        page.wait_for_function("() => !document.querySelector('.loom-lib-more') ||"
                               " document.querySelector('.loom-lib-more').style.display === 'none'")
        loras = [c.get_attribute("data-lora") for c in page.locator(".loom-lib-card").all()]
        assert "pebble_wide.safetensors" not in loras, loras  # made for width 3072: filtered out
        assert len(loras) == 23, loras
        assert sum(lora in ("pebble_00.safetensors", "copies/pebble_again.safetensors") for lora in loras) == 1
        first_copy = page.locator(".loom-lib-card[data-lora='pebble_00.safetensors'], "
                                  ".loom-lib-card[data-lora='copies/pebble_again.safetensors']")
        assert "same file also at" in first_copy.locator(".loom-lib-copies").inner_text()
        assert page.locator(".loom-lib-fit-ok").count() == 23
        shot(page, "panel_more_and_copies")

        page.locator(".loom-lib-fits-only").uncheck()
        search(page, "pebble wide")
        page.wait_for_selector(".loom-lib-card[data-lora='pebble_wide.safetensors'] .loom-lib-fit-no")
        badge = page.locator(".loom-lib-card[data-lora='pebble_wide.safetensors'] .loom-lib-fit-no")
        assert "width 3072" in badge.get_attribute("title")
        details = page.evaluate(
            "async () => (await (await fetch('/loom/library/details?ref=playground_ring.safetensors')).json())")
        assert details["problems"] == [] and details["targets"].startswith("Flux, hidden 192")

        # the drag ghost: a plain "+", which every font has
        source = page.locator(".loom-lib-card").first.bounding_box()
        page.mouse.move(source["x"] + 20, source["y"] + 20)
        page.mouse.down()
        page.mouse.move(source["x"] + 80, source["y"] + 40, steps=5)
        assert page.locator(".loom-lib-ghost").inner_text().startswith("+ ")
        page.mouse.move(source["x"] + 20, source["y"] + 20, steps=3)
        page.mouse.up()


def test_library_search_shows_its_picks_and_the_views_name_every_region_lora(comfy_server):
    workflow = load(FOLDER / example("Loom library search then compose").file_name)
    with comfy_page(comfy_server, ARTIFACTS) as page:
        load_workflow(page, workflow)
        assert page.locator(".loom-pick-none").count() == 2  # before a run
        before = set(comfy_server.get_json("/history"))
        page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        comfy_server.wait(wait_for_new_prompt(comfy_server, before), timeout=600)
        page.wait_for_function("() => document.querySelectorAll('.loom-pick').length === 2", timeout=60_000)
        picks = page.locator(".loom-pick").all_inner_texts()
        assert picks[0].startswith("1. playground_ring.safetensors") and "score" in picks[0]
        assert picks[1].startswith("1. playground_stripes.safetensors")
        compose = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'LoomCompose').id")
        regions = page.evaluate(f"() => window.app.graph.getNodeById({compose}).loomCompose.draw()")
        assert [r["loras"] for r in regions] == [[RING], ["playground_stripes.safetensors"]]
        legend = page.locator(".loom-compose-legend").inner_text()
        assert legend.startswith("View only (2 regions)") and "overlap" not in legend
        page.evaluate(f"() => window.app.canvas.centerOnNode(window.app.graph.getNodeById({compose}))")
        shot(page, "library_search_picks")

        # regions that overlap are flagged in the Compose view
        page.evaluate("""() => { const r = window.app.graph._nodes.find(n => n.title === 'Region 1');
            r.widgets.find(w => w.name === 'x1').value = 0.7; window.app.canvas.setDirty(true, true); }""")
        page.wait_for_function(
            "() => document.querySelector('.loom-compose-overlap')?.textContent.includes('regions 1 and 2 overlap')")
        shot(page, "compose_view_overlap")


def test_fresh_nodes_have_tall_prompts_and_rule_blocks_is_checked_while_editing(comfy_server):
    with comfy_page(comfy_server, ARTIFACTS) as page:
        heights = page.evaluate("""async () => {
            const out = {};
            for (const type of ['CLIPTextEncode', 'LoomRegion', 'LoomCompose', 'LoomLibrarySearch']) {
                const node = LiteGraph.createNode(type);
                node.pos = [100 + 500 * Object.keys(out).length, 100];
                window.app.graph.add(node);
                out[type] = node.id;
            }
            // all four in view: frontend 1.49 hides the DOM widgets of nodes outside it
            window.app.canvas.ds.scale = 0.6; window.app.canvas.ds.offset = [0, 0];
            window.app.canvas.setDirty(true, true);
            await new Promise((r) => setTimeout(r, 800));
            const h = {};
            for (const [type, id] of Object.entries(out)) {
                const node = window.app.graph.getNodeById(id);
                h[type] = node.widgets.find(w => w.type === 'customtext').element.getBoundingClientRect().height
                    / window.app.canvas.ds.scale;
            }
            return h; }""")
        reference = heights.pop("CLIPTextEncode")
        for node_type, height in heights.items():
            assert height >= 0.9 * reference, (node_type, height, reference)
        compose = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'LoomCompose').id")
        page.evaluate(f"""() => {{
            const w = window.app.graph.getNodeById({compose}).widgets.find(w => w.name === 'rule_blocks');
            w.value = 'd0-18 x9'; w.callback(w.value); }}""")
        page.wait_for_function("() => document.querySelector('.loom-rule-blocks-problem')"
                               "?.textContent.includes(\"cannot read 'x9'\")")
        shot(page, "fresh_nodes")
        page.evaluate(f"""() => {{
            const w = window.app.graph.getNodeById({compose}).widgets.find(w => w.name === 'rule_blocks');
            w.value = 'd0-1 s0-1'; w.callback(w.value); }}""")
        page.wait_for_function("() => document.querySelector('.loom-rule-blocks-problem')?.textContent === ''")


def test_every_input_of_every_loom_node_has_a_tooltip(object_info):
    missing = [f"{name}.{field}" for name, info in object_info.items() if name.startswith("Loom")
               for group in ("required", "optional") for field, spec in info["input"].get(group, {}).items()
               if not (len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("tooltip"))]
    assert missing == []
