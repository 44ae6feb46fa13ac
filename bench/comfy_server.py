"""A real ComfyUI server as a child process: ComfyUI's own ``main.py --cpu --listen 127.0.0.1`` on a free port
with a given ``--base-directory``, and what a benchmark or a test says to it over HTTP (queue a prompt, wait for
it, read its RSS). Whatever is started here is stopped here (context manager, process group, SIGKILL fallback).
Used by ``loom bench soak`` and, through ``dev/loomdev/server.py``, by the e2e tests and ``make run``."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from ..comfy_env import comfyui_version

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's child process (Linux): end it when the process that started it dies, so a test run that is
    killed (SIGTERM/SIGKILL skip its finalisers) leaves no server holding gigabytes behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ComfyServer:
    """ComfyUI's own ``main.py`` from ``comfyui`` serving ``--base-directory workspace`` on 127.0.0.1 (a free port
    unless given). Use as a context manager; ``stop()`` is idempotent. ``env`` adds environment variables."""

    def __init__(self, comfyui: Path, workspace: Path, port: int | None = None, log_path: Path | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.comfyui = comfyui
        self.workspace = workspace
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or workspace / "comfyui-server.log"
        self.extra_args = extra_args or []
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        comfy = self.comfyui
        cmd = [sys.executable, str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.workspace), "--disable-auto-launch",
               "--database-url", f"sqlite:///{self.workspace / 'user' / f'comfyui-{comfyui_version(comfy)}.db'}",
               *self.extra_args]  # one database per ComfyUI release: their schema migrations differ
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        env.pop("PYTHONPATH", None)  # the server sees only ComfyUI and its custom_nodes, as for a user
        log.info("starting ComfyUI: %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, cwd=str(comfy), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; log:\n{self.log_text()[-4000:]}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within {timeout}s; log:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self._log.close()
        self.proc = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP -----------------------------------------------------------------------------------------------
    def request(self, path: str, data: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def queue(self, api_workflow: dict) -> str:
        status, body = self.request("/prompt", {"prompt": api_workflow, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise RuntimeError(f"/prompt refused the workflow ({status}): {body.decode(errors='replace')}")
        return json.loads(body)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Poll /history until the prompt finished; raise with ComfyUI's error if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise RuntimeError(f"workflow failed: {json.dumps(msgs)[:4000]}")
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died; log:\n{self.log_text()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")

    def output_images(self, entry: dict) -> list[Path]:
        """Paths of the images a finished prompt wrote (type 'output'), resolved inside the workspace."""
        paths = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                if img.get("type") == "output":
                    paths.append(self.workspace / "output" / img.get("subfolder", "") / img["filename"])
        return paths

    def view_url(self, image: dict) -> str:
        return self.url + "/view?" + urllib.parse.urlencode(image)

    def rss_bytes(self) -> int:
        """Resident memory of the server process now (psutil comes with ComfyUI's requirements)."""
        import psutil

        if self.proc is None:
            raise RuntimeError("the server is not running")
        return int(psutil.Process(self.proc.pid).memory_info().rss)
