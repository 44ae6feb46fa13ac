// Fields of the pack's nodes, as a new user meets them: prompt boxes as tall as CLIP Text Encode's, and
// Loom Compose's `rule_blocks` checked while it is edited (by the server, with the node's own parser), the
// problem shown on the node instead of only when Run fails.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { el } from "./common.js";

const EXTENSION = "loom.NodeFields";
const PROMPT_MIN_HEIGHT = 166; // the box is drawn 12 px shorter: as tall as CLIP Text Encode's on a fresh node (154)
const PROMPTS = {
  LoomRegion: ["prompt"], LoomCompose: ["global_prompt"], LoomLibrarySearch: ["prompt"], LoomCLoraConcept: ["prompt"],
  LoomCLora: ["base_prompt"], LoomPromptSchedule: ["prompt"],
};

function tallPrompts(node, names) {
  let changed = false;
  for (const w of node.widgets ?? []) {
    if (!names.includes(w.name) || !w.options || w.type !== "customtext") continue;
    w.options.getMinHeight = () => PROMPT_MIN_HEIGHT;
    changed = true;
  }
  const want = changed ? node.computeSize?.() : null;
  if (!want || !node.size) return;
  node.setSize([Math.max(node.size[0], want[0]), Math.max(node.size[1], want[1])]);
  node.setDirtyCanvas?.(true, true); // frontend 1.49 lays the widgets out (the prompt's height) only when it draws
}

/** The server's verdict on a rule_blocks spec: null when it reads, else the message. */
async function ruleBlocksProblem(spec) {
  try {
    const res = await api.fetchApi(`/loom/check/rule_blocks?${new URLSearchParams({ spec })}`);
    const body = await res.json();
    return body.ok ? null : body.error;
  } catch (err) {
    console.warn("[loom] could not check rule_blocks", err);
    return null;
  }
}

function checkRuleBlocks(node) {
  const widget = node.widgets?.find((w) => w.name === "rule_blocks");
  if (!widget || node.loomRuleBlocks) return;
  const note = el("div", { className: "loom-rule-blocks-problem" });
  note.style.cssText = "font:11px sans-serif;color:#f88;padding:0 4px;white-space:normal;";
  node.loomRuleBlocks = note;
  node.addDOMWidget("rule_blocks_check", "loom_note", note, { serialize: false, hideOnZoom: false,
    getMinHeight: () => (note.textContent ? 34 : 0), getMaxHeight: () => (note.textContent ? 34 : 0) });
  const check = async () => {
    const problem = await ruleBlocksProblem(String(widget.value ?? ""));
    note.textContent = problem ? `rule_blocks: ${problem.replace(/^rule blocks /, "")}` : "";
    node.setDirtyCanvas?.(true, true);
  };
  const callback = widget.callback;
  widget.callback = function () {
    const result = callback?.apply(this, arguments);
    check();
    return result;
  };
  node.loomCheckRuleBlocks = check;
}

if (!app.extensions?.some((e) => e.name === EXTENSION)) app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const prompts = PROMPTS[nodeData.name];
    if (!prompts) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (nodeData.name === "LoomCompose") checkRuleBlocks(this);
      setTimeout(() => tallPrompts(this, prompts), 0); // after every extension has added its widgets
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      this.loomCheckRuleBlocks?.();
      return result;
    };
  },
});
