"""ComfyUI workflow files in both formats, built from one description and read back by name.

Two formats describe the same graph:

- UI format (what the front end saves, loads and lists as a template; "version": 0.4): `nodes` with
  `inputs` (link sockets first, then one entry per widget with {"widget": {"name"}}), `outputs`,
  `widgets_values` (one value per widget, in the node's widget order), and `links` as
  [link_id, origin_id, origin_slot, target_id, target_slot, type].
- API format (what POST /prompt takes): {node_id: {"class_type", "inputs": {name: value | [src_id, slot]},
  "_meta": {"title"}}}. Front-end-only nodes (Note, MarkdownNote) are left out.

The widget order is the front end's (comfyui-frontend-package 1.32 and 1.49, which ComfyUI 0.3.75 and
0.33.0 pin): the widget inputs in `input_order` (required, then optional); an INT named seed / noise_seed
(or with `control_after_generate`) is followed by its "control after generate" value; a COMBO with
`image_upload` is followed by the upload button's value "image". Which input is a widget and which a
socket is read from the server's /object_info, never guessed from the name.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
VIRTUAL_NODES = frozenset({"Note", "MarkdownNote"})  # front-end only: no API entry, one text widget
SEED_NAMES = ("seed", "noise_seed")
SLOT_HEIGHT, WIDGET_HEIGHT, TITLE_HEIGHT = 20, 24, 30
MIN_VIEW_SCALE = 0.65


# ---- the schema of one node type, from /object_info ------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str          # "INT", "COMBO", "MODEL", ...
    options: dict      # the schema's options; a COMBO's choices under "options"
    optional: bool

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def widget_slots(self) -> list[str]:
        """Names of the values this input puts into widgets_values, in order."""
        slots = [self.name]
        if self.type == "INT" and self.options.get("control_after_generate", self.name in SEED_NAMES):
            slots.append("control_after_generate")
        elif self.type == "COMBO" and self.options.get("control_after_generate"):
            slots.append("control_after_generate")
        if self.type == "COMBO" and self.options.get("image_upload"):
            slots.append("upload")
        return slots


def input_specs(object_info: dict, node_type: str) -> list[InputSpec]:
    """The node type's inputs in the server's order (required, then optional); hidden ones left out."""
    if node_type not in object_info:
        raise KeyError(f"node type {node_type!r} is not in /object_info (is its pack loaded?)")
    info = object_info[node_type]
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    specs = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            raw = info["input"][section][name]
            kind, options = raw[0], dict(raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {})
            if isinstance(kind, list):  # the older combo form: the choices in place of the type
                kind, options["options"] = "COMBO", kind
            specs.append(InputSpec(name, kind, options, section == "optional"))
    return specs


def output_specs(object_info: dict, node_type: str) -> list[tuple[str, str]]:
    """(display name, type) of each output slot."""
    info = object_info[node_type]
    return list(zip(info.get("output_name") or info["output"], info["output"]))


# ---- the description of a workflow ----------------------------------------------------------------

@dataclass
class NodeSpec:
    id: int
    type: str
    pos: tuple[float, float]
    widgets: dict = field(default_factory=dict)   # input name (or "<name>.control_after_generate") -> value
    title: str | None = None
    size: tuple[float, float] | None = None       # None: estimated from its sockets and widgets
    color: str | None = None
    bgcolor: str | None = None


@dataclass
class WorkflowSpec:
    name: str
    nodes: list[NodeSpec]
    links: list[tuple[int, str, int, str]]        # (origin id, output name, target id, input name)
    groups: list[dict] = field(default_factory=list)


def _widget_value(node: NodeSpec, spec: InputSpec, slot: str):
    if slot == "control_after_generate":
        return node.widgets.get(f"{spec.name}.control_after_generate", "fixed")
    if slot == "upload":
        return "image"
    if spec.name in node.widgets:
        return node.widgets[spec.name]
    if "default" in spec.options:
        return spec.options["default"]
    if spec.type == "COMBO" and spec.options.get("options"):
        return spec.options["options"][0]
    raise ValueError(f"{node.type} node {node.id}: give a value for widget {spec.name!r} (it has no default)")


def _estimate_size(n_sockets: int, n_outputs: int, n_widgets: int) -> list[float]:
    return [320.0, float(TITLE_HEIGHT + SLOT_HEIGHT * max(n_sockets, n_outputs, 1) + WIDGET_HEIGHT * n_widgets + 16)]


def _ui_node(node: NodeSpec, object_info: dict) -> dict:
    """One UI-format node with its sockets, widget inputs and widgets_values (links filled in later)."""
    if node.type in VIRTUAL_NODES:
        out = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size or (400, 200)),
               "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {},
               "widgets_values": [node.widgets["text"]]}
        unknown = set(node.widgets) - {"text"}
    else:
        specs = input_specs(object_info, node.type)
        sockets = [s for s in specs if not s.is_widget]
        widgets = [s for s in specs if s.is_widget]
        inputs = [{"name": s.name, "localized_name": s.name, "type": s.type, "link": None,
                   **({"shape": 7} if s.optional else {})} for s in sockets]
        values = []
        for s in widgets:
            for slot in s.widget_slots:
                if slot == "upload":
                    inputs.append({"name": "upload", "localized_name": "upload", "type": "IMAGEUPLOAD",
                                   "widget": {"name": "upload"}, "link": None})
                elif slot == s.name:
                    inputs.append({"name": s.name, "localized_name": s.name, "type": s.type,
                                   "widget": {"name": s.name}, "link": None})
                values.append(_widget_value(node, s, slot))
        outputs = [{"name": name, "localized_name": name, "type": kind, "links": []}
                   for name, kind in output_specs(object_info, node.type)]
        counted = 0 if object_info[node.type].get("output_node") else len(outputs)  # see _trim_output_node
        size = node.size or _estimate_size(len(sockets), counted, len(values))
        out = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(size), "flags": {},
               "order": 0, "mode": 0, "inputs": inputs, "outputs": outputs,
               "properties": {"Node name for S&R": node.type}, "widgets_values": values}
        unknown = set(node.widgets) - {s.name for s in widgets} - {f"{s.name}.control_after_generate" for s in widgets}
    if unknown:
        raise ValueError(f"{node.type} node {node.id}: no widget named {sorted(unknown)}")
    if node.title:
        out["title"] = node.title
    for key in ("color", "bgcolor"):
        if getattr(node, key):
            out[key] = getattr(node, key)
    return out


def build_ui(wf: WorkflowSpec, object_info: dict) -> dict:
    """The UI-format (front end) JSON of `wf`."""
    ui_nodes = {node.id: _ui_node(node, object_info) for node in wf.nodes}
    link_rows = []
    for link_id, (src, out_name, dst, in_name) in enumerate(wf.links, start=1):
        src_node, dst_node = ui_nodes[src], ui_nodes[dst]
        out_slot = next((i for i, o in enumerate(src_node["outputs"]) if o["name"] == out_name), None)
        in_slot = next((i for i, x in enumerate(dst_node["inputs"]) if x["name"] == in_name), None)
        if out_slot is None or in_slot is None:
            raise ValueError(f"link {src}.{out_name} -> {dst}.{in_name}: no such output or input")
        if dst_node["inputs"][in_slot]["link"] is not None:
            raise ValueError(f"input {dst}.{in_name} is linked twice")
        kind = src_node["outputs"][out_slot]["type"]
        src_node["outputs"][out_slot]["links"].append(link_id)
        src_node["outputs"][out_slot]["slot_index"] = out_slot
        dst_node["inputs"][in_slot]["link"] = link_id
        link_rows.append([link_id, src, out_slot, dst, in_slot, kind])

    for ui_node in ui_nodes.values():
        if ui_node["type"] not in VIRTUAL_NODES and object_info[ui_node["type"]].get("output_node"):
            _trim_output_node(ui_node)
    _set_execution_order(ui_nodes, link_rows)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-tlora/workflows/{wf.name}")),
        "revision": 0, "last_node_id": max(ui_nodes), "last_link_id": len(link_rows),
        "nodes": [ui_nodes[n.id] for n in wf.nodes], "links": link_rows, "groups": wf.groups,
        "config": {}, "extra": {"ds": _fit_view(list(ui_nodes.values()))}, "version": 0.4,
    }


def _trim_output_node(ui_node: dict):
    """Leave out an output node's trailing outputs that nothing links to, so the file is the same
    whichever host wrote it: ComfyUI 0.33 declares outputs on SaveImage, PreviewImage and PreviewAny
    that 0.3.75 does not, and both front ends give a loaded node the outputs its schema declares."""
    while ui_node["outputs"] and not ui_node["outputs"][-1]["links"]:
        ui_node["outputs"].pop()


def _set_execution_order(ui_nodes: dict, link_rows: list):
    """`order` fields as the front end computes them: a topological order (notes first)."""
    deps = {nid: {row[1] for row in link_rows if row[3] == nid} for nid in ui_nodes}
    done, order = set(), 0
    while len(done) < len(ui_nodes):
        ready = sorted(n for n in ui_nodes if n not in done and deps[n] <= done)
        if not ready:
            raise ValueError("the workflow has a cycle")
        for nid in ready:
            ui_nodes[nid]["order"] = order
            order += 1
            done.add(nid)


def _fit_view(nodes: list, view=(1400.0, 760.0), margin=(70.0, 90.0)) -> dict:
    """A canvas zoom and offset that show every node in a window of about `view` pixels, clear of the
    front end's side bar and top bar (`margin` pixels). The canvas draws (pos + offset) * scale."""
    x0 = min(n["pos"][0] for n in nodes) - 20
    y0 = min(n["pos"][1] for n in nodes) - 50  # titles sit above pos
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes) + 20
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes) + 20
    # Below about 0.6 the canvas draws nodes without text, so a big graph opens at its top-left corner.
    scale = round(max(MIN_VIEW_SCALE, min(1.0, view[0] / (x1 - x0), view[1] / (y1 - y0))), 3)
    return {"scale": scale, "offset": [round(margin[0] / scale - x0, 1), round(margin[1] / scale - y0, 1)]}


def build_api(wf: WorkflowSpec, object_info: dict) -> dict:
    """The API-format JSON of `wf` (what POST /prompt takes)."""
    ui = build_ui(wf, object_info)  # one code path decides the widget values of both formats
    return ui_to_api(ui, object_info)


# ---- reading a workflow back ----------------------------------------------------------------------

def widget_values_by_name(ui_node: dict, object_info: dict) -> dict:
    """{widget name: value} of a UI-format node; control values under '<name>.control_after_generate'.

    Raises when widgets_values does not have exactly one value per widget slot of the node type.
    """
    values = list(ui_node.get("widgets_values") or [])
    if ui_node["type"] in VIRTUAL_NODES:
        return {"text": values[0] if values else ""}
    named, slots = {}, []
    for spec in input_specs(object_info, ui_node["type"]):
        if spec.is_widget:
            slots.extend((spec.name, slot) for slot in spec.widget_slots)
    if len(values) != len(slots):
        raise ValueError(f"{ui_node['type']} node {ui_node['id']}: {len(values)} widgets_values for "
                         f"{len(slots)} widget slots {[s for _, s in slots]}")
    for (name, slot), value in zip(slots, values):
        if slot == name:
            named[name] = value
        elif slot == "control_after_generate":
            named[f"{name}.control_after_generate"] = value
    return named


def display_title(node: dict, object_info: dict) -> str:
    """The title the front end shows: the node's own, else its type's display name, else the type."""
    return node.get("title") or object_info[node["type"]].get("display_name") or node["type"]


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to the API format, as the front end's graphToPrompt does."""
    by_id = {n["id"]: n for n in ui["nodes"]}
    links = {row[0]: row for row in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) != 0:
            continue
        given = {k: v for k, v in widget_values_by_name(node, object_info).items() if "." not in k}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, _, _, _ = links[slot["link"]]
                if by_id[src]["type"] in VIRTUAL_NODES:
                    raise ValueError(f"node {node['id']} input {slot['name']} is fed by a note")
                given[slot["name"]] = [str(src), src_slot]
        # in the node's own input order, so the file reads like the node
        inputs = {s.name: given[s.name] for s in input_specs(object_info, node["type"]) if s.name in given}
        api[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                "_meta": {"title": display_title(node, object_info)}}
    return api


def find_nodes(api: dict, class_type: str | None = None, title: str | None = None) -> list[str]:
    """Ids of the API nodes with that class type and/or title."""
    return [nid for nid, n in api.items()
            if (class_type is None or n["class_type"] == class_type)
            and (title is None or n.get("_meta", {}).get("title") == title)]


def find_node(api: dict, class_type: str | None = None, title: str | None = None) -> str:
    """The one API node with that class type and/or title; raises if there are none or several."""
    ids = find_nodes(api, class_type, title)
    if len(ids) != 1:
        raise KeyError(f"expected one node with class_type={class_type!r} title={title!r}, found {ids}")
    return ids[0]
