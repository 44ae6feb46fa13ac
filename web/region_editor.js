// Region editor: on Loom Region, draw, move and resize the region's box over a canvas with the latent's aspect
// ratio (from the EmptySD3LatentImage / EmptyLatentImage connected through the graph, else 1:1); the box lives in
// the node's x0/y0/x1/y1 widgets, so the workflow JSON serialises and reloads it exactly. On Loom Compose, every
// chained region's box with its prompt and LoRAs (read-only). A connected MASK overrides the box, as in the node.
//
// Each editor owns its <canvas> in a DOM widget and redraws itself when what it shows changes (its signature):
// on its own events (a box edited, the canvas resized or mounted, links changed, a workflow loaded), after any
// edit on the page (a pointer released, a field changed or typed in), and on each frame the classic LiteGraph
// canvas draws the node. The same drawing code serves both renderers: the classic canvas and the Vue node
// renderer ("Nodes 2.0", which moves the DOM widget into its node and never calls onDrawForeground).
import { app } from "../../scripts/app.js";
import { parseRows } from "./stack_rows.js";
import {
  BOX_KEYS, collectRegions, cursorFor, dragBox, findLatentSize, fitView, hitTest, overlaps, pixelToPoint, REGION_COLORS,
  regionLines,
} from "./region_boxes.js";

const EXTENSION = "loom.RegionEditor";
const EDITOR_HEIGHT = 200;

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function readBox(node) {
  const box = {};
  for (const key of BOX_KEYS) box[key] = Number(widget(node, key)?.value ?? 0);
  return box;
}

function writeBox(node, box) {
  for (const key of BOX_KEYS) {
    const w = widget(node, key);
    if (!w || w.value === box[key]) continue;
    w.value = box[key];
    w.callback?.(w.value, app.canvas, node);
  }
  node.setDirtyCanvas?.(true, true);
  refreshAll(); // the regions after this one and Loom Compose show the box too
}

function linksOf(graph) {
  const links = graph.links instanceof Map ? [...graph.links.values()] : Object.values(graph.links ?? {});
  return links.filter(Boolean).map((l) => [l.origin_id, l.target_id]);
}

/** The latent's size nearest to `node` in the graph, or null. */
function latentSize(node) {
  const graph = node.graph ?? app.graph;
  const nodes = new Map((graph._nodes ?? graph.nodes ?? []).map((n) => [n.id,
    { type: n.type, width: Number(widget(n, "width")?.value), height: Number(widget(n, "height")?.value) }]));
  return findLatentSize(node.id, { nodes, links: linksOf(graph) });
}

function inputNode(node, name) {
  const slot = node.inputs?.findIndex((i) => i.name === name) ?? -1;
  return slot >= 0 && node.inputs[slot].link != null ? node.getInputNode?.(slot) ?? null : null;
}

/** The LoRA files feeding a region's `adapters` input: a stack's rows, or Loom Library Search's last picks. */
function regionLoras(node) {
  const stack = inputNode(node, "adapters");
  if (stack?.type === "LoomLibrarySearch") {
    const picks = stack.properties?.loom_picks;
    return picks?.length ? picks.map((p) => p.lora) : ["(Library Search: picked when run)"];
  }
  if (stack?.type !== "LoomLoraStack") return [];
  try {
    return parseRows(widget(stack, "rows")?.value ?? "").filter((r) => r.on).map((r) => r.lora);
  } catch {
    return [];
  }
}

function describe(graph) {
  return (id) => {
    const node = graph.getNodeById(id);
    if (!node) return null;
    const inputs = {};
    for (const [slot, input] of (node.inputs ?? []).entries()) {
      if (input.link != null) inputs[input.name] = node.getInputNode(slot)?.id ?? null;
    }
    const region = node.type === "LoomRegion" ? { box: readBox(node), prompt: widget(node, "prompt")?.value ?? "",
      loras: regionLoras(node), mask: !!inputNode(node, "mask") } : null;
    return { type: node.type, inputs, region };
  };
}

function drawRegion(ctx, view, region, index, { active = false, faint = false } = {}) {
  const color = REGION_COLORS[index % REGION_COLORS.length];
  const x = view.left + region.box.x0 * view.width;
  const y = view.top + region.box.y0 * view.height;
  const w = (region.box.x1 - region.box.x0) * view.width;
  const h = (region.box.y1 - region.box.y0) * view.height;
  ctx.globalAlpha = faint ? 0.12 : 0.28;
  ctx.fillStyle = color;
  ctx.fillRect(x, y, w, h);
  ctx.globalAlpha = faint ? 0.5 : 1;
  ctx.strokeStyle = color;
  ctx.lineWidth = active ? 2 : 1;
  ctx.setLineDash(region.mask ? [5, 4] : []);
  ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
  ctx.setLineDash([]);
  if (active) {
    ctx.fillStyle = "#fff";
    for (const [hx, hy] of [[x, y], [x + w, y], [x, y + h], [x + w, y + h]]) ctx.fillRect(hx - 3, hy - 3, 6, 6);
  }
  ctx.globalAlpha = faint ? 0.6 : 1;
  ctx.fillStyle = "#fff";
  ctx.font = "11px sans-serif";
  // the label wraps to the box's width; lines that do not fit its height are listed under the canvas instead
  const perChar = Math.max(4, ctx.measureText("abcdefghij").width / 10);
  const lines = regionLines(index, region.prompt, region.loras, Math.max(6, Math.floor((w - 8) / perChar)));
  if (region.mask) lines.push("mask input (overrides the box)");
  const room = Math.max(1, Math.floor((h - 4) / 13));
  ctx.save();
  ctx.beginPath();
  ctx.rect(x, y, w, h);
  ctx.clip();
  lines.slice(0, room).forEach((line, i) => ctx.fillText(line, x + 4, y + 13 + 13 * i));
  ctx.restore();
  ctx.globalAlpha = 1;
  return lines.length <= room;
}

function drawBackground(ctx, view, size) {
  ctx.clearRect(0, 0, ctx.canvas.width, ctx.canvas.height);
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(view.left, view.top, view.width, view.height);
  ctx.strokeStyle = "#333";
  ctx.lineWidth = 1;
  for (let i = 1; i < 4; i++) {
    const gx = view.left + (view.width * i) / 4;
    const gy = view.top + (view.height * i) / 4;
    ctx.beginPath(); ctx.moveTo(gx, view.top); ctx.lineTo(gx, view.top + view.height); ctx.stroke();
    ctx.beginPath(); ctx.moveTo(view.left, gy); ctx.lineTo(view.left + view.width, gy); ctx.stroke();
  }
  ctx.strokeStyle = "#777";
  ctx.strokeRect(view.left + 0.5, view.top + 0.5, view.width - 1, view.height - 1);
  ctx.fillStyle = "#999";
  ctx.font = "10px sans-serif";
  ctx.fillText(size ? `${size.width}×${size.height} latent` : "1:1 (no latent connected)", view.left + 4,
    view.top + view.height - 5);
}

/** The surfaces of the editors on the page. */
const surfaces = new Set();

/** Ask every editor to redraw if what it shows changed (at most once per frame each). */
function refreshAll() {
  for (const surface of surfaces) surface.schedule();
}

/** A signature of what the drawing depends on, so the canvas is redrawn only when something changed. */
function signature(node, surface) {
  const graph = node.graph ?? app.graph;
  const regions = node.type === "LoomCompose" ? collectRegions(node.id, describe(graph))
    : [describe(graph)(node.id).region, ...collectRegions(inputNode(node, "regions")?.id, describe(graph))];
  return JSON.stringify([regions, latentSize(node), surface.canvas.offsetWidth, surface.canvas.offsetHeight]);
}

/**
 * The editor element of `node`: a canvas sized to its box, drawn by `surface.draw()` (set by the editor);
 * `refresh()` draws when the signature changed, `schedule()` refreshes on the next frame; `view` is where the
 * latent is drawn.
 */
function makeSurface(className, node) {
  const root = document.createElement("div");
  root.className = className;
  root.style.cssText = `width:100%;height:${EDITOR_HEIGHT}px;position:relative;`;
  const canvas = document.createElement("canvas");
  canvas.style.cssText = "width:100%;height:100%;display:block;touch-action:none;cursor:crosshair;";
  root.append(canvas);
  const surface = { root, canvas, view: null, size: null, draw: null, drawn: null, frame: 0 };
  surface.refresh = () => {
    if (!surface.draw || !node.graph || node.flags?.collapsed) return;
    const sig = signature(node, surface);
    if (sig === surface.drawn) return;
    surface.drawn = sig;
    surface.draw();
  };
  surface.schedule = () => {
    surface.frame ||= requestAnimationFrame(() => {
      surface.frame = 0;
      surface.refresh();
    });
  };
  const resized = new ResizeObserver(surface.schedule); // mounted in a node (Vue nodes), the node resized
  resized.observe(canvas);
  surface.dispose = () => {
    resized.disconnect();
    surfaces.delete(surface);
  };
  surfaces.add(surface);
  surface.prepare = (node) => {
    const width = Math.max(40, canvas.offsetWidth || 300);
    const height = Math.max(40, canvas.offsetHeight || EDITOR_HEIGHT);
    if (canvas.width !== width || canvas.height !== height) Object.assign(canvas, { width, height });
    surface.size = latentSize(node);
    const aspect = surface.size ? surface.size.width / surface.size.height : 1;
    const fitted = fitView(aspect, { width: width - 8, height: height - 8 });
    surface.view = { ...fitted, left: fitted.left + 4, top: fitted.top + 4 };
    return canvas.getContext("2d");
  };
  // Client point -> canvas pixels (the DOM widget is scaled with the graph's zoom).
  surface.pixel = (e) => {
    const rect = canvas.getBoundingClientRect();
    return { x: (e.clientX - rect.left) * (canvas.width / rect.width), y: (e.clientY - rect.top) * (canvas.height / rect.height) };
  };
  return surface;
}

function attachRegionEditor(node) {
  if (node.loomRegion) return;
  const surface = makeSurface("loom-region-editor", node);
  const { canvas } = surface;
  let gesture = null;

  const draw = () => {
    const ctx = surface.prepare(node);
    drawBackground(ctx, surface.view, surface.size);
    const earlier = collectRegions(inputNode(node, "regions")?.id, describe(node.graph ?? app.graph));
    earlier.forEach((r, i) => drawRegion(ctx, surface.view, r, i, { faint: true }));
    const own = describe(node.graph ?? app.graph)(node.id).region;
    drawRegion(ctx, surface.view, own, earlier.length, { active: true });
  };
  surface.draw = draw;

  canvas.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    e.stopPropagation();
    e.preventDefault();
    draw();
    const px = surface.pixel(e);
    const box = readBox(node);
    gesture = { mode: hitTest(box, px, surface.view) ?? "draw", box, start: pixelToPoint(px, surface.view) };
    canvas.setPointerCapture?.(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    const px = surface.pixel(e);
    if (!gesture) {
      if (surface.view) canvas.style.cursor = cursorFor(hitTest(readBox(node), px, surface.view));
      return;
    }
    e.stopPropagation();
    writeBox(node, dragBox(gesture.box, gesture.mode, gesture.start, pixelToPoint(px, surface.view)));
    surface.refresh();
  });
  const end = (e) => {
    if (!gesture) return;
    e.stopPropagation();
    gesture = null;
    canvas.releasePointerCapture?.(e.pointerId);
    draw();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  for (const type of ["mousedown", "wheel", "contextmenu"]) {
    canvas.addEventListener(type, (e) => { if (type !== "wheel") e.stopPropagation(); });
  }

  node.addDOMWidget("region_editor", "loom_region", surface.root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => EDITOR_HEIGHT, getMaxHeight: () => EDITOR_HEIGHT,
  });
  node.loomRegion = { draw, surface, readBox: () => readBox(node), writeBox: (box) => { writeBox(node, box); draw(); } };
  if (node.size && node.size[0] < 340) node.setSize?.([340, node.size[1]]);
}

const VIEW_NOTE_HEIGHT = 64;

function attachComposeView(node) {
  if (node.loomCompose) return;
  const surface = makeSurface("loom-compose-view", node);
  surface.root.style.height = `${EDITOR_HEIGHT + VIEW_NOTE_HEIGHT}px`;
  surface.canvas.style.height = `${EDITOR_HEIGHT}px`;
  const note = document.createElement("div");
  note.className = "loom-compose-legend";
  note.style.cssText = `height:${VIEW_NOTE_HEIGHT}px;overflow:auto;font:11px sans-serif;color:#bbb;padding:2px 4px;box-sizing:border-box;`;
  surface.root.append(note);
  surface.canvas.style.cursor = "default";
  surface.canvas.title = "a view of the regions feeding this node; edit each box on its Loom Region node";
  const draw = () => {
    const ctx = surface.prepare(node);
    drawBackground(ctx, surface.view, surface.size);
    const regions = collectRegions(node.id, describe(node.graph ?? app.graph));
    const hidden = regions.map((r, i) => drawRegion(ctx, surface.view, r, i) ? null : i).filter((i) => i !== null);
    const clashes = overlaps(regions);
    const lines = [regions.length ? `View only (${regions.length} region${regions.length > 1 ? "s" : ""}): edit a box on its Loom Region node.`
      : "View only: no regions connected."];
    for (const [i, j] of clashes) lines.push(`⚠ regions ${i + 1} and ${j + 1} overlap: both prompts and LoRAs act where they meet.`);
    for (const i of hidden) lines.push(regionLines(i, regions[i].prompt, regions[i].loras, 200).join(" — "));
    note.replaceChildren(...lines.map((text) => Object.assign(document.createElement("div"),
      { textContent: text, className: text.startsWith("⚠") ? "loom-compose-overlap" : "" })));
    note.querySelectorAll(".loom-compose-overlap").forEach((d) => { d.style.color = "#fb6"; });
    return regions;
  };
  surface.draw = draw;
  node.addDOMWidget("regions_view", "loom_regions_view", surface.root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => EDITOR_HEIGHT + VIEW_NOTE_HEIGHT,
    getMaxHeight: () => EDITOR_HEIGHT + VIEW_NOTE_HEIGHT,
  });
  node.loomCompose = { draw, surface };
}

const ATTACH = { LoomRegion: attachRegionEditor, LoomCompose: attachComposeView };

// An edit anywhere may change what an editor shows (a latent's size, a prompt, a stack's rows, a link): the
// editors check after each one. Capture: the Vue node renderer stops pointer events inside its nodes.
const EDIT_EVENTS = ["pointerup", "change", "input", "keyup"];

/** Chain `method` on the node type's prototype: ours runs after the original, with the same arguments. */
function chain(nodeType, method, after) {
  const original = nodeType.prototype[method];
  nodeType.prototype[method] = function () {
    const result = original?.apply(this, arguments);
    after.call(this, ...arguments);
    return result;
  };
}

const surfaceOf = (node) => (node.loomRegion ?? node.loomCompose)?.surface;

if (!app.extensions?.some((e) => e.name === EXTENSION)) app.registerExtension({
  name: EXTENSION,
  setup() {
    for (const type of EDIT_EVENTS) document.addEventListener(type, refreshAll, { capture: true, passive: true });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const attach = ATTACH[nodeData.name];
    if (!attach) return;
    chain(nodeType, "onNodeCreated", function () { attach(this); });
    chain(nodeType, "onConfigure", function () { surfaceOf(this)?.schedule(); });
    chain(nodeType, "onConnectionsChange", () => refreshAll());
    chain(nodeType, "onRemoved", function () { surfaceOf(this)?.dispose(); });
    chain(nodeType, "onDrawForeground", function () { surfaceOf(this)?.refresh(); }); // the classic canvas
  },
});
