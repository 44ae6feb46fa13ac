"""The main job (``make run``): ComfyUI with this pack and the playground, the playground example queued, the
image path printed, and the UI kept at http://127.0.0.1:8188 until Ctrl+C (``--once``: exit after the image).
The printed address opens the same example in the UI (the pack's ``?loom_example=`` hook, web/open_example.js)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import urllib.parse
from pathlib import Path

from .examples import EXAMPLES, PLAYGROUND_EXAMPLE
from .paths import WORKSPACE
from .server import ComfyServer, free_port, prepare_workspace
from .workflow import ui_to_api

log = logging.getLogger("loom.run")

DEFAULT_WORKFLOW = EXAMPLES / PLAYGROUND_EXAMPLE.file_name


def ui_url(server: ComfyServer, workflow_path: Path) -> str:
    """The address that opens ``workflow_path`` (one of the pack's examples) in the UI, with ComfyUI's
    first-visit template gallery switched off for this workspace's user so it does not cover the workflow."""
    server.request("/settings/Comfy.TutorialCompleted", True)
    return f"{server.url}/?{urllib.parse.urlencode({'loom_example': workflow_path.stem}, quote_via=urllib.parse.quote)}"


def run_workflow(server: ComfyServer, workflow_path: Path) -> list[Path]:
    """Convert a UI-format workflow with the server's object_info, queue it, wait, return the image paths."""
    ui = json.loads(workflow_path.read_text())
    api = ui_to_api(ui, server.get_json("/object_info"))
    entry = server.wait(server.queue(api))
    return server.output_images(entry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the first image")
    parser.add_argument("--port", type=int, default=None, help="port (default 8188; a free one with --once)")
    parser.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW, help="UI-format workflow to queue")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[loom] %(message)s")

    workspace = prepare_workspace(WORKSPACE)
    port = args.port or (free_port() if args.once else 8188)
    with ComfyServer(workspace, port=port) as server:
        log.info("ComfyUI with LoRA Loom is up at %s (log: %s)", server.url, server.log_path)
        images = run_workflow(server, args.workflow)
        for image in sorted(images):
            log.info("image written: %s", image)
        if not images:
            log.error("the workflow produced no image")
            return 1
        if args.once:
            return 0
        log.info("open %s in a browser (the workflow above, opened in the UI); Ctrl+C stops the server",
                 ui_url(server, args.workflow))
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(1.0):
            if server.proc is None or server.proc.poll() is not None:
                log.error("ComfyUI exited; see %s", server.log_path)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
