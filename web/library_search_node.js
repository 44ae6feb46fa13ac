// Loom Library Search shows on the node which LoRAs it picked (file, title, score) after each run; the picks
// are kept in the node's properties, so a saved workflow shows them again and the region views can name them.
import { app } from "../../scripts/app.js";
import { el } from "./common.js";
import { pickLines } from "./region_boxes.js";

const EXTENSION = "loom.LibrarySearchNode";

function showPicks(node) {
  const list = node.loomPicksView;
  if (!list) return;
  const picks = node.properties?.loom_picks;
  list.replaceChildren(...pickLines(picks).map((line, i) => el("div", {
    className: picks?.length ? "loom-pick" : "loom-pick-none", textContent: line, title: picks?.[i]?.lora ?? "" })));
  node.setDirtyCanvas?.(true, true);
}

function attachPicks(node) {
  if (node.loomPicksView) return;
  const list = el("div", { className: "loom-picks" });
  list.style.cssText = "font:11px sans-serif;color:var(--input-text);padding:2px 4px;overflow:hidden;" +
    "white-space:nowrap;text-overflow:ellipsis;";
  node.loomPicksView = list;
  node.addDOMWidget("picks", "loom_picks", list, { serialize: false, hideOnZoom: false,
    getMinHeight: () => 18 * Math.max(1, node.properties?.loom_picks?.length ?? 1) + 6 });
  showPicks(node);
}

if (!app.extensions?.some((e) => e.name === EXTENSION)) app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "LoomLibrarySearch") return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      attachPicks(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      showPicks(this);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      if (message?.loom_picks) {
        this.properties = { ...(this.properties ?? {}), loom_picks: message.loom_picks };
        showPicks(this);
        const want = this.computeSize?.();
        if (want && want[1] > this.size[1]) this.setSize([this.size[0], want[1]]);
      }
      return result;
    };
  },
});
