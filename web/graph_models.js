// DOM-free (tested with `node --test` from tests/js/): which loader node a MODEL input comes from, so the pack
// can ask the server whether a LoRA fits that model before Run.

/** Loader node type -> the widget naming its file (the server reads only that file's header). */
export const MODEL_LOADERS = Object.freeze({
  UNETLoader: "unet_name", CheckpointLoaderSimple: "ckpt_name", CheckpointLoader: "ckpt_name",
  ImageOnlyCheckpointLoader: "ckpt_name", LoomPlaygroundModel: null,
});

/**
 * Follow `model` inputs upstream from node `startId` (through stacks, Compose, model patches ...) to the
 * node that loads the model. `lookup(id)` gives {type, inputs: {name: sourceId|null}, widgets: {name: value}}.
 * Returns {loader, model} (model: the file name, "" for loaders without one) or null when it cannot tell.
 */
export function modelLoader(startId, lookup) {
  const seen = new Set();
  let node = lookup(startId);
  let next = node?.inputs?.model;
  while (next != null && !seen.has(next)) {
    seen.add(next);
    node = lookup(next);
    if (!node) return null;
    if (node.type in MODEL_LOADERS) {
      const widget = MODEL_LOADERS[node.type];
      return { loader: node.type, model: widget ? String(node.widgets?.[widget] ?? "") : "" };
    }
    next = node.inputs?.model;
  }
  return null;
}
