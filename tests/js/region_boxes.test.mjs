// DOM-free logic of web/region_boxes.js (the region editor), run by tests/unit/test_js.py.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  collectRegions, cursorFor, dragBox, findLatentSize, fitView, hitTest, MIN_SIZE, normalizeBox, pixelToPoint,
  overlaps, pickLines, regionLines, snap, wrapText,
} from "../../web/region_boxes.js";

const VIEW = { left: 10, top: 20, width: 200, height: 100 };
const BOX = { x0: 0.25, y0: 0.25, x1: 0.75, y1: 0.75 };

test("snap stores values on the widgets' 0.01 grid without float noise", () => {
  for (const [value, expected] of [[0.1 + 0.2, 0.3], [0.126, 0.13], [0.004, 0], [1, 1]]) {
    assert.equal(snap(value), expected);
  }
});

test("normalizeBox orders, clamps, snaps and keeps a minimum size", () => {
  const cases = [
    [{ x0: 0.8, y0: 0.9, x1: 0.2, y1: 0.1 }, { x0: 0.2, y0: 0.1, x1: 0.8, y1: 0.9 }],
    [{ x0: -0.5, y0: 0.2, x1: 1.7, y1: 0.6 }, { x0: 0, y0: 0.2, x1: 1, y1: 0.6 }],
    [{ x0: 0.5, y0: 0.5, x1: 0.5, y1: 0.5 }, { x0: 0.5, y0: 0.5, x1: 0.5 + MIN_SIZE, y1: 0.5 + MIN_SIZE }],
    [{ x0: 1, y0: 1, x1: 1, y1: 1 }, { x0: 1 - MIN_SIZE, y0: 1 - MIN_SIZE, x1: 1, y1: 1 }],
    [{ x0: 0.333333, y0: 0.1, x1: 0.666666, y1: 0.2 }, { x0: 0.33, y0: 0.1, x1: 0.67, y1: 0.2 }],
  ];
  for (const [input, expected] of cases) assert.deepEqual(normalizeBox(input), expected);
});

test("fitView keeps the latent's aspect inside the available area, centred", () => {
  assert.deepEqual(fitView(2, { width: 200, height: 200 }), { left: 0, top: 50, width: 200, height: 100 });
  assert.deepEqual(fitView(0.5, { width: 200, height: 200 }), { left: 50, top: 0, width: 100, height: 200 });
  assert.deepEqual(fitView(NaN, { width: 100, height: 50 }), { left: 25, top: 0, width: 50, height: 50 });
});

test("hitTest finds corners, edges, the inside and misses", () => {
  // BOX in pixels: left 60, top 45, right 160, bottom 95
  const cases = [
    [{ x: 60, y: 45 }, "nw"], [{ x: 160, y: 95 }, "se"], [{ x: 161, y: 44 }, "ne"], [{ x: 58, y: 96 }, "sw"],
    [{ x: 110, y: 45 }, "n"], [{ x: 110, y: 95 }, "s"], [{ x: 60, y: 70 }, "w"], [{ x: 160, y: 70 }, "e"],
    [{ x: 110, y: 70 }, "move"], [{ x: 20, y: 30 }, null], [{ x: 190, y: 110 }, null],
  ];
  for (const [px, expected] of cases) assert.equal(hitTest(BOX, px, VIEW), expected, JSON.stringify(px));
  assert.equal(cursorFor("nw"), "nwse-resize");
  assert.equal(cursorFor(null), "crosshair");
});

test("pixelToPoint normalises and clamps to the view", () => {
  assert.deepEqual(pixelToPoint({ x: 110, y: 70 }, VIEW), { x: 0.5, y: 0.5 });
  assert.deepEqual(pixelToPoint({ x: 0, y: 500 }, VIEW), { x: 0, y: 1 });
});

test("dragBox draws, moves inside the canvas and resizes by corner or edge", () => {
  const p = (x, y) => ({ x, y });
  const cases = [
    ["draw", p(0.7, 0.6), p(0.1, 0.2), { x0: 0.1, y0: 0.2, x1: 0.7, y1: 0.6 }],
    ["move", p(0.5, 0.5), p(0.6, 0.4), { x0: 0.35, y0: 0.15, x1: 0.85, y1: 0.65 }],
    ["move", p(0.5, 0.5), p(1.0, 1.0), { x0: 0.5, y0: 0.5, x1: 1, y1: 1 }],
    ["se", p(0.75, 0.75), p(0.9, 0.8), { x0: 0.25, y0: 0.25, x1: 0.9, y1: 0.8 }],
    ["nw", p(0.25, 0.25), p(0.1, 0.05), { x0: 0.1, y0: 0.05, x1: 0.75, y1: 0.75 }],
    ["w", p(0.25, 0.5), p(0.9, 0.1), { x0: 0.73, y0: 0.25, x1: 0.75, y1: 0.75 }],
    ["n", p(0.5, 0.25), p(0.5, 0.3), { x0: 0.25, y0: 0.3, x1: 0.75, y1: 0.75 }],
  ];
  for (const [mode, start, point, expected] of cases) {
    assert.deepEqual(dragBox(BOX, mode, start, point), expected, mode);
  }
  assert.throws(() => dragBox(BOX, "spin", p(0, 0), p(1, 1)), /unknown box gesture "spin"/);
});

test("findLatentSize takes the nearest latent node through links in either direction", () => {
  // region(1) -> compose(2) -> sampler(3) <- latent(4); another latent(6) further away via loader(5)
  const nodes = new Map([
    [1, { type: "LoomRegion" }], [2, { type: "LoomCompose" }], [3, { type: "KSampler" }],
    [4, { type: "EmptySD3LatentImage", width: 1024, height: 768 }], [5, { type: "UNETLoader" }],
    [6, { type: "EmptyLatentImage", width: 512, height: 512 }], [7, { type: "LoomRegion" }],
  ]);
  const links = [[1, 2], [2, 3], [4, 3], [5, 2], [5, 8], [8, 6]];
  assert.deepEqual(findLatentSize(1, { nodes, links }), { width: 1024, height: 768 });
  assert.equal(findLatentSize(7, { nodes, links }), null);
  assert.deepEqual(findLatentSize(5, { nodes, links: [[5, 6]] }), { width: 512, height: 512 });
});

test("collectRegions follows chains and Loom Regions inputs in order, without looping", () => {
  const region = (name, from) => ({ type: "LoomRegion", inputs: from ? { regions: from } : {}, region: { prompt: name } });
  const graph = {
    1: region("a"), 2: region("b", 1), 3: region("c"),
    4: { type: "LoomRegions", inputs: { regions_2: 3, regions_1: 2 }, region: null },
    5: { type: "LoomCompose", inputs: { regions: 4 }, region: null },
    8: region("loop", 9), 9: region("back", 8),
  };
  const describe = (id) => graph[id] ?? null;
  assert.deepEqual(collectRegions(5, describe).map((r) => r.prompt), ["a", "b", "c"]);
  assert.deepEqual(collectRegions(2, describe).map((r) => r.id), [1, 2]);
  assert.deepEqual(collectRegions(8, describe).map((r) => r.prompt), ["back", "loop"]);
  assert.deepEqual(collectRegions(null, describe), []);
});

test("regionLines wraps the prompt and the LoRA names to the width, cutting nothing", () => {
  assert.deepEqual(regionLines(0, "a red   fox", ["styles/loom_demo_red.safetensors"]), ["1. a red fox", "LoRA: loom_demo_red"]);
  assert.deepEqual(regionLines(2, "", []), ["3. (no prompt)"]);
  const lines = regionLines(0, "a blue ring on the left", ["playground_ring.safetensors"], 12);
  assert.deepEqual(lines, ["1. a blue", "ring on the", "left", "LoRA:", "playground_r", "ing"]);
  assert.equal(lines.join("").replace(/\s/g, ""), "1.ablueringontheleftLoRA:playground_ring");
});

test("wrapText splits words longer than a line", () => {
  assert.deepEqual(wrapText("abcdefgh ij", 3), ["abc", "def", "gh", "ij"]);
});

test("overlaps names the pairs of boxes that share area, not those that only touch", () => {
  const box = (x0, y0, x1, y1) => ({ box: { x0, y0, x1, y1 } });
  assert.deepEqual(overlaps([box(0, 0, 0.5, 1), box(0.5, 0, 1, 1)]), []);
  assert.deepEqual(overlaps([box(0, 0, 0.6, 1), box(0.5, 0, 1, 1), box(0.9, 0.9, 1, 1)]), [[0, 1], [1, 2]]);
  assert.deepEqual(overlaps([{ ...box(0, 0, 1, 1), mask: true }, box(0, 0, 1, 1)]), []);
});

test("pickLines numbers Loom Library Search's picks with their scores", () => {
  assert.deepEqual(pickLines([{ lora: "a/playground_ring.safetensors", title: "Playground ring", score: 0.03278 }]),
    ["1. playground_ring.safetensors — Playground ring (score 0.033)"]);
  assert.deepEqual(pickLines([]), ["picks appear here after a run"]);
});
