// DOM-free logic of web/stack_rows.js, run with `node --test tests/js` (pytest runs it in tests/unit/test_js.py).
import { test } from "node:test";
import assert from "node:assert/strict";
import { addRow, moveRow, parseRows, pinSha256, removeRow, renameBySha256, rowsToResolve, serializeRows, updateRow } from "../../web/stack_rows.js";

test("parse fills defaults and rejects rows without a lora", () => {
  const rows = parseRows('[{"lora": "a.safetensors", "strength": 0.5}]');
  assert.deepEqual(rows[0], { lora: "a.safetensors", on: true, strength: 0.5, clip_strength: null, blocks: "", sha256: null });
  assert.deepEqual(parseRows(""), []);
  assert.throws(() => parseRows('[{"strength": 1}]'), /row 0: field 'lora'/);
  assert.throws(() => parseRows('{"lora": "x"}'), /must be a JSON list/);
});

test("serialise round-trips and drops default-valued optional fields", () => {
  const text = '[{"lora":"a.safetensors","on":false,"strength":0.8,"clip_strength":0.2,"blocks":"double1=0.5","sha256":"ab"}]';
  assert.deepEqual(parseRows(serializeRows(parseRows(text))), parseRows(text));
  assert.deepEqual(JSON.parse(serializeRows(parseRows('[{"lora":"b"}]'))), [{ lora: "b", on: true, strength: 1 }]);
});

test("add re-enables an existing row instead of duplicating it", () => {
  let rows = addRow([], "a");
  rows = updateRow(rows, 0, { on: false });
  rows = addRow(rows, "a", { strength: 0.3 });
  assert.equal(rows.length, 1);
  assert.equal(rows[0].on, true);
  assert.equal(rows[0].strength, 0.3);
  rows = addRow(rows, "b");
  assert.deepEqual(rows.map((r) => r.lora), ["a", "b"]);
});

test("update, remove and move are pure and bounds-checked", () => {
  const rows = [addRow([], "a")[0], addRow([], "b")[0], addRow([], "c")[0]];
  assert.throws(() => updateRow(rows, 5, {}), RangeError);
  assert.deepEqual(removeRow(rows, 1).map((r) => r.lora), ["a", "c"]);
  assert.deepEqual(moveRow(rows, 0, 2).map((r) => r.lora), ["b", "c", "a"]);
  assert.deepEqual(rows.map((r) => r.lora), ["a", "b", "c"]);
});

test("sha256 is pinned on the rows of one file and renamed files are found by it", () => {
  const sha = "ab".repeat(32);
  let rows = [addRow([], "a.safetensors")[0], addRow([], "b.safetensors")[0]];
  rows = pinSha256(rows, "a.safetensors", sha);
  assert.deepEqual(rows.map((r) => r.sha256), [sha, null]);
  assert.deepEqual(JSON.parse(serializeRows(rows))[0], { lora: "a.safetensors", on: true, strength: 1, sha256: sha });
  assert.throws(() => pinSha256(rows, "b.safetensors", "XYZ"), /64 lower-case hex/);
  assert.throws(() => pinSha256(rows, "b.safetensors", undefined), /64 lower-case hex/);
  assert.deepEqual(rowsToResolve(rows, ["b.safetensors"]).map((r) => r.lora), ["a.safetensors"]);
  assert.deepEqual(rowsToResolve(rows, ["a.safetensors"]), []);
  rows = renameBySha256(rows, sha, "moved/a_v2.safetensors");
  assert.deepEqual(rows.map((r) => r.lora), ["moved/a_v2.safetensors", "b.safetensors"]);
  assert.equal(rows[0].sha256, sha);
});
