"""The shared example workflows as files: each runs on the playground world (never the random-weight demo model),
says what it shows in a note, opens at a readable zoom, has its nodes laid out without overlap (at the sizes the
layout reserves; the browser test checks the drawn sizes) and a thumbnail made from this very version of it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from loomdev.examples import EXAMPLES_LIST, NODE_SIZES
from loomdev.thumbnails import thumbnail_digest, workflow_digest

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "example_workflows"
DEMO_MODEL_NODES = {"UNETLoader", "CLIPLoader", "VAELoader", "CheckpointLoaderSimple"}


def test_the_folder_holds_exactly_the_examples_and_their_thumbnails() -> None:
    assert sorted(p.name for p in FOLDER.iterdir()) == sorted(
        [e.file_name for e in EXAMPLES_LIST] + [e.file_name.replace(".json", ".jpg") for e in EXAMPLES_LIST])


@pytest.mark.parametrize("example", EXAMPLES_LIST, ids=lambda e: e.title)
def test_example_file(example) -> None:
    path = FOLDER / example.file_name
    workflow = json.loads(path.read_text())
    types = {n["type"] for n in workflow["nodes"]}
    assert "LoomPlaygroundModel" in types and not types & DEMO_MODEL_NODES
    assert set(types) - {"Note"} <= set(NODE_SIZES), "every node type has a reserved size"
    [note] = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert note["title"] and "Result" in note["widgets_values"][0]
    assert workflow["extra"]["ds"]["scale"] >= 0.75  # node titles and widgets are drawn from 0.6 up
    boxes = [(n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in workflow["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    saves = [n for n in workflow["nodes"] if n["type"] == "SaveImage"]
    assert any(n["widgets_values"][0] == example.result_prefix for n in saves)
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail_digest(thumbnail) == workflow_digest(path), \
        f"{thumbnail.name} was made from another version of its workflow: run python -m loomdev.thumbnails"
