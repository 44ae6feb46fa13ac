"""Workflow files: build UI-format graphs (what ComfyUI's template browser and "Save" produce) and convert them
to the API format that ``/prompt`` accepts, the way ComfyUI's frontend does, using the server's ``/object_info``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the frontend, never sent to the server
SEED_NAMES = {"seed", "noise_seed"}


def _spec(info: dict, name: str) -> list:
    for group in ("required", "optional"):
        if name in info["input"].get(group, {}):
            return info["input"][group][name]
    raise KeyError(name)


def is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control_widget(name: str, spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return spec[0] == "INT" and name in SEED_NAMES


def widget_names(info: dict) -> list[tuple[str, bool]]:
    """The node's widget inputs in order, each with whether a control_after_generate value follows it."""
    order = info.get("input_order") or {g: list(info["input"].get(g, {})) for g in ("required", "optional")}
    names = []
    for name in [*order.get("required", []), *order.get("optional", [])]:
        spec = _spec(info, name)
        if is_widget(spec):
            names.append((name, has_control_widget(name, spec)))
    return names


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (nodes + links) to the API format; unknown node types raise KeyError."""
    links = {link[0]: link for link in ui.get("links", [])}
    api: dict[str, dict] = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            raise ValueError(f"node {node['id']} ({node['type']}) is muted or bypassed; not supported here")
        if node["type"] not in object_info:
            raise KeyError(f"node type {node['type']!r} (node {node['id']}) is not installed on this server")
        info = object_info[node["type"]]
        inputs: dict = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        values = node.get("widgets_values", [])
        if isinstance(values, dict):  # some nodes store widgets by name
            for name, _ in widget_names(info):
                if name in values and name not in inputs:
                    inputs[name] = values[name]
        else:
            i = 0
            for name, control in widget_names(info):
                if i >= len(values):
                    break
                inputs.setdefault(name, values[i])
                i += 2 if control else 1
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


@dataclass
class GraphBuilder:
    """Builds a UI-format workflow node by node; widget values are given by name and ordered via object_info."""

    object_info: dict
    nodes: list = field(default_factory=list)
    links: list = field(default_factory=list)

    def add(self, class_type: str, pos: tuple[float, float], title: str | None = None, **values) -> int:
        info = self.object_info[class_type]
        node_id = len(self.nodes) + 1
        widgets = []
        for name, control in widget_names(info):
            spec = _spec(info, name)
            default = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
            if default is None and isinstance(spec[0], list) and spec[0]:
                default = spec[0][0]
            widgets.append(values.pop(name, default))
            if control:
                widgets.append("fixed")
        if values:
            raise KeyError(f"{class_type} has no widgets {sorted(values)}")
        inputs = [{"name": n, "type": _spec(info, n)[0] if not isinstance(_spec(info, n)[0], list) else "COMBO",
                   "link": None} for n in info.get("input_order", {}).get("required", [])
                  if not is_widget(_spec(info, n))]
        inputs += [{"name": n, "type": _spec(info, n)[0], "link": None}
                   for n in info.get("input_order", {}).get("optional", []) if not is_widget(_spec(info, n))]
        outputs = [{"name": n, "type": t, "links": []} for n, t in zip(info["output_name"], info["output"])]
        node = {"id": node_id, "type": class_type, "pos": list(pos), "size": [320, 120], "flags": {}, "order": 0,
                "mode": 0, "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": class_type},
                "widgets_values": widgets}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def connect(self, src: int, slot: int, dst: int, input_name: str) -> None:
        link_id = len(self.links) + 1
        out = self.nodes[src - 1]["outputs"][slot]
        target = next(i for i in self.nodes[dst - 1]["inputs"] if i["name"] == input_name)
        target["link"] = link_id
        out["links"].append(link_id)
        target_slot = self.nodes[dst - 1]["inputs"].index(target)
        self.links.append([link_id, src, slot, dst, target_slot, out["type"]])

    def workflow(self, extra: dict | None = None) -> dict:
        for order, node in enumerate(self.nodes):
            node["order"] = order
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": extra or {}, "version": 0.4}
