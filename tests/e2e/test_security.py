"""The attacker's and the careless user's probes against the real server: traversal, symlink escapes, absolute
paths, pickles, unknown combos, NaN and huge numbers, deep nesting and floods, through the library routes and
through workflows. Each asserts the HTTP status or the error, that nothing outside the model folders leaked,
and that the server still answers afterwards."""
from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SECRET_KEY = "secret_key_name_that_must_not_leak"


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    """A folder outside every model folder, holding a safetensors file with a recognisable key name."""
    save_file({SECRET_KEY: torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    (tmp_path / "hostname.png").write_bytes(b"not an image of ours")
    return tmp_path


@pytest.fixture()
def gates_dir(workspace: Path):
    folder = workspace / "models" / "loom_gates"
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    for child in folder.iterdir():
        child.unlink()


def still_answers(server) -> None:
    assert server.get_json("/system_stats", timeout=30)["system"]
    status, body = server.request("/loom/library/search?q=&k=5", timeout=60)
    assert status == 200, body


def get(server, path: str, **params: str) -> tuple[int, dict]:
    status, body = server.request(f"{path}?{urllib.parse.urlencode(params)}", timeout=60)
    try:
        return status, json.loads(body)
    except ValueError:  # refused by aiohttp itself before our handler (e.g. a NUL in the URL)
        return status, {"raw": body.decode(errors="replace")}


# ------------------------------------------------------------------------------------------------ routes
def test_route_references_never_reach_outside(comfy_server, loras_dir: Path, outside: Path) -> None:
    os.symlink(outside / "outside.safetensors", loras_dir / "escape.safetensors")
    os.symlink(outside, loras_dir / "escape_folder")
    os.symlink(outside / "hostname.png", loras_dir / "escape.preview.png")
    (loras_dir / "old.ckpt").write_bytes(b"\x80\x02pickle")
    assert comfy_server.request("/loom/library/rescan", {})[0] == 200
    for ref in ("escape.safetensors", "old.ckpt"):  # listed as errors, without saying where the link points
        status, body = get(comfy_server, "/loom/library/details", ref=ref)
        assert status == 200 and body["status"] == "error" and not body["sha256"], body
        assert str(outside) not in json.dumps(body) and SECRET_KEY not in json.dumps(body)
    probes = [
        ("/loom/library/details", {"ref": "escape_folder/outside.safetensors"}, 404),
        ("/loom/library/details", {"ref": str(outside / "outside.safetensors")}, 400),
        ("/loom/library/details", {"ref": "a" * 5000}, 400),
        ("/loom/library/details", {"ref": "x\0y.safetensors"}, 400),
        ("/loom/library/preview", {"ref": "escape.safetensors"}, 404),
        ("/loom/library/preview", {"ref": "%2e%2e/%2e%2e/etc/hostname"}, 404),
        ("/loom/library/resolve", {"name": "escape.safetensors"}, 404),
        ("/loom/library/resolve", {"name": "..\\..\\etc\\passwd"}, 400),
        ("/loom/library/search", {"q": "x", "folder": "/etc"}, 400),
        ("/loom/library/search", {"q": "[" * 2000 + '"' * 100 + " OR NEAR(*)"}, 200),  # within aiohttp's 8 KiB
    ]
    for path, params, expected in probes:
        status, body = get(comfy_server, path, **params)
        assert status == expected, (path, params, body)
        echoed = any(str(outside) in value for value in params.values())  # the caller's own words may come back
        assert SECRET_KEY not in json.dumps(body) and (echoed or str(outside) not in json.dumps(body)), body
    errors = {e["lora"]: e["reason"] for e in json.loads(comfy_server.request("/loom/library/rescan", {})[1])
              ["errors"]}
    assert "outside the library roots" in errors["escape.safetensors"] and "pickle" in errors["old.ckpt"]
    still_answers(comfy_server)


def test_a_flood_of_unknown_hashes_shares_a_few_rescans(comfy_server) -> None:
    scans_before = comfy_server.log_text().count("library scan:")
    started = time.perf_counter()

    def resolve(_: int) -> int:
        return get(comfy_server, "/loom/library/resolve", name="gone.safetensors", sha256=secrets.token_hex(32))[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(resolve, range(200)))
        search = pool.submit(get, comfy_server, "/loom/library/search", q="anything")
        assert search.result()[0] == 200
    elapsed = time.perf_counter() - started
    assert statuses == [404] * 200
    time.sleep(1.0)  # let a rescan that was still running log its line
    scans = comfy_server.log_text().count("library scan:") - scans_before
    assert 1 <= scans <= 2 + elapsed / 5.0, f"{scans} scans for 200 requests in {elapsed:.1f} s"
    still_answers(comfy_server)


# --------------------------------------------------------------------------------------------- workflows
def _queue(server, graph: dict) -> tuple[int, dict]:
    status, body = server.request("/prompt", {"prompt": graph, "client_id": "loom-security"}, timeout=60)
    return status, json.loads(body)


def _stack(rows: object, mode: str = "auto") -> dict:
    return {"model": {"class_type": "LoomPlaygroundModel", "inputs": {}},
            "stack": {"class_type": "LoomLoraStack", "inputs": {
                "model": ["model", 0], "clip": ["model", 1], "mode": mode,
                "rows": rows if isinstance(rows, str) else json.dumps(rows)}},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["stack", 4]}}}


def _run_error(server, graph: dict) -> str:
    status, body = _queue(server, graph)
    assert status == 200, body
    with pytest.raises(RuntimeError) as failed:
        server.wait(body["prompt_id"], timeout=300)
    return str(failed.value)


REFUSED_AT_QUEUE = [
    ("NaN strength", {"search": {"class_type": "LoomLibrarySearch", "inputs": {
        "prompt": "x", "top_k": 3, "strength": float("nan")}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["search", 2]}}},
     "input 'strength' must be a finite number"),
    ("huge top_k", {"search": {"class_type": "LoomLibrarySearch", "inputs": {
        "prompt": "x", "top_k": 10 ** 9, "strength": 1.0}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["search", 2]}}},
     "input 'top_k' is 1e+09, above its maximum 50"),
    ("NaN box", {"region": {"class_type": "LoomRegion", "inputs": {
        "prompt": "a", "x0": float("nan"), "y0": 0.0, "x1": 0.5, "y1": 0.5, "isolate": True}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["region", 0]}}},
     "input 'x0' must be a finite number"),
    ("infinite box", {"region": {"class_type": "LoomRegion", "inputs": {
        "prompt": "a", "x0": 0.0, "y0": 0.0, "x1": float("inf"), "y1": 0.5, "isolate": True}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["region", 0]}}},
     "input 'x1' must be a finite number"),
    ("unknown stack mode", _stack([], mode="evil"), "input 'mode' is 'evil', not one of"),
    ("absolute gate checkpoint", {"gate": {"class_type": "LoomLearnedGate", "inputs": {
        "checkpoint": "/etc/passwd", "lora": ""}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["gate", 0]}}},
     "input 'checkpoint' is '/etc/passwd', not one of"),
    ("traversing gate checkpoint", {"gate": {"class_type": "LoomLearnedGate", "inputs": {
        "checkpoint": "../loras/playground_ring.safetensors", "lora": ""}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["gate", 0]}}},
     "not one of"),
    ("huge text", {"gate": {"class_type": "LoomGateSchedule", "inputs": {
        "lora": "", "keyframes": "0:1" + " " * 1_000_001, "interpolation": "hold", "blocks": "", "preview_steps": 4}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["gate", 0]}}},
     "input 'keyframes' is 1000004 characters long"),
]


@pytest.mark.parametrize("name, graph, message", REFUSED_AT_QUEUE, ids=[r[0] for r in REFUSED_AT_QUEUE])
def test_bad_widget_values_are_refused_when_queued(comfy_server, name: str, graph: dict, message: str) -> None:
    status, body = _queue(comfy_server, graph)
    assert status == 400, body
    assert message in json.dumps(body), json.dumps(body)[:2000]
    still_answers(comfy_server)


def test_workflow_paths_never_open_files_outside(comfy_server, loras_dir: Path, gates_dir: Path,
                                                 outside: Path) -> None:
    os.symlink(outside / "outside.safetensors", loras_dir / "escape.safetensors")
    os.symlink(outside / "outside.safetensors", gates_dir / "escape.safetensors")
    (loras_dir / "old.ckpt").write_bytes(b"\x80\x02pickle")
    cases = [
        ([{"lora": str(outside / "outside.safetensors")}], "must be a path relative"),
        ([{"lora": "../../../../../../etc/passwd"}], "must be a path relative"),
        ([{"lora": "escape.safetensors"}], "is outside the configured folders"),
        ([{"lora": "old.ckpt"}], "pickles can execute code"),
    ]
    for rows, message in cases:
        error = _run_error(comfy_server, _stack(rows))
        assert message in error and SECRET_KEY not in error, error[:2000]
    gate = {"gate": {"class_type": "LoomLearnedGate", "inputs": {"checkpoint": "escape.safetensors", "lora": ""}},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["gate", 0]}}}
    error = _run_error(comfy_server, gate)
    assert "is outside the configured folders" in error and SECRET_KEY not in error, error[:2000]
    still_answers(comfy_server)


def test_numbers_and_nesting_inside_text_inputs(comfy_server) -> None:
    cases = [
        (_stack([{"lora": "playground_ring.safetensors", "strength": 1e30}]),
         "stack row 0: field 'strength' must lie in [-100, 100]"),
        (_stack('[{"lora": "playground_ring.safetensors", "strength": NaN}]'),
         "stack row 0: field 'strength' must be a finite number"),
        (_stack("[" * 50_000 + "]" * 50_000), "stack rows nests lists/objects too deeply"),
        (_stack([{"lora": "playground_ring.safetensors", "blocks": "default=1,double0=1e30"}]),
         "block weight 1e30 is outside"),
        ({"gate": {"class_type": "LoomGateSchedule", "inputs": {
            "lora": "", "keyframes": "0:1, 0.5:1e30", "interpolation": "hold", "blocks": "", "preview_steps": 4}},
          "show": {"class_type": "PreviewAny", "inputs": {"source": ["gate", 0]}}}, "gate value 1e30 is outside"),
    ]
    for graph, message in cases:
        error = _run_error(comfy_server, graph)
        assert message in error, error[:2000]
    still_answers(comfy_server)


def test_a_flood_of_refused_prompts(comfy_server) -> None:
    graph = REFUSED_AT_QUEUE[0][1]

    def queue(_: int) -> int:
        return _queue(comfy_server, graph)[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(queue, range(100))) == [400] * 100
    status, body = comfy_server.request("/prompt", None)  # a GET of the queue still works
    assert status == 200, body
    still_answers(comfy_server)
