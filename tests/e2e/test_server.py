"""The pack inside a real ComfyUI server: registration, import log, the example workflow end to end."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from loomdev.examples import playground_case
from loomdev.workflow import ui_to_api
from lora_loom.playground import detector
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def test_pack_nodes_appear_in_object_info(object_info):
    ours = sorted(k for k in object_info if k.startswith("Loom"))
    assert "LoomLoraStack" in ours
    for node_id in ours:
        assert object_info[node_id]["category"].startswith("loom"), node_id
        assert object_info[node_id]["python_module"].startswith("custom_nodes.lora-loom"), node_id


def test_server_log_shows_pack_imported_without_errors(comfy_server, object_info):
    log = comfy_server.log_text()
    line = next((text for text in log.splitlines() if "custom_nodes/lora-loom" in text and "seconds" in text), None)
    assert line is not None, f"no import-time line for the pack in the log:\n{log[-3000:]}"
    assert "IMPORT FAILED" not in line
    assert not re.search(r"Cannot import .*custom_nodes/lora-loom", log)
    startup = log.split("Starting server", 1)[0]  # later errors are workflows that fail on purpose (test_security)
    errors = "\n".join(text for text in startup.splitlines() if "Traceback" in text or "Error" in text)
    assert "custom_nodes/lora-loom" not in errors


def test_web_extension_is_served(comfy_server):
    extensions = comfy_server.get_json("/extensions")
    ours = [e for e in extensions if "/lora-loom/" in e]
    assert ours, extensions
    bodies = {}
    for path in ours:
        status, bodies[path] = comfy_server.request(path)
        assert status == 200, path
    # feature files register an extension; DOM-free logic modules beside them are served too
    assert any(b"registerExtension" in body for body in bodies.values()), sorted(bodies)


def test_every_example_workflow_runs_to_an_image(comfy_server, object_info):
    examples = sorted((REPO / "example_workflows").glob("*.json"))
    assert examples, "no example workflows"
    for path in examples:
        api = ui_to_api(json.loads(path.read_text()), object_info)
        entry = comfy_server.wait(comfy_server.queue(api))
        images = comfy_server.output_images(entry)
        assert images, f"{path.name} produced no image"
        with Image.open(images[0]) as img:
            assert img.size[0] >= 64 and img.size[1] >= 64


def test_run_command_once_draws_both_concepts_in_their_regions(tmp_path):
    """`make run ARGS=--once`: the main job through its own server, exiting after the image. The default workflow
    composes the playground's trigger-less style LoRA (vertical bars) in the left half only, a plain object on
    the right: the exact detector must find each wanted object, clean, in its half of the saved (4x enlarged)
    picture; the side-by-side picture holds that image on the left and, on the right, the same seed with the
    LoRA merged, where the merge fails (the example's point: the style bars the right object too)."""
    proc = subprocess.run([sys.executable, "-m", "loomdev.run", "--once"], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [Path(p) for p in re.findall(r"image written: (\S+\.png)", proc.stderr)]
    assert written and all(p.is_file() for p in written), proc.stderr[-2000:]
    by_prefix = {p.name.rsplit("_", 2)[0]: p for p in written}
    assert set(by_prefix) == {"loom_playground", "loom_playground_regions", "loom_playground_vs_merged"}, written

    def halves(pixels: np.ndarray) -> list[tuple[bool, bool]]:
        """(present, clean) per region of the default case."""
        found = [(detector.detect(pixels, r.box), r) for r in playground_case().regions]
        return [(d.matches(r.shape, r.colour, r.texture), d.is_clean(pixels, r.shape, r.colour, r.texture))
                for d, r in found]

    with Image.open(by_prefix["loom_playground"]) as img:
        assert img.size == (256, 256)
        composed = np.asarray(img.convert("RGB"), dtype=np.float32)[::4, ::4] / 255.0
    assert halves(composed) == [(True, True), (True, True)]
    with Image.open(by_prefix["loom_playground_vs_merged"]) as img:
        assert img.size == (256 + 4 * 4 + 256, 256)  # stitched with a 4-pixel gap, then enlarged 4x
        both = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    assert np.array_equal(both[::4, :256:4], composed)
    merged = both[::4, 272::4]
    assert not all(present for present, _ in halves(merged)), "the merge drew every object right: no longer a failure"


def test_a_server_started_by_a_killed_process_does_not_outlive_it():
    """ComfyServer's child hook: SIGKILL skips every finaliser, yet the child (here `sleep`) ends with its parent."""
    script = ("import subprocess, sys, time; sys.path.insert(0, sys.argv[1]); from loomdev.server import "
              "_die_with_parent; p = subprocess.Popen(['sleep', '120'], start_new_session=True, "
              "preexec_fn=_die_with_parent); print(p.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", script, str(REPO / "dev")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "zombie" in status.read_text(), f"child {child} outlived its killed parent"
