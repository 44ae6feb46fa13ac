// Loom LoRA Stack: a row editor (on, LoRA, strength, CLIP strength, block weights) over the node's JSON `rows`
// widget. The JSON stays the single source of truth, so workflows serialise and reload exactly. Each row is
// checked against the model connected to the stack (a LoRA made for another model is flagged before Run) and
// against this machine's LoRA files (a missing one is marked on its row with what to do next).
//
// The editor is a controller (`stackController`: rows, checks, actions) and a renderer (`renderStack`: DOM for
// the classic LiteGraph node); another renderer (Vue nodes) can draw the same controller.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { el, keepKeys, libraryJson, modelSource } from "./common.js";
import { addRow, parseRows, pinSha256, removeRow, renameBySha256, rowsToResolve, serializeRows, updateRow } from "./stack_rows.js";

const EXTENSION = "loom.LoraStack";
const MIN_WIDTH = 480;
const COLUMNS = "22px minmax(0,1fr) 58px 58px 64px 24px";
let loraNames = null;

async function fetchLoraNames(refresh = false) {
  if (loraNames && !refresh) return loraNames;
  try {
    const res = await api.fetchApi("/object_info/LoraLoader");
    const info = await res.json();
    loraNames = info?.LoraLoader?.input?.required?.lora_name?.[0] ?? [];
  } catch (err) {
    console.warn("[loom] could not list LoRAs", err);
    loraNames = [];
  }
  return loraNames;
}

/** Rows, the LoRA list, fit per row against the connected model, and the edits; no DOM. */
function stackController(node, rowsWidget, onChange) {
  const state = { names: [], fits: {}, model: null };
  const read = () => { try { return parseRows(rowsWidget.value); } catch { return []; } };
  const write = (rows) => {
    rowsWidget.value = serializeRows(rows);
    rowsWidget.callback?.(rowsWidget.value);
    onChange();
    node.setDirtyCanvas?.(true, true);
  };
  // Every row the editor writes carries its file's sha256, so the workflow finds the same file elsewhere.
  async function pin(lora) {
    const info = await libraryJson("details", { ref: lora });
    if (info?.sha256 && read().some((r) => r.lora === lora && r.sha256 !== info.sha256)) write(pinSha256(read(), lora, info.sha256));
  }
  // Rows from another machine whose file has another name here: ask the library which local file has the hash.
  const resolving = new Set();
  async function resolveRenamed() {
    for (const row of rowsToResolve(read(), state.names)) {
      if (resolving.has(row.sha256)) continue;
      resolving.add(row.sha256);
      const found = await libraryJson("resolve", { name: row.lora, sha256: row.sha256 });
      if (found?.lora && state.names.includes(found.lora)) write(renameBySha256(read(), row.sha256, found.lora));
    }
  }
  // Whether each row's LoRA fits the model connected to the stack (asked again when the model or rows change).
  let fitKey = "";
  async function checkFit() {
    const source = modelSource(node);
    const refs = [...new Set(read().map((r) => r.lora).filter((n) => state.names.includes(n)))];
    const key = JSON.stringify([source, refs]);
    if (key === fitKey) return false;
    fitKey = key;
    if (!source || !refs.length) {
      Object.assign(state, { fits: {}, model: null });
      return true;
    }
    const answer = await libraryJson("fit", { loader: source.loader, model: source.model, refs: refs.join(",") });
    Object.assign(state, { fits: answer?.fits ?? {}, model: answer?.model ?? null });
    return true;
  }
  return {
    state, read, write, pin, resolveRenamed, checkFit,
    async refresh() {
      state.names = await fetchLoraNames();
      resolveRenamed();
      await checkFit();
    },
    add: async () => {
      const first = (await fetchLoraNames())[0];
      if (!first) return alert("No LoRA files found in your loras folders.");
      write(addRow(read(), first));
      pin(first);
    },
    findByHash: async (row) => {
      const found = await libraryJson("resolve", { name: row.lora, sha256: row.sha256 ?? "" });
      if (found?.lora) {
        await fetchLoraNames(true);
        write(renameBySha256(read(), row.sha256, found.lora));
      }
      return found;
    },
  };
}

function numberInput(value, onChange, label, placeholder = "") {
  const input = el("input", { type: "number", step: "0.05", value: value ?? "", title: label, placeholder, className: "loom-num" });
  input.setAttribute("aria-label", label);
  input.style.cssText = "width:100%;box-sizing:border-box;min-width:0;";
  input.addEventListener("change", () => onChange(input.value === "" ? null : Number(input.value)));
  return input;
}

function grid(children, className) {
  const line = el("div", { className }, children);
  line.style.cssText = `display:grid;grid-template-columns:${COLUMNS};gap:4px;align-items:center;`;
  return line;
}

/** What a missing row says and offers: the file and hash, find it by hash, where to put it. */
function missingNote(row, ctl) {
  const hash = row.sha256 ? `sha256 ${row.sha256.slice(0, 12)}…` : "no sha256 recorded";
  const find = el("button", { textContent: "find by hash", className: "loom-stack-find", disabled: !row.sha256,
    title: "look in your loras folders for a file with the same sha256 (renamed or moved)" });
  const text = el("span", { textContent: `missing here (${hash}): put the file in your loras folder, or ` });
  find.addEventListener("click", async () => {
    find.disabled = true;
    const found = await ctl.findByHash(row);
    text.textContent = found ? `found as ${found.lora}` : `no file here has ${hash}; get it from where the workflow came from, then rescan in the LoRA Library `;
    find.disabled = !row.sha256;
  });
  const copy = el("button", { textContent: "copy hash", className: "loom-stack-copy", disabled: !row.sha256,
    title: "copy the sha256 to search for the file elsewhere" });
  copy.addEventListener("click", () => navigator.clipboard?.writeText(row.sha256));
  const note = el("div", { className: "loom-stack-missing-note" }, [text, find, copy]);
  note.style.cssText = "grid-column:2 / -1;color:#f88;font-size:11px;display:flex;flex-wrap:wrap;gap:4px;align-items:center;";
  return note;
}

/** The DOM of the editor for the classic node renderer. */
function renderStack(root, ctl) {
  const rows = ctl.read();
  const { names, fits } = ctl.state;
  root.replaceChildren();
  if (rows.length) {
    const header = grid(["on", "LoRA", "strength", "CLIP", "blocks", ""].map((t, i) => el("span", {
      textContent: t, title: ["use this row", "LoRA file", "strength on the model", "strength on CLIP (empty: same as model)",
        "block weights: a preset, a spec like double3-5=0.5, or 58 values", "remove"][i] })), "loom-stack-header");
    header.style.opacity = "0.7";
    header.style.fontSize = "11px";
    root.append(header);
  }
  rows.forEach((row, i) => {
    const missing = names.length && !names.includes(row.lora);
    const fit = fits[row.lora];
    const toggle = el("input", { type: "checkbox", checked: row.on, title: "use this row" });
    toggle.setAttribute("aria-label", `use ${row.lora}`);
    toggle.addEventListener("change", () => ctl.write(updateRow(ctl.read(), i, { on: toggle.checked })));
    const select = el("select", { title: row.sha256 ? `${row.lora}\nsha256 ${row.sha256}` : row.lora },
      [...new Set([row.lora, ...names])].map((n) => el("option", { value: n, textContent: n, selected: n === row.lora })));
    select.setAttribute("aria-label", "LoRA file");
    select.style.cssText = "width:100%;min-width:0;";
    select.addEventListener("change", () => {
      ctl.write(updateRow(ctl.read(), i, { lora: select.value, sha256: null }));
      ctl.pin(select.value);
    });
    const strength = numberInput(row.strength, (v) => ctl.write(updateRow(ctl.read(), i, { strength: v ?? 0 })), "strength");
    const clip = numberInput(row.clip_strength, (v) => ctl.write(updateRow(ctl.read(), i, { clip_strength: v })),
      "CLIP strength (empty: same as strength)", "same");
    clip.classList.add("loom-clip");
    const blocks = el("input", { type: "text", value: row.blocks, placeholder: "all", className: "loom-blocks",
      title: "block weights: a preset, a spec like double3-5=0.5, or 58 values (empty: all blocks)" });
    blocks.setAttribute("aria-label", "block weights");
    blocks.style.cssText = "width:100%;box-sizing:border-box;min-width:0;";
    blocks.addEventListener("change", () => ctl.write(updateRow(ctl.read(), i, { blocks: blocks.value })));
    const remove = el("button", { textContent: "✕", title: "remove this row", className: "loom-stack-remove" });
    remove.setAttribute("aria-label", `remove ${row.lora}`);
    remove.style.cssText = "padding:0;width:22px;";
    remove.addEventListener("click", () => ctl.write(removeRow(ctl.read(), i)));
    const line = grid([toggle, select, strength, clip, blocks, remove], "loom-stack-row");
    line.style.opacity = row.on ? "1" : "0.5";
    if (missing) {
      line.classList.add("loom-stack-row-missing");
      select.style.outline = "1px solid #e55";
      line.append(missingNote(row, ctl));
    } else if (fit?.ok === false) {
      line.classList.add("loom-stack-row-misfit");
      select.style.outline = "1px solid #e95";
      const warn = el("div", { className: "loom-stack-fit", textContent: `⚠ does not fit this model: ${fit.reason}` });
      warn.style.cssText = "grid-column:2 / -1;color:#fb6;font-size:11px;";
      line.append(warn);
    }
    root.append(line);
  });
  const add = el("button", { textContent: "+ Add LoRA", className: "loom-stack-add", title: "add a row (or drag a card from the LoRA Library)" });
  add.addEventListener("click", () => ctl.add());
  root.append(add);
}

export function attachStackEditor(node) {
  const rowsWidget = node.widgets?.find((w) => w.name === "rows");
  if (!rowsWidget || node.loomStack) return;
  rowsWidget.hidden = true; // the classic canvas reads this, Vue nodes (when the node is added) the option
  if (rowsWidget.options) rowsWidget.options.hidden = true;
  // `root` is sized by the node; `body` takes its content's natural height, which the node grows to fit
  const body = el("div", { className: "loom-stack" });
  body.style.cssText = "display:flex;flex-direction:column;gap:4px;font:12px sans-serif;color:var(--input-text);" +
    "box-sizing:border-box;padding-right:4px;";
  const root = el("div", { className: "loom-stack-frame" }, [body]);
  keepKeys(root);
  const fitNode = () => { // the node grows with its rows (never shrinks below what the user made it)
    const want = node.computeSize?.();
    if (!want || !node.size) return;
    const size = [Math.max(node.size[0], MIN_WIDTH), Math.max(node.size[1], want[1])];
    if (size[0] !== node.size[0] || size[1] !== node.size[1]) {
      node.setSize(size);
      node.graph?.setDirtyCanvas?.(true, true);
    }
  };
  new ResizeObserver(fitNode).observe(body); // rows added, notes wrapping, fonts loading
  // after an edit, draw once the browser has moved the focus (a change fires as Tab leaves the field)
  const ctl = stackController(node, rowsWidget, () => setTimeout(render, 0));
  async function render() {
    await ctl.refresh();
    // the rows are drawn anew: keep the keyboard where it was (Tab out of an edited field lands on the next one)
    const focused = body.contains(document.activeElement) ? document.activeElement : null;
    const where = focused ? [focused.closest(".loom-stack-row, .loom-stack-header, .loom-stack-add"),
      focused.closest(".loom-stack-row")?.querySelectorAll("input, select, button")] : null;
    const rowIndex = where?.[0] ? [...body.querySelectorAll(".loom-stack-row")].indexOf(where[0]) : -1;
    const fieldIndex = where?.[1] ? [...where[1]].indexOf(focused) : -1;
    const onAdd = focused?.classList.contains("loom-stack-add");
    renderStack(body, ctl);
    const target = onAdd ? body.querySelector(".loom-stack-add")
      : body.querySelectorAll(".loom-stack-row")[rowIndex]?.querySelectorAll("input, select, button")[fieldIndex];
    target?.focus();
    fitNode();
    node.graph?.setDirtyCanvas?.(true, true);
  }
  node.addDOMWidget("rows_editor", "loom_stack", root, {
    serialize: false, hideOnZoom: false,
    getMinHeight: () => Math.max(32, body.offsetHeight + 16),
  });
  if (node.size && node.size[0] < MIN_WIDTH) node.setSize?.([MIN_WIDTH, node.size[1]]);
  node.loomStack = { read: ctl.read, write: ctl.write, render, controller: ctl };
  render();
}

// ComfyUI may serve web/ twice (pyproject [tool.comfy].web and WEB_DIRECTORY) when the folder name differs from
// the project name; register once.
if (!app.extensions?.some((e) => e.name === EXTENSION)) app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "LoomLoraStack") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      attachStackEditor(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      this.loomStack?.render();
      return result;
    };
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () { // a new model upstream: check the rows again
      const result = onConnectionsChange?.apply(this, arguments);
      const stack = this.loomStack;
      if (stack) setTimeout(async () => { if (await stack.controller.checkFit()) stack.render(); }, 0);
      return result;
    };
  },
});
