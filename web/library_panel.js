// LoRA Library sidebar tab: search the library by prompt (with filters), result cards with preview, trigger
// words and why they matched, a details view with header metadata, and cards dragged onto the canvas to add a
// row to a Loom LoRA Stack (the one under the pointer, else the selected one, else a new one at the drop point).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { el, keepKeys, modelSource } from "./common.js";
import { activeFilters, cardModel, detailRows, dropTarget, PAGE, resultSummary, rowsWithCard, searchParams, STACK_TYPE } from "./library_cards.js";

const EXTENSION = "loom.LibraryPanel";
const TAB_ID = "loom-library";
const DRAG_THRESHOLD = 5; // pixels the pointer moves before a press on a card becomes a drag
const state = { query: "", baseModel: "", folder: "", include: "", exclude: "", writer: "", variant: "", hits: [], closest: [], message: "",
  k: PAGE, model: null, fitsOnly: true, scanSummary: "" };

/** The stack the panel adds to (the selected one, else the only one) and the model connected to it. */
function targetModel() {
  const nodes = app.graph?._nodes ?? [];
  const selected = Object.values(app.canvas?.selected_nodes ?? {}).filter((n) => n.type === STACK_TYPE);
  const stacks = nodes.filter((n) => n.type === STACK_TYPE);
  const stack = selected[0] ?? (stacks.length === 1 ? stacks[0] : null);
  const source = stack ? modelSource(stack) : null;
  if (!source) return null;
  const loaderNode = nodes.find((n) => n.type === source.loader);
  return { ...source, label: source.model || loaderNode?.title || source.loader };
}

async function getJson(path, params) {
  const res = await api.fetchApi(`/loom/library/${path}?${new URLSearchParams(params)}`);
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error || `${path}: HTTP ${res.status}`);
  return body;
}

/** Add the card's LoRA to the stack the drop point chooses; returns that node. `canvasPos` is in graph units. */
export function addCardToGraph(card, canvasPos, under) {
  const selected = Object.values(app.canvas.selected_nodes ?? {});
  const target = dropTarget(under, selected);
  let node = target.node;
  if (target.action === "create") {
    node = LiteGraph.createNode(STACK_TYPE);
    node.pos = [canvasPos[0], canvasPos[1]];
    app.graph.add(node);
  }
  if (!node.loomStack) throw new Error(`${STACK_TYPE} #${node.id} has no row editor`);
  node.loomStack.write(rowsWithCard(node.loomStack.read(), card));
  setTimeout(() => { // once the row editor has drawn the new row: grow the node to fit it
    const fit = node.computeSize?.();
    if (fit) node.setSize([Math.max(node.size[0], fit[0]), Math.max(node.size[1], fit[1])]);
    app.graph.setDirtyCanvas(true, true);
  }, 100);
  app.canvas.selectNode?.(node);
  app.graph.setDirtyCanvas(true, true);
  return node;
}

/** Whether a client point lies over the graph canvas (not over the sidebar, menus or dialogs). */
function overCanvas(x, y) {
  const canvas = app.canvas.canvas;
  const rect = canvas.getBoundingClientRect();
  if (x < rect.left || x > rect.right || y < rect.top || y > rect.bottom) return false;
  const hit = document.elementFromPoint(x, y);
  return !!hit && (hit === canvas || !!hit.closest(".dom-widget, .graph-canvas-container, #graph-canvas-container"))
    && !hit.closest(".loom-library");
}

function dropAt(card, clientX, clientY) {
  const [x, y] = app.canvas.convertEventToCanvasOffset({ clientX, clientY });
  return addCardToGraph(card, [x, y], app.graph.getNodeOnPos(x, y));
}

/** Pointer-driven drag (works with any mouse and with synthetic pointer events): a ghost follows the pointer. */
function makeDraggable(cardEl, card) {
  cardEl.addEventListener("pointerdown", (down) => {
    if (down.button !== 0 || down.target.closest("button")) return;
    let ghost = null;
    const move = (e) => {
      if (!ghost && Math.hypot(e.clientX - down.clientX, e.clientY - down.clientY) < DRAG_THRESHOLD) return;
      if (!ghost) {
        ghost = el("div", { className: "loom-lib-ghost", textContent: `+ ${card.title}` });
        ghost.style.cssText = "position:fixed;z-index:10000;pointer-events:none;padding:4px 8px;border-radius:6px;" +
          "background:var(--comfy-menu-bg,#333);color:var(--input-text,#ddd);border:1px solid #6af;font:12px sans-serif;";
        document.body.append(ghost);
      }
      ghost.style.left = `${e.clientX + 12}px`;
      ghost.style.top = `${e.clientY + 8}px`;
      e.preventDefault();
    };
    const up = (e) => {
      document.removeEventListener("pointermove", move, true);
      document.removeEventListener("pointerup", up, true);
      if (!ghost) return;
      ghost.remove();
      if (overCanvas(e.clientX, e.clientY)) {
        e.stopPropagation();
        try {
          dropAt(card, e.clientX, e.clientY);
        } catch (err) {
          console.error("[loom] could not add the LoRA to a stack", err);
        }
      }
    };
    document.addEventListener("pointermove", move, true);
    document.addEventListener("pointerup", up, true);
  });
}

function chip(text, kind) {
  const c = el("span", { className: `loom-lib-chip loom-lib-${kind}`, textContent: text });
  c.style.cssText = "display:inline-block;padding:0 5px;margin:1px;border-radius:8px;font-size:11px;" +
    (kind === "trigger" ? "background:#2d5a88;color:#fff;" : "background:#444;color:#ccc;");
  return c;
}

function fitBadge(fit) {
  if (!fit || fit.ok === null) return null;
  const badge = el("span", { className: `loom-lib-fit loom-lib-fit-${fit.ok ? "ok" : "no"}`,
    textContent: fit.ok ? "fits" : "doesn't fit", title: fit.reason });
  badge.style.cssText = "display:inline-block;padding:0 5px;margin-left:4px;border-radius:8px;font-size:10px;font-weight:normal;" +
    (fit.ok ? "background:#2d6a3a;color:#fff;" : "background:#8a3b2a;color:#fff;");
  return badge;
}

function renderCard(card, showDetails, number = null) {
  const img = card.preview ? el("img", { src: api.apiURL(card.preview), alt: card.title, draggable: false })
    : el("div", { textContent: "no preview" });
  img.className = "loom-lib-preview";
  img.style.cssText = "width:64px;height:64px;object-fit:cover;border-radius:4px;flex:none;background:#222;" +
    "font-size:10px;display:flex;align-items:center;justify-content:center;color:#888;";
  const details = el("button", { className: "loom-lib-details-button", textContent: "details", title: "header metadata" });
  details.addEventListener("click", () => showDetails(card));
  const add = el("button", { className: "loom-lib-add", textContent: "add", title: "add to the selected Loom LoRA Stack" });
  add.addEventListener("click", () => {
    const centre = app.canvas.ds ? app.canvas.convertCanvasToOffset([app.canvas.canvas.clientWidth / 3, app.canvas.canvas.clientHeight / 3])
      : [100, 100];
    addCardToGraph(card, centre, null);
  });
  const title = el("div", { className: "loom-lib-title" }, [
    number !== null ? el("span", { className: "loom-lib-rank", textContent: `${number}. ` }) : null,
    card.title, fitBadge(card.fit)]);
  const copies = card.copies.length ? el("div", { className: "loom-lib-copies",
    textContent: `same file also at: ${card.copies.join(", ")}`, title: "byte-identical copies (same sha256)" }) : null;
  if (copies) copies.style.cssText = "font-size:11px;opacity:.7;";
  const text = el("div", {}, [
    title,
    el("div", { className: "loom-lib-file", textContent: card.lora, title: card.sha256 ? `sha256 ${card.sha256}` : "" }),
    copies,
    el("div", {}, [...(card.variant ? [chip(card.variant, "variant")] : []), ...card.triggers.map((t) => chip(t, "trigger")),
      ...card.tags.slice(0, 6).map((t) => chip(t, "tag"))]),
    el("div", { className: "loom-lib-why", textContent: card.why, title: card.why }),
    el("div", {}, [details, add]),
  ]);
  text.style.cssText = "min-width:0;flex:1;display:flex;flex-direction:column;gap:2px;";
  text.querySelector(".loom-lib-title").style.fontWeight = "bold";
  text.querySelector(".loom-lib-file").style.cssText = "opacity:.7;font-size:11px;overflow:hidden;text-overflow:ellipsis;";
  text.querySelector(".loom-lib-why").style.cssText = "font-size:11px;color:#9c9;overflow:hidden;text-overflow:ellipsis;";
  const cardEl = el("div", { className: "loom-lib-card", title: "drag onto the canvas to add to a Loom LoRA Stack" },
    [img, text]);
  cardEl.dataset.lora = card.lora;
  cardEl.style.cssText = "display:flex;gap:8px;padding:6px;border:1px solid #555;border-radius:6px;cursor:grab;" +
    "user-select:none;touch-action:none;";
  makeDraggable(cardEl, card);
  return cardEl;
}

function renderPanel(root) {
  root.replaceChildren();
  root.className = "loom-library";
  root.style.cssText = "display:flex;flex-direction:column;gap:6px;padding:8px;font:12px sans-serif;" +
    "color:var(--input-text);height:100%;overflow:auto;box-sizing:border-box;";
  const field = (name, placeholder, value, label) => {
    const input = el("input", { type: "text", placeholder, value, className: `loom-lib-${name}`, title: label });
    input.setAttribute("aria-label", label);
    input.style.cssText = "width:100%;box-sizing:border-box;padding:3px;";
    return input;
  };
  const query = field("query", "describe the LoRA you want…", state.query, "search by words, meaning or trigger word");
  const baseModel = field("base-model", "base model (e.g. Flux.1 D, flux1-dev)", state.baseModel, "only LoRAs for this base model");
  const folder = field("folder", "folder", state.folder, "only LoRAs under this folder of your loras folder");
  const include = field("include", "tags to include, comma separated", state.include, "tags every LoRA must have");
  const exclude = field("exclude", "tags to exclude, comma separated", state.exclude, "tags no LoRA may have");
  const variant = field("variant", "Flux variant (dev, schnell, fill, kontext…)", state.variant,
    "only LoRAs whose file says which Flux variant they are for");
  const writer = field("writer", "written by (kohya, ai-toolkit, onetrainer…)", state.writer,
    "only LoRAs written by this tool, as their file tells");
  const filters = el("details", { className: "loom-lib-filters" }, [el("summary", { textContent: "filters" }),
    baseModel, variant, writer, folder, include, exclude]);
  const fitsOnly = el("input", { type: "checkbox", checked: state.fitsOnly, className: "loom-lib-fits-only" });
  const modelLine = el("label", { className: "loom-lib-model" }, [fitsOnly, el("span")]);
  modelLine.style.cssText = "display:flex;gap:4px;align-items:center;font-size:11px;";
  const rescan = el("button", { className: "loom-lib-rescan", textContent: "rescan", title: "look for new, changed or removed files" });
  const scanSummary = el("div", { className: "loom-lib-scan", textContent: state.scanSummary });
  scanSummary.style.cssText = "font-size:11px;color:#9bd;";
  const status = el("div", { className: "loom-lib-status", textContent: state.message });
  status.style.opacity = "0.8";
  const results = el("div", { className: "loom-lib-results" });
  results.style.cssText = "display:flex;flex-direction:column;gap:6px;";
  const more = el("button", { className: "loom-lib-more", textContent: "show more", title: `${PAGE} more results` });
  const clear = el("button", { className: "loom-lib-clear-filters", textContent: "clear filters" });
  const detailsView = el("div", { className: "loom-lib-details" });
  detailsView.style.display = "none";
  const show = (view) => { // the results list or one LoRA's details
    results.style.display = view === results ? "flex" : "none";
    detailsView.style.display = view === detailsView ? "block" : "none";
  };

  async function showDetails(card) {
    try {
      const d = await getJson("details", { ref: card.sha256 || card.lora });
      const table = el("table", {}, detailRows(d).map(([k, v]) => el("tr", {}, [
        el("th", { textContent: k }), el("td", { textContent: v })])));
      table.style.cssText = "border-collapse:collapse;font-size:11px;text-align:left;";
      table.querySelectorAll("th").forEach((th) => { th.style.cssText = "padding-right:6px;vertical-align:top;opacity:.7;white-space:nowrap;"; });
      table.querySelectorAll("td").forEach((td) => { td.style.wordBreak = "break-all"; });
      const back = el("button", { textContent: "← results", className: "loom-lib-back" });
      back.addEventListener("click", () => show(results));
      const preview = d.preview_url ? [el("img", { src: api.apiURL(d.preview_url), className: "loom-lib-details-preview" })] : [];
      preview.forEach((img) => { img.style.cssText = "max-width:160px;border-radius:4px;"; });
      detailsView.replaceChildren(back, el("h3", { textContent: card.title }), ...preview, table);
      show(detailsView);
    } catch (err) {
      status.textContent = `details failed: ${err.message}`;
    }
  }

  function showModel() {
    const label = modelLine.querySelector("span");
    modelLine.style.display = state.model ? "flex" : "none";
    if (state.model) label.textContent = `only LoRAs that fit ${state.model.label}${state.modelText ? ` (${state.modelText})` : ""}`;
  }

  function showHits() {
    const cards = state.hits.map((hit, i) => renderCard(cardModel(hit), showDetails, i + 1));
    const closest = !state.hits.length ? (state.closest ?? []).map((hit) => {
      const card = renderCard(cardModel(hit), showDetails);
      card.classList.add("loom-lib-closest");
      card.style.opacity = "0.6";
      return card;
    }) : [];
    results.replaceChildren(...cards, ...closest);
    status.textContent = state.message;
    status.classList.toggle("loom-lib-empty", !state.hits.length && !!state.message);
    more.style.display = state.hits.length >= state.k ? "" : "none";
    clear.style.display = !state.hits.length && activeFilters(state).length ? "" : "none";
    showModel();
  }

  let timer = null;
  let latest = 0; // answers to older searches are dropped
  async function search({ keepPage = false } = {}) {
    clearTimeout(timer);
    const mine = ++latest;
    Object.assign(state, { query: query.value, baseModel: baseModel.value, folder: folder.value,
      include: include.value, exclude: exclude.value, writer: writer.value, variant: variant.value,
      fitsOnly: fitsOnly.checked, model: targetModel() });
    if (!keepPage) state.k = PAGE;
    status.textContent = "searching…";
    try {
      const body = await getJson("search", searchParams(state));
      if (mine !== latest) return;
      state.hits = body.hits ?? [];
      state.closest = body.closest ?? [];
      state.modelText = body.model ?? "";
      state.message = resultSummary(state);
    } catch (err) {
      if (mine !== latest) return;
      Object.assign(state, { hits: [], closest: [], message: `search failed: ${err.message}` });
    }
    show(results);
    showHits();
  }
  const action = () => { state.scanSummary = ""; scanSummary.textContent = ""; }; // the summary stays until then

  for (const input of [query, baseModel, variant, writer, folder, include, exclude]) {
    keepKeys(input);
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") search(); });
    input.addEventListener("input", () => { action(); clearTimeout(timer); timer = setTimeout(search, 350); });
  }
  fitsOnly.addEventListener("change", () => { action(); search(); });
  more.addEventListener("click", () => { state.k += PAGE; search({ keepPage: true }); });
  clear.addEventListener("click", () => {
    for (const input of [baseModel, variant, writer, folder, include, exclude]) input.value = "";
    fitsOnly.checked = false;
    search();
  });
  rescan.addEventListener("click", async () => {
    action();
    status.textContent = "scanning…";
    try {
      let res = await api.fetchApi("/loom/library/rescan", { method: "POST" });
      for (let tries = 0; res.status === 409 && tries < 120; tries++) { // a scan is running: ours follows it
        status.textContent = "a scan is running; rescanning after it…";
        await new Promise((done) => setTimeout(done, 500));
        res = await api.fetchApi("/loom/library/rescan", { method: "POST" });
      }
      const body = await res.json();
      if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
      const errors = body.errors?.length ? `, ${body.errors.length} unreadable` : "";
      state.scanSummary = `rescan: ${body.total} files (${body.added} added, ${body.updated} updated, ${body.removed} removed${errors})`;
      scanSummary.textContent = state.scanSummary;
      search();
    } catch (err) {
      status.textContent = `rescan failed: ${err.message}`;
    }
  });
  const bar = el("div", {}, [query]);
  bar.style.cssText = "display:flex;gap:4px;";
  root.append(el("h3", { textContent: "LoRA Library" }), bar, filters, modelLine, el("div", {}, [rescan]), scanSummary,
    status, clear, results, more, detailsView);
  root.loomSearch = search;
  showHits();
  search({ keepPage: true });
  query.focus();
}

if (!app.extensions?.some((e) => e.name === EXTENSION)) app.registerExtension({
  name: EXTENSION,
  async setup() {
    api.addEventListener("loom.library.progress", (e) => {
      const status = document.querySelector(".loom-lib-status");
      if (status && !e.detail?.finished) status.textContent = `scanning ${e.detail.done}/${e.detail.total} ${e.detail.file ?? ""}`;
    });
    app.extensionManager?.registerSidebarTab?.({
      id: TAB_ID,
      icon: "pi pi-book",
      title: "LoRA Library",
      tooltip: "LoRA Library (LoRA Loom): search by prompt, drag onto the canvas",
      type: "custom",
      render: (root) => renderPanel(root),
    });
  },
});
