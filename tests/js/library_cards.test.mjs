// DOM-free logic of web/library_cards.js (the LoRA Library panel), run by tests/unit/test_js.py.
import { test } from "node:test";
import assert from "node:assert/strict";
import { activeFilters, cardModel, detailRows, dropTarget, rowsWithCard, searchParams, whyText } from "../../web/library_cards.js";

const SHA = "a".repeat(64);
const HIT = {
  lora: "styles/loom_demo_red.safetensors", name: "loom_demo_red", title: "Loom demo: red", base_model: "flux1",
  writer: "kohya", flux_variant: "dev",
  sha256: SHA, trigger_words: ["loomred"], tags: ["red", "demo"], score: 0.03125, preview: "/loom/library/preview?ref=x",
  why: { fields: [{ field: "name", terms: ["red"] }, { field: "tags", terms: ["red"] }], components: [], text: "t" },
};

test("searchParams keeps the query and k, drops empty filters and tidies tags", () => {
  const cases = [
    [{ query: "  red fox " }, { q: "red fox", k: "20" }],
    [{ query: "x", k: 5, baseModel: " flux1 ", folder: "/styles/", include: "a, ,b", exclude: " c " },
      { q: "x", k: "5", base_model: "flux1", folder: "styles", include: "a,b", exclude: "c" }],
    [{ query: "y", writer: " AI-Toolkit ", variant: "Kontext" }, { q: "y", k: "20", writer: "ai-toolkit", variant: "kontext" }],
    [{}, { q: "", k: "20" }],
  ];
  for (const [fields, expected] of cases) assert.deepEqual(searchParams(fields), expected);
});

test("whyText names matched fields, else the server's ranking text", () => {
  assert.equal(whyText(HIT.why), "matched name: red; tags: red");
  assert.equal(whyText({ fields: [], text: "ranked by meaning #1 (cos 0.40)" }), "ranked by meaning #1 (cos 0.40)");
  assert.equal(whyText(null), "");
});

test("cardModel shows title, file, folder, triggers, why and preview", () => {
  const card = cardModel(HIT);
  assert.deepEqual(card, {
    lora: HIT.lora, sha256: SHA, title: "Loom demo: red", file: "loom_demo_red.safetensors", folder: "styles",
    baseModel: "flux1", writer: "kohya", variant: "dev", triggers: ["loomred"], tags: ["red", "demo"], why: "matched name: red; tags: red",
    score: "0.031", preview: "/loom/library/preview?ref=x", copies: [], fit: null, targets: "",
  });
  const bare = cardModel({ lora: "plain.safetensors" });
  assert.equal(bare.title, "plain.safetensors");
  assert.equal(bare.folder, "");
  assert.equal(bare.sha256, null);
  assert.throws(() => cardModel({ title: "no file" }), /needs its 'lora' name/);
});

test("detailRows lists header metadata, skips empty fields and formats size and tag frequency", () => {
  const rows = detailRows({ title: "T", lora: "a.safetensors", sha256: SHA, network_dim: 4, description: "",
    trigger_words: ["w1", "w2"], tags: [], size: 370052, tag_frequency: { fox: 3, red: 9 }, writer: "onetrainer",
    flux_variant: "" });
  assert.deepEqual(rows, [["Title", "T"], ["File", "a.safetensors"], ["sha256", SHA], ["Written by", "onetrainer"],
    ["Rank", "4"],
    ["Trigger words", "w1, w2"], ["Size", "361.4 KiB"], ["Training tags", "red (9), fox (3)"]]);
  assert.deepEqual(detailRows({}), []);
});

test("dropTarget prefers the stack under the pointer, then the one selected stack, else creates one", () => {
  const stack = { type: "LoomLoraStack", id: 1 };
  const other = { type: "LoomLoraStack", id: 2 };
  const sampler = { type: "KSampler", id: 3 };
  const cases = [
    [stack, [other], { action: "add", node: stack }],
    [sampler, [other], { action: "add", node: other }],
    [null, [sampler, other], { action: "add", node: other }],
    [null, [stack, other], { action: "create" }],
    [sampler, [], { action: "create" }],
  ];
  for (const [under, selected, expected] of cases) assert.deepEqual(dropTarget(under, selected), expected);
});

test("rowsWithCard adds a pinned row, or re-enables the existing row keeping its strength", () => {
  const card = cardModel(HIT);
  const added = rowsWithCard([], card);
  assert.deepEqual(added, [{ lora: HIT.lora, on: true, strength: 1, clip_strength: null, blocks: "", sha256: SHA }]);
  const again = rowsWithCard([{ ...added[0], on: false, strength: 0.4 }], card);
  assert.equal(again.length, 1);
  assert.equal(again[0].on, true);
  assert.equal(again[0].strength, 0.4);
});

test("activeFilters names the Flux variant and writer filters in force", () => {
  assert.deepEqual(activeFilters({ baseModel: "flux1", variant: " kontext ", writer: "ai-toolkit" }),
    ["base model flux1", "Flux variant kontext", "written by ai-toolkit"]);
  assert.deepEqual(activeFilters({}), []);
});
