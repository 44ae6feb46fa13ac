// DOM-free logic of the Loom LoRA Stack row editor (tested with `node --test` from tests/js/).
// The node stores its rows as JSON in the `rows` widget; this module reads, edits and writes that JSON.

export const ROW_DEFAULTS = Object.freeze({ lora: "", on: true, strength: 1.0, clip_strength: null, blocks: "", sha256: null });

/** Parse the widget's JSON into row objects with defaults filled in; throws with the row index on bad input. */
export function parseRows(text) {
  if (!text || !text.trim()) return [];
  const data = JSON.parse(text);
  if (!Array.isArray(data)) throw new Error("stack rows must be a JSON list");
  return data.map((row, i) => {
    if (typeof row !== "object" || row === null) throw new Error(`stack row ${i} is not an object`);
    if (typeof row.lora !== "string" || !row.lora) throw new Error(`stack row ${i}: field 'lora' is missing`);
    return { ...ROW_DEFAULTS, ...row };
  });
}

/** Serialise rows, dropping fields equal to their defaults except `lora`, `on` and `strength`. */
export function serializeRows(rows) {
  return JSON.stringify(rows.map((row) => {
    const out = { lora: row.lora, on: !!row.on, strength: Number(row.strength) };
    if (row.clip_strength !== null && row.clip_strength !== undefined && row.clip_strength !== "") out.clip_strength = Number(row.clip_strength);
    if (row.blocks) out.blocks = row.blocks;
    if (row.sha256) out.sha256 = row.sha256;
    return out;
  }), null, 1);
}

/** Add a row for `lora` (a file name relative to a loras folder); an existing row for it is re-enabled instead. */
export function addRow(rows, lora, extra = {}) {
  const existing = rows.findIndex((r) => r.lora === lora);
  if (existing >= 0) {
    return rows.map((r, i) => (i === existing ? { ...r, on: true, ...extra } : r));
  }
  return [...rows, { ...ROW_DEFAULTS, lora, ...extra }];
}

export function updateRow(rows, index, patch) {
  if (index < 0 || index >= rows.length) throw new RangeError(`no stack row ${index}`);
  return rows.map((r, i) => (i === index ? { ...r, ...patch } : r));
}

export function removeRow(rows, index) {
  return rows.filter((_, i) => i !== index);
}

export function moveRow(rows, from, to) {
  if (from === to || from < 0 || from >= rows.length) return rows;
  const out = rows.slice();
  const [row] = out.splice(from, 1);
  out.splice(Math.max(0, Math.min(to, out.length)), 0, row);
  return out;
}

const SHA256 = /^[0-9a-f]{64}$/;

/** Pin the file's content hash on the rows for `lora`, so a shared workflow never loads a different file. */
export function pinSha256(rows, lora, sha256) {
  if (!SHA256.test(sha256 ?? "")) throw new Error(`sha256 must be 64 lower-case hex digits, got ${sha256}`);
  return rows.map((r) => (r.lora === lora ? { ...r, sha256 } : r));
}

/** Rows whose file is not in this machine's LoRA list but whose sha256 can find it (renamed or moved). */
export function rowsToResolve(rows, names) {
  const known = new Set(names);
  return rows.filter((r) => r.sha256 && !known.has(r.lora));
}

/** Point the rows pinned to `sha256` at `lora`, the local name of the same file. */
export function renameBySha256(rows, sha256, lora) {
  return rows.map((r) => (r.sha256 === sha256 ? { ...r, lora } : r));
}
