// Shared workflows: after a workflow loads, every LoRA it names (Loom LoRA Stack rows, core LoRA loaders) is
// checked against this machine's loras folders. A missing file pinned by sha256 is looked up in the library by
// that hash and the node is pointed at the local file with the same bytes; anything still missing is named, with
// its hash, in a message that stays until closed. Nothing is ever replaced by a different LoRA.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { el } from "./common.js";
import { renameBySha256 } from "./stack_rows.js";
import { loraReferences, missingMessage, missingReferences, resolvedMessage } from "./workflow_loras.js";

const EXTENSION = "loom.SharedWorkflows";

async function localLoraNames() {
  const res = await api.fetchApi("/object_info/LoraLoader");
  const info = await res.json();
  return info?.LoraLoader?.input?.required?.lora_name?.[0] ?? [];
}

async function resolveBySha256(ref) {
  const params = new URLSearchParams({ name: ref.lora, sha256: ref.sha256 });
  const res = await api.fetchApi(`/loom/library/resolve?${params}`);
  return res.ok ? (await res.json()).lora ?? null : null;
}

function plainNodes(graph) {
  return (graph._nodes ?? graph.nodes ?? []).map((n) => ({
    id: n.id, type: n.type, title: n.title, properties: n.properties,
    widgets: Object.fromEntries((n.widgets ?? []).map((w) => [w.name, w.value])),
  }));
}

function pointAt(node, ref, found) {
  if (node.type === "LoomLoraStack" && node.loomStack) {
    node.loomStack.write(renameBySha256(node.loomStack.read(), ref.sha256, found));
  } else {
    const w = node.widgets?.find((x) => x.name === "lora_name");
    if (w) w.value = found;
  }
}

/** A message that stays until closed, at the bottom left of the canvas: ComfyUI's toasts open top right, over
 *  the Run button, and an error toast stays there until closed. */
function notice(summary, detail) {
  document.querySelector(".loom-notice")?.remove();
  const close = el("button", { textContent: "✕", title: "close", className: "loom-notice-close" });
  const box = el("div", { className: "loom-notice", role: "alert" }, [
    close, el("strong", { textContent: summary }), el("pre", { textContent: detail }),
    el("div", { textContent: "The rows are marked on their Loom LoRA Stack nodes, with what to do next." })]);
  box.style.cssText = "position:fixed;left:64px;bottom:48px;z-index:1000;max-width:560px;padding:8px 10px;" +
    "background:var(--comfy-menu-bg,#222);color:var(--input-text,#ddd);border:1px solid #e55;border-radius:6px;" +
    "font:12px sans-serif;box-shadow:0 2px 8px #0008;";
  box.querySelector("pre").style.cssText = "white-space:pre-wrap;margin:4px 0;font:11px monospace;";
  close.style.cssText = "float:right;margin-left:8px;";
  close.addEventListener("click", () => box.remove());
  document.body.append(box);
}

function notify(severity, summary, detail) {
  if (severity === "error") return notice(summary, detail);
  app.extensionManager?.toast?.add?.({ severity, summary, detail, life: 8000 });
}

/** Check the loaded graph; returns {missing, resolved} (also kept on app.loomWorkflowLoras for inspection). */
export async function checkWorkflowLoras(graph = app.graph) {
  const names = await localLoraNames();
  const missing = missingReferences(loraReferences(plainNodes(graph)), names);
  const unresolved = [];
  const resolved = [];
  for (const ref of missing) {
    const found = !ref.error && ref.sha256 ? await resolveBySha256(ref).catch(() => null) : null;
    const node = graph.getNodeById(ref.nodeId);
    if (found && names.includes(found) && node) {
      pointAt(node, ref, found);
      resolved.push({ ...ref, found });
    } else {
      unresolved.push(ref);
    }
  }
  if (resolved.length) notify("info", "LoRA found by sha256", resolvedMessage(resolved));
  if (unresolved.length) {
    const text = missingMessage(unresolved);
    console.warn(`[loom] missing LoRA files:\n${text}`);
    notify("error", `Missing LoRA file${unresolved.length > 1 ? "s" : ""}`, text);
  }
  app.loomWorkflowLoras = { missing: unresolved, resolved };
  return app.loomWorkflowLoras;
}

if (!app.extensions?.some((e) => e.name === EXTENSION)) app.registerExtension({
  name: EXTENSION,
  async afterConfigureGraph() {
    try {
      await checkWorkflowLoras(app.graph);
    } catch (err) {
      console.error("[loom] could not check the workflow's LoRA files", err);
      notify("error", "LoRA check failed", String(err.message ?? err));
    }
  },
});
