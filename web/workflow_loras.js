// DOM-free logic of the shared-workflow check (tested with `node --test` from tests/js/): which LoRA files a
// loaded workflow names, which of them this machine lacks, and the message that names each missing file and
// its sha256. A missing file is resolved only by its exact sha256, never replaced by another LoRA.

import { parseRows } from "./stack_rows.js";

export const LORA_NODES = Object.freeze({ LoraLoader: "lora_name", LoraLoaderModelOnly: "lora_name" });

/**
 * The LoRA references of the graph's nodes: [{nodeId, nodeTitle, lora, sha256}]. `nodes` are plain objects
 * {id, type, title, widgets: {name: value}}; Loom LoRA Stack rows carry their pinned sha256, core loaders none.
 */
export function loraReferences(nodes) {
  const refs = [];
  for (const node of nodes) {
    const title = node.title || node.type;
    if (node.type === "LoomLoraStack") {
      let rows = [];
      try {
        rows = parseRows(node.widgets.rows ?? "");
      } catch (err) {
        refs.push({ nodeId: node.id, nodeTitle: title, lora: "", sha256: null, error: String(err.message ?? err) });
        continue;
      }
      for (const row of rows) {
        if (row.on) refs.push({ nodeId: node.id, nodeTitle: title, lora: row.lora, sha256: row.sha256 || null });
      }
    } else if (node.type in LORA_NODES) {
      const lora = node.widgets[LORA_NODES[node.type]];
      const sha256 = node.properties?.loom_sha256 || null;
      if (lora) refs.push({ nodeId: node.id, nodeTitle: title, lora, sha256 });
    }
  }
  return refs;
}

/** References whose file is not in this machine's LoRA list (or whose rows could not be read). */
export function missingReferences(refs, names) {
  const known = new Set(names);
  return refs.filter((r) => r.error || !known.has(r.lora));
}

/** One line per missing file: node, file name and sha256 (or that none was recorded). */
export function missingMessage(missing) {
  return missing.map((r) => {
    if (r.error) return `${r.nodeTitle} (#${r.nodeId}): cannot read its LoRA rows: ${r.error}`;
    const hash = r.sha256 ? `sha256 ${r.sha256}` : "no sha256 recorded in the workflow";
    return `${r.nodeTitle} (#${r.nodeId}): ${r.lora} (${hash}) is not in your loras folders and no file there ` +
      `has this hash`;
  }).join("\n");
}

/** One line per file found under another name by its sha256. */
export function resolvedMessage(resolved) {
  return resolved.map((r) => `${r.nodeTitle} (#${r.nodeId}): ${r.lora} → ${r.found} (same sha256 ${r.sha256.slice(0, 12)}…)`)
    .join("\n");
}
