// Shared by the pack's web features: the element builder, the library routes, which model a node's MODEL input
// comes from, and keys kept away from ComfyUI's shortcuts while a field of ours has focus.
import { api } from "../../scripts/api.js";
import { modelLoader } from "./graph_models.js";

/** `el("div", {className}, [children])`: an element with properties and children. */
export function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) if (child != null) node.append(child);
  return node;
}

/** GET a library route (nodes/routes.py) as JSON; `null` when it answers an error (logged). */
export async function libraryJson(path, params = {}) {
  try {
    const res = await api.fetchApi(`/loom/library/${path}?${new URLSearchParams(params)}`);
    return res.ok ? await res.json() : null;
  } catch (err) {
    console.warn(`[loom] /loom/library/${path} failed`, err);
    return null;
  }
}

function plainNode(node) {
  if (!node) return null;
  return {
    id: node.id, type: node.type,
    inputs: Object.fromEntries((node.inputs ?? []).map((input, slot) => [input.name, input.link != null ? node.getInputNode?.(slot)?.id ?? null : null])),
    widgets: Object.fromEntries((node.widgets ?? []).map((w) => [w.name, w.value])),
  };
}

/** The loader of the model `node` receives through its `model` input: {loader, model} or null. */
export function modelSource(node) {
  const graph = node?.graph;
  if (!graph) return null;
  return modelLoader(node.id, (id) => plainNode(graph.getNodeById(id)));
}

/** Keep typing in our fields from reaching ComfyUI's canvas shortcuts (Delete would remove the node). */
export function keepKeys(element) {
  for (const type of ["keydown", "keyup", "keypress"]) element.addEventListener(type, (e) => e.stopPropagation());
}
