// `?loom_example=<title>` in the page address opens that example workflow of the pack once the UI has loaded
// (what `make run` prints): the pack's own first-run hook, since ComfyUI's `?template=` accepts only names
// without spaces and the examples' file names are their titles.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "loom.OpenExample";
const PARAM = "loom_example";
let pending = new URLSearchParams(window.location.search).get(PARAM);

/** Load the pack's example `title` from ComfyUI's workflow templates (whichever folder the pack is in). */
export async function openExample(title) {
  const modules = await (await api.fetchApi("/workflow_templates")).json();
  const module = Object.keys(modules).find((m) => modules[m].includes(title));
  if (!module) throw new Error(`no example workflow named “${title}”`);
  const res = await api.fetchApi(`/workflow_templates/${encodeURIComponent(module)}/${encodeURIComponent(title)}.json`);
  if (!res.ok) throw new Error(`example “${title}”: HTTP ${res.status}`);
  await app.loadGraphData(await res.json(), true, true, title);
}

if (!app.extensions?.some((e) => e.name === EXTENSION)) app.registerExtension({
  name: EXTENSION,
  async afterConfigureGraph() {
    if (!pending) return;
    const title = pending;
    pending = null; // once: the first graph the UI configures is its start-up workflow; ours replaces it
    const url = new URL(window.location.href);
    url.searchParams.delete(PARAM);
    window.history.replaceState(window.history.state, "", url);
    setTimeout(() => openExample(title).catch((err) => {
      console.error("[loom] could not open the example", err);
      app.extensionManager?.toast?.add?.({ severity: "warn", summary: "LoRA Loom", detail: String(err.message ?? err), life: 8000 });
    }), 0);
  },
});
