"""The main job (``make run``): ComfyUI with this pack and the demo models, the example workflow queued, the
image path printed, and the UI kept at http://127.0.0.1:8188 until Ctrl+C (``--once``: exit after the image)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from .paths import REPO, WORKSPACE
from .server import ComfyServer, free_port, prepare_workspace
from .workflow import ui_to_api

log = logging.getLogger("loom.run")

DEFAULT_WORKFLOW = REPO / "example_workflows" / "loom_playground.json"


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
        log.info("open %s in a browser; Ctrl+C stops the server", server.url)
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
