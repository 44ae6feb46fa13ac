// Loom LoRA Stack: a row editor (toggle, LoRA, strength, CLIP strength, block weights) over the node's JSON
// `rows` widget. The JSON stays the single source of truth, so workflows serialise and reload exactly.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { addRow, parseRows, pinSha256, removeRow, renameBySha256, rowsToResolve, serializeRows, updateRow } from "./stack_rows.js";

const EXTENSION = "loom.LoraStack";
let loraNames = null;

async function fetchLoraNames() {
  if (loraNames) return loraNames;
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

// The library routes (nodes/routes.py): a file's sha256, and the local file a shared workflow's sha256 means.
async function libraryJson(path, params) {
  try {
    const res = await api.fetchApi(`/loom/library/${path}?${new URLSearchParams(params)}`);
    return res.ok ? await res.json() : null;
  } catch (err) {
    console.warn(`[loom] /loom/library/${path} failed`, err);
    return null;
  }
}

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

function numberInput(value, onChange, title) {
  const input = el("input", { type: "number", step: "0.05", value: value ?? "", title, className: "loom-num" });
  input.style.width = "4.5em";
  input.addEventListener("change", () => onChange(input.value === "" ? null : Number(input.value)));
  return input;
}

export function attachStackEditor(node) {
  const rowsWidget = node.widgets?.find((w) => w.name === "rows");
  if (!rowsWidget) return;
  rowsWidget.hidden = true;
  const root = el("div", { className: "loom-stack" });
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;font:12px sans-serif;color:var(--input-text);";

  const read = () => { try { return parseRows(rowsWidget.value); } catch { return []; } };
  const write = (rows) => {
    rowsWidget.value = serializeRows(rows);
    rowsWidget.callback?.(rowsWidget.value);
    render();
    node.setDirtyCanvas?.(true, true);
  };

  // Every row the editor writes carries its file's sha256, so the workflow finds the same file elsewhere.
  async function pin(lora) {
    const info = await libraryJson("details", { ref: lora });
    if (info?.sha256 && read().some((r) => r.lora === lora && r.sha256 !== info.sha256)) {
      write(pinSha256(read(), lora, info.sha256));
    }
  }

  // Rows from another machine whose file has another name here: ask the library which local file has the hash.
  const resolving = new Set();
  async function resolveRenamed(names) {
    for (const row of rowsToResolve(read(), names)) {
      if (resolving.has(row.sha256)) continue;
      resolving.add(row.sha256);
      const found = await libraryJson("resolve", { name: row.lora, sha256: row.sha256 });
      if (found?.lora && names.includes(found.lora)) write(renameBySha256(read(), row.sha256, found.lora));
    }
  }

  async function render() {
    const names = await fetchLoraNames();
    const rows = read();
    resolveRenamed(names);
    root.replaceChildren();
    rows.forEach((row, i) => {
      const toggle = el("input", { type: "checkbox", checked: row.on, title: "on/off" });
      toggle.addEventListener("change", () => write(updateRow(read(), i, { on: toggle.checked })));
      const select = el("select", { title: row.sha256 ? `sha256 ${row.sha256}` : row.lora },
        [...new Set([row.lora, ...names])].map((n) => el("option", { value: n, textContent: n, selected: n === row.lora })));
      select.style.flex = "1";
      select.addEventListener("change", () => {
        write(updateRow(read(), i, { lora: select.value, sha256: null }));
        pin(select.value);
      });
      const strength = numberInput(row.strength, (v) => write(updateRow(read(), i, { strength: v ?? 0 })), "strength");
      const clip = numberInput(row.clip_strength, (v) => write(updateRow(read(), i, { clip_strength: v })), "CLIP strength (empty = same)");
      const blocks = el("input", { type: "text", value: row.blocks, placeholder: "blocks", title: "block weights: preset, spec (double3-5=0.5) or 58 values" });
      blocks.style.width = "6em";
      blocks.addEventListener("change", () => write(updateRow(read(), i, { blocks: blocks.value })));
      const remove = el("button", { textContent: "✕", title: "remove row" });
      remove.addEventListener("click", () => write(removeRow(read(), i)));
      const line = el("div", { className: "loom-stack-row" }, [toggle, select, strength, clip, blocks, remove]);
      line.style.cssText = `display:flex;gap:4px;align-items:center;opacity:${row.on ? 1 : 0.5}`;
      root.append(line);
    });
    const add = el("button", { textContent: "+ Add LoRA", className: "loom-stack-add" });
    add.addEventListener("click", async () => {
      const first = (await fetchLoraNames())[0];
      if (first) {
        write(addRow(read(), first));
        pin(first);
      } else alert("No LoRA files found in your loras folders.");
    });
    root.append(add);
  }

  node.addDOMWidget("rows_editor", "loom_stack", root, { serialize: false, hideOnZoom: false });
  if (node.size && node.size[0] < 440) node.setSize?.([440, node.size[1]]);
  node.loomStack = { read, write, render };
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
  },
});
