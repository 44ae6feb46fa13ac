import assert from "node:assert/strict";
import test from "node:test";

import { modelLoader } from "../../web/graph_models.js";
import { activeFilters, cardModel, resultSummary, searchParams } from "../../web/library_cards.js";

const graph = {
  1: { type: "UNETLoader", inputs: {}, widgets: { unet_name: "flux.safetensors" } },
  2: { type: "LoomLoraStack", inputs: { model: 1 }, widgets: {} },
  3: { type: "ModelSamplingFlux", inputs: { model: 2 }, widgets: {} },
  4: { type: "LoomLoraStack", inputs: { model: 3 }, widgets: {} },
  5: { type: "LoomPlaygroundModel", inputs: {}, widgets: {} },
  6: { type: "LoomLoraStack", inputs: { model: 5 }, widgets: {} },
  7: { type: "LoomLoraStack", inputs: { model: null }, widgets: {} },
  8: { type: "SomeLoop", inputs: { model: 9 }, widgets: {} },
  9: { type: "SomeLoop", inputs: { model: 8 }, widgets: {} },
};
const lookup = (id) => graph[id] ?? null;

test("modelLoader follows model inputs through stacks and patches to the loader", () => {
  assert.deepEqual(modelLoader(4, lookup), { loader: "UNETLoader", model: "flux.safetensors" });
  assert.deepEqual(modelLoader(6, lookup), { loader: "LoomPlaygroundModel", model: "" });
  assert.equal(modelLoader(7, lookup), null);
  assert.equal(modelLoader(8, lookup), null); // a cycle ends without an answer
});

test("the empty state names the filters in force", () => {
  const state = { query: "zzz", hits: [], closest: [{}], k: 20, baseModel: "Flux.1 D", folder: "styles",
    model: { loader: "LoomPlaygroundModel", label: "Loom Playground Model" }, fitsOnly: true };
  assert.deepEqual(activeFilters(state), ["base model Flux.1 D", "folder styles", "fits Loom Playground Model"]);
  assert.equal(resultSummary(state),
    "nothing matched “zzz” with filters: base model Flux.1 D, folder styles, fits Loom Playground Model — closest:");
  assert.equal(resultSummary({ ...state, hits: new Array(20).fill({}) }), "20+ results for “zzz” — drag a card onto a Loom LoRA Stack");
});

test("search parameters carry the page size and the model to fit", () => {
  assert.deepEqual(searchParams({ query: " ring ", k: 40, model: { loader: "UNETLoader", model: "f.safetensors" }, fitsOnly: true }),
    { q: "ring", k: "40", loader: "UNETLoader", model: "f.safetensors", fits_only: "1" });
  assert.deepEqual(searchParams({ query: "ring" }), { q: "ring", k: "20" });
});

test("a card carries the copies and the fit of its hit", () => {
  const card = cardModel({ lora: "a.safetensors", copies: ["b/a.safetensors"], fit: { ok: false, reason: "width" } });
  assert.deepEqual(card.copies, ["b/a.safetensors"]);
  assert.equal(card.fit.ok, false);
});
