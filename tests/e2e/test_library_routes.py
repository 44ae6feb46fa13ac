"""The library panel's HTTP routes on the real server: rescan (with websocket progress), search with why,
details, preview bytes, resolve by hash after a rename, and refusals of paths outside the loras folders."""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

PNG_BYTES = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
                          "0000000a49444154789c63600000000200015e2b2b7c0000000049454e44ae426082")


def write_lora(path: Path, seed: int, metadata: dict[str, str]) -> str:
    """A tiny kohya LoRA (8 features) with header metadata; returns its sha256."""
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(1, 8, generator=g),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(24, 1, generator=g),
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0)}, str(path), metadata=metadata)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def library_files(loras_dir: Path) -> dict[str, str]:
    """Three LoRAs, one with a civitai sidecar and a preview; relpath → sha256."""
    made = {
        "routes/aquarelle_bloom.safetensors": write_lora(loras_dir / "routes" / "aquarelle_bloom.safetensors", 1, {
            "ss_output_name": "aquarelle bloom", "modelspec.trigger_phrase": "aqbl", "ss_base_model_version": "flux1"}),
        "routes/steel_paladin.safetensors": write_lora(loras_dir / "routes" / "steel_paladin.safetensors", 2, {
            "ss_output_name": "steel paladin"}),
        "other/neon_alley.safetensors": write_lora(loras_dir / "other" / "neon_alley.safetensors", 3, {
            "ss_output_name": "neon alley", "modelspec.architecture": "flux-1-schnell/lora"}),
    }
    info = {"baseModel": "Flux.1 D", "trainedWords": ["aquarelle"],
            "model": {"name": "Aquarelle Bloom", "tags": ["painting", "flowers"], "description": "soft washes"}}
    (loras_dir / "routes" / "aquarelle_bloom.civitai.info").write_text(json.dumps(info))
    (loras_dir / "routes" / "aquarelle_bloom.preview.png").write_bytes(PNG_BYTES)
    return made


def get(server, path: str, **params: str) -> tuple[int, object]:
    status, body = server.request(f"{path}?{urllib.parse.urlencode(params)}" if params else path)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


async def _progress_events(url: str, rescan, timeout: float = 60) -> list[dict]:
    """Listen on ComfyUI's websocket while ``rescan()`` runs in a thread; the library progress events."""
    import aiohttp

    events: list[dict] = []
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(url.replace("http", "ws") + "/ws?clientId=loom-library-test") as ws:
        await ws.receive(timeout=timeout)  # the server's status greeting
        worker = threading.Thread(target=rescan)
        worker.start()
        try:
            while not any(e.get("finished") for e in events):
                message = await ws.receive(timeout=timeout)
                if message.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(message.data)
                    if data.get("type") == "loom.library.progress":
                        events.append(data["data"])
        finally:
            worker.join()
    return events


def test_rescan_reports_and_sends_progress_then_search_finds_with_why(comfy_server, library_files) -> None:
    answers: list[tuple[int, bytes]] = []
    events = asyncio.run(_progress_events(comfy_server.url,
                                          lambda: answers.append(comfy_server.request("/loom/library/rescan", {}))))
    status, body = answers[0]
    assert status == 200, body
    report = json.loads(body)
    assert report["total"] >= 3 and report["errors"] == []
    assert events[-1]["finished"] and events[-1]["done"] == events[-1]["total"] == report["total"]

    status, result = get(comfy_server, "/loom/library/search", q="aquarelle flowers", k="2")
    assert status == 200, result
    top = result["hits"][0]
    assert top["lora"] == "routes/aquarelle_bloom.safetensors"
    assert top["sha256"] == library_files[top["lora"]] and set(top["trigger_words"]) == {"aqbl", "aquarelle"}
    assert {f["field"] for f in top["why"]["fields"]} >= {"name", "tags"} and top["why"]["components"]
    assert top["preview"] and top["preview"].startswith("/loom/library/preview?ref=")

    status, preview = comfy_server.request(top["preview"])
    assert status == 200 and preview == PNG_BYTES

    status, filtered = get(comfy_server, "/loom/library/search", q="", folder="other", k="10")
    assert status == 200 and [h["lora"] for h in filtered["hits"]] == ["other/neon_alley.safetensors"]
    status, excluded = get(comfy_server, "/loom/library/search", q="aquarelle", exclude="painting")
    assert status == 200 and "routes/aquarelle_bloom.safetensors" not in [h["lora"] for h in excluded["hits"]]

    assert top["writer"] == "kohya" and top["flux_variant"] == ""  # kohya key style; flux1 names no variant
    status, schnell = get(comfy_server, "/loom/library/search", q="", variant="schnell", writer="kohya", k="10")
    assert status == 200 and [(h["lora"], h["flux_variant"]) for h in schnell["hits"]] == [
        ("other/neon_alley.safetensors", "schnell")]
    status, none = get(comfy_server, "/loom/library/search", q="", writer="ai-toolkit", k="10")
    assert status == 200 and none["hits"] == []


def test_details_by_path_and_by_hash(comfy_server, library_files) -> None:
    assert comfy_server.request("/loom/library/rescan", {})[0] == 200
    relpath = "routes/aquarelle_bloom.safetensors"
    for ref in (relpath, library_files[relpath]):
        status, details = get(comfy_server, "/loom/library/details", ref=ref)
        assert status == 200, details
        assert details["lora"] == relpath and details["sha256"] == library_files[relpath] and details["indexed"]
        assert details["description"] == "soft washes" and {"painting", "flowers"} <= set(details["tags"])
        assert "aquarelle" in details["trigger_words"] and details["preview"] == "aquarelle_bloom.preview.png"
        assert "path" not in details and "root" not in details
    status, _ = get(comfy_server, "/loom/library/preview", ref="routes/steel_paladin.safetensors")
    assert status == 404


def test_details_of_an_unindexed_file_gives_its_sha256(comfy_server, loras_dir) -> None:
    sha = write_lora(loras_dir / "fresh" / "just_added.safetensors", 9, {"ss_output_name": "just added"})
    status, details = get(comfy_server, "/loom/library/details", ref="fresh/just_added.safetensors")
    assert status == 200 and details == {"lora": "fresh/just_added.safetensors", "sha256": sha, "indexed": False}


def test_resolve_finds_a_renamed_file_by_hash(comfy_server, library_files, loras_dir) -> None:
    sha = library_files["routes/steel_paladin.safetensors"]
    assert comfy_server.request("/loom/library/rescan", {})[0] == 200
    (loras_dir / "routes" / "steel_paladin.safetensors").rename(loras_dir / "other" / "paladin_v2.safetensors")
    deadline = time.monotonic() + 30  # the shared background rescan may be throttled for a few seconds
    while True:
        status, found = get(comfy_server, "/loom/library/resolve", name="routes/steel_paladin.safetensors",
                            sha256=sha)
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status == 200, found
    assert found == {"lora": "other/paladin_v2.safetensors", "sha256": sha, "renamed": True}
    status, missing = get(comfy_server, "/loom/library/resolve", name="gone.safetensors", sha256="ab" * 32)
    assert status == 404 and "gone.safetensors" in missing["error"] and "ab" * 32 in missing["error"]


REFUSED = [
    ("/loom/library/details", {"ref": "../comfyui.db"}, 400),
    ("/loom/library/details", {"ref": "routes/../../user/comfyui.db"}, 400),
    ("/loom/library/details", {"ref": "/etc/passwd"}, 400),
    ("/loom/library/details", {"ref": "C:\\Windows\\win.ini"}, 400),
    ("/loom/library/details", {"ref": ""}, 400),
    ("/loom/library/details", {"ref": "nothing_here.safetensors"}, 404),
    ("/loom/library/preview", {"ref": "../../models/vae/loom_demo_vae.safetensors"}, 400),
    ("/loom/library/preview", {"ref": "/etc/hostname"}, 400),
    ("/loom/library/resolve", {"name": "../text_encoders/loom_demo_clip_l.safetensors"}, 400),
    ("/loom/library/resolve", {"name": "/etc/passwd"}, 400),
    ("/loom/library/resolve", {"sha256": "not-hex"}, 400),
    ("/loom/library/search", {"q": "x", "folder": "../.."}, 400),
    ("/loom/library/search", {"q": "x", "k": "zero"}, 400),
    ("/loom/library/search", {"q": "x", "k": "100000"}, 400),
]


@pytest.mark.parametrize("path, params, expected", REFUSED)
def test_refuses_paths_outside_the_loras_folders(comfy_server, path, params, expected) -> None:
    status, body = get(comfy_server, path, **params)
    assert status == expected, body
    assert isinstance(body, dict) and body["error"]


def test_nothing_matched_answers_empty_hits_with_the_closest(comfy_server, library_files):
    assert comfy_server.request("/loom/library/rescan", {})[0] == 200
    status, body = get(comfy_server, "/loom/library/search", q="xyzzyqq")
    assert status == 200 and body["hits"] == [] and 1 <= len(body["closest"]) <= 3
    status, body = get(comfy_server, "/loom/library/search", q="the aquarelle")  # a stop word never matches on its own
    assert [h["lora"] for h in body["hits"]] == ["routes/aquarelle_bloom.safetensors"] and body["closest"] == []


def test_fit_against_the_model_a_loader_loads(comfy_server, library_files):
    """The routes' LoRAs have width 8, the playground model 192, the demo Flux 3072; the playground's own fit."""
    comfy_server.request("/loom/library/rescan", {})
    status, body = get(comfy_server, "/loom/library/fit", loader="LoomPlaygroundModel", model="",
                       refs="playground_ring.safetensors,routes/steel_paladin.safetensors,loom_demo_red.safetensors")
    assert status == 200 and body["model"].startswith("Flux, hidden 192")
    fits = body["fits"]
    assert fits["playground_ring.safetensors"]["ok"] is True
    paladin = fits["routes/steel_paladin.safetensors"]
    assert paladin["ok"] is False and "width 8" in paladin["reason"]
    assert fits["loom_demo_red.safetensors"]["ok"] is False
    from loomdev.fixtures import FLUX_FILE

    status, body = get(comfy_server, "/loom/library/search", q="loom", loader="UNETLoader", model=FLUX_FILE,
                       fits_only="1")
    assert status == 200 and body["model"].startswith("Flux, hidden 3072")
    assert {h["lora"] for h in body["hits"]} == {"loom_demo_red.safetensors", "loom_demo_blue.safetensors"}
    assert all(h["fit"]["ok"] for h in body["hits"])
    status, body = get(comfy_server, "/loom/library/fit", loader="UNETLoader", model="/etc/passwd",
                       refs="a.safetensors")
    assert status == 400 and "model" in body["error"]  # only names inside the model folders


def test_playground_loras_index_without_a_raw_error(comfy_server):
    comfy_server.request("/loom/library/rescan", {})
    for name in ("playground_ring", "playground_star", "playground_stripes"):
        status, body = get(comfy_server, "/loom/library/details", ref=f"{name}.safetensors")
        assert status == 200 and body["problems"] == [] and body["error"] == ""
        assert body["targets"] == "Flux, hidden 192, 2 double + 2 single blocks"


@pytest.mark.parametrize(("spec", "ok"), [("all", True), ("d0-18 s0-37", True), ("d0-1 x9", False), ("d5-2", False)])
def test_rule_blocks_check(comfy_server, spec: str, ok: bool):
    status, body = comfy_server.request(f"/loom/check/rule_blocks?{urllib.parse.urlencode({'spec': spec})}")
    body = json.loads(body)
    assert status == 200 and body["ok"] is ok
    assert ok or spec in body["error"]
