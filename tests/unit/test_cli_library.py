"""``loom library scan|search|stats|train`` and ``loom bench library`` in-process on generated libraries,
with ``--roots``/``--db`` (no ComfyUI)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import library_factory as factory
import pytest
from lora_loom.cli import bench, library
from lora_loom.retrieval.factors import FluxLayout

LAYOUT = FluxLayout(hidden=32, double_blocks=2, single_blocks=2)
TINY = ["--hidden", "32", "--double-blocks", "2", "--single-blocks", "2"]


def loom(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``loom <args>`` with the library and bench commands registered; returns (code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="loom")
    commands = parser.add_subparsers(dest="command")
    library.register(commands)
    bench.register(commands)
    parsed = parser.parse_args(list(args))
    code = parsed.run(parsed)
    out = capsys.readouterr()
    return code, out.out, out.err


ADAPTERS = {  # relpath: (header metadata, civitai base model, tags)
    "styles/watercolor_wash.safetensors": ({"ss_output_name": "watercolor wash", "modelspec.trigger_phrase": "wtrclr",
                                            "ss_base_model_version": "flux1"}, ["style", "paint"]),
    "styles/ink_sketch.safetensors": ({"ss_output_name": "ink sketch", "modelspec.architecture": "flux-1-dev/lora"},
                                      ["style", "lineart"]),
    "characters/knight_armor.safetensors": ({"ss_output_name": "knight armor",
                                             "ss_base_model_version": "sdxl_base_v1-0"}, ["character"]),
    "characters/robot_girl.safetensors": ({"ss_output_name": "robot girl", "modelspec.architecture": "flux-1-dev/lora"},
                                          ["character", "scifi"]),
}


@pytest.fixture()
def generated(tmp_path: Path) -> tuple[Path, Path]:
    """Four small LoRAs with header metadata and tag sidecars; returns (root, db)."""
    root = tmp_path / "loras"
    for relpath, (meta, tags) in ADAPTERS.items():
        path = factory.save_lora(root / relpath, metadata={**meta, "modelspec.tags": ", ".join(tags)})
        factory.write_json(path.with_suffix(".metadata.json"),
                           factory.lora_manager_info(meta["ss_output_name"], "", tags, "", ""))
    return root, tmp_path / "index.sqlite"


def test_scan_then_rescan_reads_no_headers(capsys, generated) -> None:
    root, db = generated
    code, out, err = loom(capsys, "library", "scan", "--roots", str(root), "--db", str(db), "--json")
    assert code == 0, err
    first = json.loads(out)
    assert (first["added"], first["total"], first["errors"]) == (4, 4, [])
    code, out, _ = loom(capsys, "library", "scan", "--roots", str(root), "--db", str(db), "--json")
    again = json.loads(out)
    assert (again["unchanged"], again["added"], again["headers_read"]) == (4, 0, 0)
    code, out, _ = loom(capsys, "library", "stats", "--roots", str(root), "--db", str(db), "--json")
    stats = json.loads(out)
    assert (stats["adapters"], stats["hashed"], stats["text_vectors"], stats["errors"]) == (4, 4, 4, 0)


SEARCHES = [  # args after the query, expected relpaths (in order when "ordered")
    ("watercolor", [], ["styles/watercolor_wash.safetensors"]),
    ("wtrclr", [], ["styles/watercolor_wash.safetensors"]),
    ("", ["--folder", "characters"], ["characters/knight_armor.safetensors", "characters/robot_girl.safetensors"]),
    ("", ["--include", "style,lineart"], ["styles/ink_sketch.safetensors"]),
    ("", ["--exclude", "style", "--base-model", "flux dev"], ["characters/robot_girl.safetensors"]),
    ("knight", ["--base-model", "flux dev"], []),
]


@pytest.mark.parametrize("query, extra, expected", SEARCHES)
def test_search_with_filters(capsys, generated, query, extra, expected) -> None:
    root, db = generated
    where = ["--roots", str(root), "--db", str(db)]
    assert loom(capsys, "library", "scan", *where)[0] == 0
    code, out, err = loom(capsys, "library", "search", query, *extra, *where, "--json")
    assert code == 0, err
    hits = json.loads(out)["hits"]
    got = [h["lora"] for h in hits]
    if query:
        assert got[:len(expected)] == expected and len(got) >= len(expected)
        for hit in hits[:len(expected)]:
            assert hit["why"]["fields"] and len(hit["sha256"]) == 64
            assert hit["why"]["text"].startswith("matched")
    else:
        assert got == expected


def test_search_text_output_says_why(capsys, generated) -> None:
    root, db = generated
    where = ["--roots", str(root), "--db", str(db)]
    loom(capsys, "library", "scan", *where)
    code, out, _ = loom(capsys, "library", "search", "robot", "-k", "1", *where)
    assert code == 0
    assert out.startswith("1. characters/robot_girl.safetensors")
    assert "why: matched name: robot" in out and "words (bm25 " in out


ERRORS = [
    (["library", "scan", "--roots", "{root}"], "--roots needs --db"),
    (["library", "scan", "--roots", "{root}/missing", "--db", "{db}"], "is not a folder"),
    (["library", "search", "x", "--like", "nowhere.safetensors", "--roots", "{root}", "--db", "{db}"],
     "no such adapter"),
    (["library", "search", "x", "--like", "../outside.safetensors", "--roots", "{root}", "--db", "{db}"],
     "escapes the library roots"),
]


@pytest.mark.parametrize("args, message", ERRORS)
def test_errors_exit_1_with_a_message(capsys, generated, args, message) -> None:
    root, db = generated
    code, _, err = loom(capsys, *(a.format(root=root, db=db) for a in args))
    assert code == 1 and message in err


def test_roots_mode_never_imports_comfyui(capsys, generated) -> None:
    root, db = generated
    before = {m for m in sys.modules if m == "folder_paths" or m.startswith("comfy")}
    loom(capsys, "library", "scan", "--roots", str(root), "--db", str(db))
    loom(capsys, "library", "search", "ink", "--roots", str(root), "--db", str(db))
    after = {m for m in sys.modules if m == "folder_paths" or m.startswith("comfy")}
    assert after == before


def test_train_writes_a_checkpoint_the_search_then_uses(capsys, tmp_path) -> None:
    """Train on 12 concept LoRAs whose captions (in .txt notes) name the concept; the checkpoint is written
    and the next search ranks by weights too: the prompt's concept's 4 adapters are the top 4 by weights
    (seeded; 3 epochs were enough in every run, chance is 1/495)."""
    made = factory.concept_library(tmp_path / "loras", [(s.name, s.d_in, s.d_out) for s in LAYOUT.layers],
                                   concepts=3, per_concept=4, seed=1, noise=1.0)
    for item in made:
        item.path.with_suffix(".txt").write_text(item.caption, encoding="utf-8")
    where = ["--roots", str(tmp_path / "loras"), "--db", str(tmp_path / "index.sqlite")]
    code, out, err = loom(capsys, "library", "train", *where, *TINY, "--epochs", "3", "--batch-size", "6", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["adapters"] == 12 and summary["steps"] == 6 and summary["weight_vectors"] == 12
    stem = tmp_path / "index.weight_encoder"
    assert Path(summary["checkpoint"]) == stem and Path(f"{stem}.safetensors").is_file()
    code, out, _ = loom(capsys, "library", "search", f"a {factory.CONCEPT_WORDS[0]} style lora", "-k", "12",
                        *where, "--json")
    hits = json.loads(out)["hits"]
    by_weight = sorted((c["rank"], h["lora"]) for h in hits for c in h["why"]["components"]
                       if c["source"] == "weight")
    assert len(by_weight) == 12, by_weight
    assert {lora.split("/")[1][:4] for _, lora in by_weight[:4]} == {"c00_"}
    assert all(c["score"] != 0.0 for h in hits for c in h["why"]["components"] if c["source"] == "weight")


def test_train_refuses_a_library_without_fitting_weights(capsys, generated) -> None:
    root, db = generated  # rank-2 LoRAs on hidden 8: nothing fits hidden 32
    code, _, err = loom(capsys, "library", "train", "--roots", str(root), "--db", str(db), *TINY)
    assert code == 1 and "training needs at least 4" in err


def test_bench_library_prints_the_goal_rows(capsys, tmp_path) -> None:
    code, out, err = loom(capsys, "bench", "library", "--count", "40", "--queries", "10", "--json")
    assert code == 0, err
    rows = {r["metric"]: r for r in json.loads(out)}
    assert rows["files"]["value"] == 40
    assert rows["headers read by rescan"]["value"] == 0 and rows["headers read by rescan"]["met"]
    for metric in ("rescan, nothing changed", "search p95, text only", "search p95, hybrid"):
        assert rows[metric]["goal"] and rows[metric]["value"] > 0
    code, out, _ = loom(capsys, "bench", "library", "--count", "10", "--queries", "5")
    assert "scan rate" in out and "files/s" in out
