// DOM-free logic of the region editor (tested with `node --test` from tests/js/): box geometry in normalised
// canvas units (0..1, x right, y down), mouse gestures (draw, move, resize), the latent's size found through the
// graph, and the regions a Loom Compose node receives, in order.

export const BOX_KEYS = Object.freeze(["x0", "y0", "x1", "y1"]);
export const MIN_SIZE = 0.02; // smallest box edge, normalised
export const STEP = 0.01; // the x0/y0/x1/y1 widgets' step: boxes are stored on this grid so they reload exactly
export const LATENT_TYPES = Object.freeze(["EmptySD3LatentImage", "EmptyLatentImage", "EmptyFluxLatentImage",
  "EmptyHunyuanLatentVideo", "LoomPlaygroundLatent"]);
export const REGION_COLORS = Object.freeze(["#e4572e", "#29a3e0", "#76b041", "#ffc914", "#a06cd5", "#f08cae"]);

const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

/** Round to the widgets' grid (0.01), avoiding float noise such as 0.30000000000000004. */
export function snap(value) {
  return Math.round(value / STEP) / Math.round(1 / STEP);
}

/** A box with ordered edges inside [0, 1], at least MIN_SIZE wide and high, snapped to the widget grid. */
export function normalizeBox(box) {
  let x0 = clamp(Math.min(box.x0, box.x1), 0, 1);
  let x1 = clamp(Math.max(box.x0, box.x1), 0, 1);
  let y0 = clamp(Math.min(box.y0, box.y1), 0, 1);
  let y1 = clamp(Math.max(box.y0, box.y1), 0, 1);
  if (x1 - x0 < MIN_SIZE) [x0, x1] = x0 + MIN_SIZE <= 1 ? [x0, x0 + MIN_SIZE] : [1 - MIN_SIZE, 1];
  if (y1 - y0 < MIN_SIZE) [y0, y1] = y0 + MIN_SIZE <= 1 ? [y0, y0 + MIN_SIZE] : [1 - MIN_SIZE, 1];
  return { x0: snap(x0), y0: snap(y0), x1: snap(x1), y1: snap(y1) };
}

/** The drawing area for a latent of `aspect` (width / height) fitted inside `avail` pixels, centred. */
export function fitView(aspect, avail) {
  const a = aspect > 0 && Number.isFinite(aspect) ? aspect : 1;
  let width = avail.width;
  let height = width / a;
  if (height > avail.height) {
    height = avail.height;
    width = height * a;
  }
  return { left: (avail.width - width) / 2, top: (avail.height - height) / 2, width, height };
}

/** Box (normalised) -> pixel rectangle {left, top, width, height} inside `view`. */
export function boxToPixels(box, view) {
  return { left: view.left + box.x0 * view.width, top: view.top + box.y0 * view.height,
    width: (box.x1 - box.x0) * view.width, height: (box.y1 - box.y0) * view.height };
}

/** A pixel point -> normalised point, clamped to the view. */
export function pixelToPoint(px, view) {
  return { x: clamp((px.x - view.left) / view.width, 0, 1), y: clamp((px.y - view.top) / view.height, 0, 1) };
}

/**
 * What a press at pixel `px` grabs on the box: a corner ("nw", "ne", "sw", "se"), an edge ("n", "s", "e", "w"),
 * the inside ("move"), or nothing (null: a press outside draws a new box). `grip` is the handle size in pixels.
 */
export function hitTest(box, px, view, grip = 8) {
  const r = boxToPixels(box, view);
  const right = r.left + r.width;
  const bottom = r.top + r.height;
  if (px.x < r.left - grip || px.x > right + grip || px.y < r.top - grip || px.y > bottom + grip) return null;
  const near = (a, b) => Math.abs(a - b) <= grip;
  const ns = near(px.y, r.top) ? "n" : near(px.y, bottom) ? "s" : "";
  const we = near(px.x, r.left) ? "w" : near(px.x, right) ? "e" : "";
  if (ns || we) return ns + we;
  const inside = px.x > r.left && px.x < right && px.y > r.top && px.y < bottom;
  return inside ? "move" : null;
}

/**
 * The box after a gesture: `mode` from hitTest ("move", a corner or an edge) or "draw" (from the press point
 * `start` to `point`); `start` and `point` are normalised points, `box` the box when the press began.
 */
export function dragBox(box, mode, start, point) {
  const dx = point.x - start.x;
  const dy = point.y - start.y;
  if (mode === "draw") return normalizeBox({ x0: start.x, y0: start.y, x1: point.x, y1: point.y });
  if (mode === "move") {
    const w = box.x1 - box.x0;
    const h = box.y1 - box.y0;
    const x0 = clamp(box.x0 + dx, 0, 1 - w);
    const y0 = clamp(box.y0 + dy, 0, 1 - h);
    return normalizeBox({ x0, y0, x1: x0 + w, y1: y0 + h });
  }
  if (!/^[nswe]{1,2}$/.test(mode ?? "")) throw new Error(`unknown box gesture ${JSON.stringify(mode)}`);
  const out = { ...box };
  if (mode.includes("w")) out.x0 = Math.min(box.x0 + dx, box.x1 - MIN_SIZE);
  if (mode.includes("e")) out.x1 = Math.max(box.x1 + dx, box.x0 + MIN_SIZE);
  if (mode.includes("n")) out.y0 = Math.min(box.y0 + dy, box.y1 - MIN_SIZE);
  if (mode.includes("s")) out.y1 = Math.max(box.y1 + dy, box.y0 + MIN_SIZE);
  return normalizeBox(out);
}

/** The CSS cursor for a gesture. */
export function cursorFor(mode) {
  if (mode === "move") return "move";
  if (!mode) return "crosshair";
  return { n: "ns-resize", s: "ns-resize", e: "ew-resize", w: "ew-resize", nw: "nwse-resize", se: "nwse-resize",
    ne: "nesw-resize", sw: "nesw-resize" }[mode];
}

/**
 * The latent size nearest to node `startId` through links in either direction (breadth first), from a node
 * whose type is in LATENT_TYPES; null when none is connected. `graph.nodes` maps id -> {type, width, height};
 * `graph.links` is a list of [fromId, toId].
 */
export function findLatentSize(startId, graph) {
  const neighbours = new Map();
  for (const [a, b] of graph.links) {
    if (!neighbours.has(a)) neighbours.set(a, []);
    if (!neighbours.has(b)) neighbours.set(b, []);
    neighbours.get(a).push(b);
    neighbours.get(b).push(a);
  }
  const seen = new Set([startId]);
  let frontier = [startId];
  while (frontier.length) {
    const next = [];
    for (const id of frontier) {
      const node = graph.nodes.get(id);
      if (node && id !== startId && LATENT_TYPES.includes(node.type) && node.width > 0 && node.height > 0) {
        return { width: node.width, height: node.height };
      }
      for (const n of neighbours.get(id) ?? []) {
        if (!seen.has(n)) {
          seen.add(n);
          next.push(n);
        }
      }
    }
    frontier = next.sort((a, b) => a - b);
  }
  return null;
}

/**
 * The regions a node receives, in the order the pack composes them: a Loom Region's chained `regions` first and
 * then itself; a Loom Regions node's inputs regions_1..regions_6 in order; a Loom Compose node's `regions`.
 * `describe(id)` returns {type, inputs: {name: sourceId}, region: {...}} or null.
 */
export function collectRegions(id, describe, seen = new Set()) {
  if (id === null || id === undefined || seen.has(id)) return [];
  seen.add(id);
  const node = describe(id);
  if (!node) return [];
  if (node.type === "LoomRegion") return [...collectRegions(node.inputs.regions, describe, seen), { id, ...node.region }];
  if (node.type === "LoomRegions") {
    return Object.keys(node.inputs).filter((k) => /^regions_\d+$/.test(k))
      .sort((a, b) => Number(a.slice(8)) - Number(b.slice(8)))
      .flatMap((k) => collectRegions(node.inputs[k], describe, seen));
  }
  if (node.type === "LoomCompose") return collectRegions(node.inputs.regions, describe, seen);
  return [];
}


/** The lines Loom Library Search shows for its picks (`[{lora, title, score}]`), or what it shows before a run. */
export function pickLines(picks) {
  if (!picks?.length) return ["picks appear here after a run"];
  return picks.map((p, i) => `${i + 1}. ${p.lora.replace(/^.*\//, "")}${p.title ? ` — ${p.title}` : ""} (score ${Number(p.score).toFixed(3)})`);
}

/** Pairs [i, j] (0-based, i < j) of regions whose boxes share area; mask regions are left out (no box). */
export function overlaps(regions) {
  const out = [];
  for (let i = 0; i < regions.length; i++) {
    for (let j = i + 1; j < regions.length; j++) {
      const a = regions[i], b = regions[j];
      if (a.mask || b.mask) continue;
      const w = Math.min(a.box.x1, b.box.x1) - Math.max(a.box.x0, b.box.x0);
      const h = Math.min(a.box.y1, b.box.y1) - Math.max(a.box.y0, b.box.y0);
      if (w > 1e-6 && h > 1e-6) out.push([i, j]);
    }
  }
  return out;
}

/** Words of `text` broken into lines of at most `width` characters (a longer word is split). */
export function wrapText(text, width) {
  const lines = [];
  let line = "";
  for (let word of text.split(/\s+/).filter(Boolean)) {
    while (word.length > width) {
      if (line) { lines.push(line); line = ""; }
      lines.push(word.slice(0, width));
      word = word.slice(width);
    }
    if (!line) line = word;
    else if (line.length + 1 + word.length <= width) line += ` ${word}`;
    else { lines.push(line); line = word; }
  }
  if (line) lines.push(line);
  return lines;
}

/** A region's label as lines that fit `width` characters: "1. prompt" wrapped, then its LoRAs, nothing cut. */
export function regionLines(index, prompt, loras = [], width = 40) {
  const text = (prompt ?? "").trim().replace(/\s+/g, " ") || "(no prompt)";
  const names = loras.map((l) => l.replace(/^.*\//, "").replace(/\.safetensors$/, ""));
  return [...wrapText(`${index + 1}. ${text}`, width), ...(names.length ? wrapText(`LoRA: ${names.join(", ")}`, width) : [])];
}
