// DOM-free logic of the LoRA Library panel (tested with `node --test` from tests/js/): the search query from the
// panel's fields, a result card from a search hit, the details view's rows from header metadata, and where a
// card dropped on the canvas goes.

import { addRow } from "./stack_rows.js";

export const STACK_TYPE = "LoomLoraStack";
export const DRAG_MIME = "application/x-loom-lora";

/** Query parameters for /loom/library/search from the panel's fields; empty fields are left out. */
export function searchParams({ query = "", k = 20, baseModel = "", folder = "", include = "", exclude = "",
  model = null, fitsOnly = false, writer = "", variant = "" } = {}) {
  const out = { q: query.trim(), k: String(k) };
  if (model?.loader) Object.assign(out, { loader: model.loader, model: model.model ?? "" }, fitsOnly ? { fits_only: "1" } : {});
  const tags = (text) => text.split(",").map((t) => t.trim()).filter(Boolean).join(",");
  if (baseModel.trim()) out.base_model = baseModel.trim();
  if (writer.trim()) out.writer = writer.trim().toLowerCase();
  if (variant.trim()) out.variant = variant.trim().toLowerCase();
  if (folder.trim()) out.folder = folder.trim().replace(/^\/+|\/+$/g, "");
  if (tags(include)) out.include = tags(include);
  if (tags(exclude)) out.exclude = tags(exclude);
  return out;
}

export const PAGE = 20;

/** The filters in force, in words (shown with an empty result, so a filter hiding everything is seen). */
export function activeFilters({ baseModel = "", folder = "", include = "", exclude = "", model = null, fitsOnly = false,
  writer = "", variant = "" } = {}) {
  const out = [];
  if (baseModel.trim()) out.push(`base model ${baseModel.trim()}`);
  if (variant.trim()) out.push(`Flux variant ${variant.trim()}`);
  if (writer.trim()) out.push(`written by ${writer.trim()}`);
  if (folder.trim()) out.push(`folder ${folder.trim()}`);
  if (include.trim()) out.push(`tags ${include.trim()}`);
  if (exclude.trim()) out.push(`without tags ${exclude.trim()}`);
  if (fitsOnly && model?.loader) out.push(`fits ${model.label || model.loader}`);
  return out;
}

/** The panel's status line for an answer: a count (and whether more can be shown), or nothing matched. */
export function resultSummary(state) {
  const n = state.hits.length;
  if (!n) {
    const filters = activeFilters(state);
    const what = state.query.trim() ? `nothing matched “${state.query.trim()}”` : "no LoRA in the library";
    return what + (filters.length ? ` with filters: ${filters.join(", ")}` : "") +
      (state.closest?.length ? " — closest:" : "");
  }
  return `${n}${n >= state.k ? "+" : ""} result${n === 1 ? "" : "s"}` + (state.query.trim() ? ` for “${state.query.trim()}”` : "") +
    " — drag a card onto a Loom LoRA Stack";
}

/** Why a hit matched, in words: the matched fields and terms, else the ranking text the server gave. */
export function whyText(why) {
  if (!why) return "";
  const fields = (why.fields ?? []).map((f) => `${f.field}: ${f.terms.join(", ")}`);
  if (fields.length) return `matched ${fields.join("; ")}`;
  return why.text ?? "";
}

/** What a result card shows, from one search hit (the JSON of /loom/library/search). */
export function cardModel(hit) {
  if (!hit || typeof hit.lora !== "string" || !hit.lora) throw new Error("a library hit needs its 'lora' name");
  const file = hit.lora.replace(/^.*\//, "");
  return {
    lora: hit.lora,
    sha256: hit.sha256 || null,
    title: hit.title || hit.name || file,
    file,
    folder: hit.lora.includes("/") ? hit.lora.slice(0, hit.lora.lastIndexOf("/")) : "",
    baseModel: hit.base_model || "",
    writer: hit.writer || "",
    variant: hit.flux_variant || "",
    triggers: [...(hit.trigger_words ?? [])],
    tags: [...(hit.tags ?? [])],
    why: whyText(hit.why),
    score: typeof hit.score === "number" ? hit.score.toFixed(3) : "",
    preview: hit.preview || null,
    copies: [...(hit.copies ?? [])],
    fit: hit.fit ?? null,
    targets: hit.targets || "",
  };
}

const DETAIL_FIELDS = [
  ["title", "Title"], ["lora", "File"], ["sha256", "sha256"], ["base_model", "Base model"],
  ["flux_variant", "Flux variant"], ["writer", "Written by"],
  ["architecture", "Architecture"], ["network_module", "Network"], ["network_dim", "Rank"],
  ["network_alpha", "Alpha"], ["output_name", "Output name"], ["trigger_words", "Trigger words"],
  ["targets", "Made for"], ["tags", "Tags"], ["description", "Description"], ["notes", "Notes"], ["tensor_count", "Tensors"],
  ["size", "Size"], ["sources", "Read from"], ["problems", "Problems"], ["error", "Error"],
];

function formatSize(bytes) {
  if (bytes >= 1 << 20) return `${(bytes / (1 << 20)).toFixed(1)} MiB`;
  if (bytes >= 1 << 10) return `${(bytes / (1 << 10)).toFixed(1)} KiB`;
  return `${bytes} B`;
}

/** The details view's rows [label, text] from /loom/library/details, skipping empty fields. */
export function detailRows(details) {
  const rows = [];
  for (const [key, label] of DETAIL_FIELDS) {
    let value = details?.[key];
    if (value === null || value === undefined || value === "" || (Array.isArray(value) && !value.length)) continue;
    if (key === "size") value = formatSize(value);
    else if (Array.isArray(value)) value = value.join(", ");
    rows.push([label, String(value)]);
  }
  const frequency = Object.entries(details?.tag_frequency ?? {}).sort((a, b) => b[1] - a[1]).slice(0, 12);
  if (frequency.length) rows.push(["Training tags", frequency.map(([t, n]) => `${t} (${n})`).join(", ")]);
  return rows;
}

/** The stack's rows with the card's LoRA added (on, strength 1, pinned to its sha256); a row already there for
 *  the file is switched on and keeps its strength. */
export function rowsWithCard(rows, card) {
  return addRow(rows, card.lora, card.sha256 ? { sha256: card.sha256 } : {});
}

/**
 * Where a card dropped on the canvas goes: the Loom LoRA Stack under the pointer, else the one selected stack,
 * else a new stack at the drop point. `under` is the node under the pointer (or null), `selected` the selected
 * nodes. Returns {action: "add", node} or {action: "create"}.
 */
export function dropTarget(under, selected = []) {
  if (under?.type === STACK_TYPE) return { action: "add", node: under };
  const stacks = selected.filter((n) => n?.type === STACK_TYPE);
  if (stacks.length === 1) return { action: "add", node: stacks[0] };
  return { action: "create" };
}
