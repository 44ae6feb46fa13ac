"""Real headless Chromium (Debian's package) driven by Playwright against the real ComfyUI frontend."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("Debian's chromium is required for browser tests: `make test` installs it with apt")
    return path


@contextmanager
def comfy_page(server, artifacts: Path, width: int = 1600, height: int = 1000, path: str = "/"):
    """A page with ComfyUI's UI loaded (at ``path``: an address with a query) and first-run dialogs dismissed;
    console errors collected on page.errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.errors = []
            page.on("pageerror", lambda err: page.errors.append(str(err)))
            page.on("console", lambda msg: page.errors.append(msg.text) if msg.type == "error" else None)
            # Settings that keep first-run dialogs out of the way (stored per user on the server).
            for key, value in {"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True}.items():
                server.request(f"/settings/{key}", value)
            page.goto(server.url + path, wait_until="domcontentloaded")
            page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager",
                                   timeout=120_000)
            page.wait_for_timeout(1000)
            page.keyboard.press("Escape")
            yield page
        finally:
            browser.close()


def load_workflow(page, workflow: dict) -> None:
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    page.wait_for_timeout(500)


def export_workflow(page) -> dict:
    return json.loads(page.evaluate("() => JSON.stringify(window.app.graph.serialize())"))
