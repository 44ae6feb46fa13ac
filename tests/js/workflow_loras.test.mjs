// DOM-free logic of web/workflow_loras.js (missing LoRAs in a shared workflow), run by tests/unit/test_js.py.
import { test } from "node:test";
import assert from "node:assert/strict";
import { loraReferences, missingMessage, missingReferences, resolvedMessage } from "../../web/workflow_loras.js";

const SHA = "b".repeat(64);
const NODES = [
  { id: 1, type: "LoomLoraStack", title: "Stack", widgets: { rows: JSON.stringify([
    { lora: "here.safetensors", strength: 1 }, { lora: "gone.safetensors", strength: 1, sha256: SHA },
    { lora: "off.safetensors", on: false, strength: 1 }]) } },
  { id: 2, type: "LoraLoader", widgets: { lora_name: "core.safetensors" } },
  { id: 3, type: "LoomLoraStack", title: "Broken", widgets: { rows: "[{}]" } },
  { id: 4, type: "KSampler", widgets: { seed: 1 } },
];

test("loraReferences reads enabled stack rows with their sha256 and core loader names", () => {
  const refs = loraReferences(NODES);
  assert.deepEqual(refs.map((r) => [r.nodeId, r.lora, r.sha256]), [
    [1, "here.safetensors", null], [1, "gone.safetensors", SHA], [2, "core.safetensors", null], [3, "", null]]);
  assert.match(refs[3].error, /row 0: field 'lora' is missing/);
  assert.equal(refs[2].nodeTitle, "LoraLoader");
});

test("missingReferences keeps unknown files and unreadable rows", () => {
  const missing = missingReferences(loraReferences(NODES), ["here.safetensors", "core.safetensors"]);
  assert.deepEqual(missing.map((r) => [r.nodeId, r.lora]), [[1, "gone.safetensors"], [3, ""]]);
});

test("missingMessage names node, file and hash (or that none was recorded)", () => {
  const text = missingMessage([
    { nodeId: 1, nodeTitle: "Stack", lora: "gone.safetensors", sha256: SHA },
    { nodeId: 2, nodeTitle: "LoraLoader", lora: "core.safetensors", sha256: null },
    { nodeId: 3, nodeTitle: "Broken", lora: "", sha256: null, error: "bad row" },
  ]).split("\n");
  assert.equal(text.length, 3);
  assert.match(text[0], new RegExp(`^Stack \\(#1\\): gone\\.safetensors \\(sha256 ${SHA}\\) is not in your loras folders`));
  assert.match(text[1], /core\.safetensors \(no sha256 recorded in the workflow\)/);
  assert.match(text[2], /Broken \(#3\): cannot read its LoRA rows: bad row/);
});

test("resolvedMessage names the file found under another name by its hash", () => {
  assert.equal(resolvedMessage([{ nodeId: 1, nodeTitle: "Stack", lora: "a.safetensors", found: "b/a.safetensors", sha256: SHA }]),
    `Stack (#1): a.safetensors → b/a.safetensors (same sha256 ${"b".repeat(12)}…)`);
});
