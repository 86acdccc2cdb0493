"""Convert a UI-format ComfyUI workflow (the JSON the frontend saves, version 0.4) to the API format that
POST /prompt takes, and check a UI workflow against the live node schemas (GET /object_info).

The UI format stores widget values **by position** (`widgets_values`), in the order the frontend creates
widgets: the node's required inputs, then its optional inputs (`input_order` in /object_info), one widget
per INT / FLOAT / STRING / BOOLEAN / COMBO input that is not `forceInput`, plus frontend-only values:

* an INT or COMBO input with `control_after_generate` (and, as the frontend does for old nodes, any INT
  named `seed` / `noise_seed` without the option) is followed by its "control after generate" value
  ("randomize", "fixed", ...); a COMBO's control also adds a filter-list widget that is not serialised,
  which leaves a `null` hole in the saved array;
* a COMBO with `image_upload` / `video_upload` / `animated_image_upload` / `audio_upload` gets an
  upload-button widget that the frontend appends after the required inputs.

Like the frontend's graphToPrompt: Note / MarkdownNote / Reroute / PrimitiveNode are virtual (a Reroute is
followed to its source, a PrimitiveNode's value becomes the widget value it feeds), muted nodes (mode 2)
are left out together with the links from them, and a bypassed node (mode 4) is replaced by a
pass-through: a consumer of its output k gets the upstream link of its input k when that input has the
output's type, otherwise of its first input of that type.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODE_ALWAYS = 0
MODE_NEVER = 2  # "muted"
MODE_BYPASS = 4
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload")


class WorkflowError(ValueError):
    """The workflow cannot be converted (unknown node, broken link, widget mismatch...)."""


@dataclass(frozen=True)
class WidgetSlot:
    """One position in `widgets_values`: the input it feeds (None for frontend-only values)."""
    input_name: str | None
    what: str  # "value", "control_after_generate", "control_filter_list", "upload"


def load_workflow(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


def is_api_format(workflow: dict) -> bool:
    """API graphs are {id: {"class_type": ..., "inputs": ...}}; UI workflows have a `nodes` list."""
    return "nodes" not in workflow and all(isinstance(v, dict) and "class_type" in v for v in workflow.values())


# ----------------------------------------------------------------------------------- schema helpers

def _input_spec(schema: dict, name: str) -> tuple[Any, dict] | None:
    for section in ("required", "optional"):
        spec = schema.get("input", {}).get(section, {}).get(name)
        if spec is not None:
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return kind, options
    return None


def _ordered_inputs(schema: dict, section: str) -> list[str]:
    order = schema.get("input_order", {}).get(section)
    if order is not None:
        return list(order)
    return list(schema.get("input", {}).get(section, {}).keys())


def _is_combo(kind: Any) -> bool:
    return isinstance(kind, list) or kind == "COMBO"


def is_widget_input(kind: Any, options: dict) -> bool:
    """Whether the frontend makes a widget (a positional widgets_values entry) for this input."""
    if options.get("forceInput"):
        return False
    return _is_combo(kind) or kind in WIDGET_TYPES


def widget_layout(schema: dict) -> list[WidgetSlot]:
    """The positions of `widgets_values` for a node with this /object_info schema, in frontend order."""
    slots: list[WidgetSlot] = []
    uploads: list[WidgetSlot] = []
    for section in ("required", "optional"):
        for name in _ordered_inputs(schema, section):
            spec = _input_spec(schema, name)
            if spec is None or not is_widget_input(*spec):
                continue
            kind, options = spec
            slots.append(WidgetSlot(name, "value"))
            if kind == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
                slots.append(WidgetSlot(None, "control_after_generate"))
            elif _is_combo(kind) and options.get("control_after_generate"):
                slots.append(WidgetSlot(None, "control_after_generate"))
                slots.append(WidgetSlot(None, "control_filter_list"))
            if _is_combo(kind) and section == "required" and any(options.get(o) for o in UPLOAD_OPTIONS):
                uploads.append(WidgetSlot(None, "upload"))
        if section == "required":
            slots.extend(uploads)  # the upload button is appended to the required inputs
    return slots


def _widget_values(node: dict, layout: list[WidgetSlot]) -> dict[str, Any]:
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):  # some nodes save widgets by name
        return {slot.input_name: values[slot.input_name] for slot in layout
                if slot.input_name and slot.input_name in values}
    if len(values) != len(layout):
        expected = [slot.input_name or slot.what for slot in layout]
        raise WorkflowError(
            f"node {node.get('id')} ({node.get('type')}): {len(values)} widget values {values!r} but the node "
            f"has {len(layout)} widgets {expected}; the workflow was saved with another version of the node.")
    return {slot.input_name: value for slot, value in zip(layout, values) if slot.input_name}


# ------------------------------------------------------------------------------------- graph helpers

class _Graph:
    def __init__(self, workflow: dict):
        if "nodes" not in workflow:
            raise WorkflowError("not a UI-format workflow: no `nodes` list (API-format graphs need no conversion).")
        if workflow.get("definitions", {}).get("subgraphs"):
            raise WorkflowError("workflows with subgraphs are not supported by this converter; "
                                "unpack the subgraph in the editor and save again.")
        self.nodes = {int(n["id"]): n for n in workflow["nodes"]}
        self.links: dict[int, tuple[int, int, int, int, str]] = {}
        for link in workflow.get("links", []):
            if isinstance(link, dict):  # schema 1.0 style
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                        link["target_slot"], link.get("type", "*")]
            link_id, src, src_slot, dst, dst_slot, kind = link[:6]
            self.links[int(link_id)] = (int(src), int(src_slot), int(dst), int(dst_slot), kind)

    def input_link(self, node: dict, input_index: int) -> tuple[int, int, int, int, str] | None:
        inputs = node.get("inputs") or []
        if input_index >= len(inputs):
            return None
        link_id = inputs[input_index].get("link")
        if link_id is None:
            return None
        if int(link_id) not in self.links:
            raise WorkflowError(f"node {node['id']} ({node['type']}) input {inputs[input_index].get('name')!r} "
                                f"refers to link {link_id}, which is not in the workflow's links list.")
        return self.links[int(link_id)]

    def resolve_source(self, node_id: int, slot: int, wanted_type: str, depth: int = 0) -> tuple[str, Any] | None:
        """Follow a link source through reroutes and bypassed nodes. Returns ("link", [id, slot]),
        ("value", literal) for a PrimitiveNode, or None when the source is muted / unconnected."""
        if depth > 100:
            raise WorkflowError(f"link cycle through node {node_id}")
        node = self.nodes.get(node_id)
        if node is None:
            raise WorkflowError(f"a link starts at node {node_id}, which is not in the workflow.")
        mode = node.get("mode", MODE_ALWAYS)
        if node["type"] == "Reroute":
            link = self.input_link(node, 0)
            return None if link is None else self.resolve_source(link[0], link[1], wanted_type, depth + 1)
        if node["type"] == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if node["type"] in VIRTUAL_NODES:
            return None
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            index = self._bypass_input(node, slot, wanted_type)
            if index is None:
                return None
            link = self.input_link(node, index)
            return None if link is None else self.resolve_source(link[0], link[1], wanted_type, depth + 1)
        return ("link", [str(node_id), slot])

    @staticmethod
    def _bypass_input(node: dict, slot: int, wanted_type: str) -> int | None:
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type", wanted_type) if slot < len(outputs) else wanted_type
        if slot < len(inputs) and _types_match(inputs[slot].get("type", "*"), out_type):
            return slot
        for index, entry in enumerate(inputs):
            if _types_match(entry.get("type", "*"), out_type):
                return index
        return None


def _type_set(kind: Any) -> set[str]:
    if isinstance(kind, list):
        return {"COMBO"}
    return {part.strip() for part in str(kind).split(",")}


def _types_match(a: Any, b: Any) -> bool:
    sa, sb = _type_set(a), _type_set(b)
    return "*" in sa or "*" in sb or bool(sa & sb)


# ------------------------------------------------------------------------------------------ convert

def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format graph the frontend would queue for this UI workflow. Raises WorkflowError."""
    if is_api_format(workflow):
        return json.loads(json.dumps(workflow))
    graph = _Graph(workflow)
    api: dict[str, dict] = {}
    for node_id, node in sorted(graph.nodes.items()):
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        schema = object_info.get(kind)
        if schema is None:
            raise WorkflowError(f"node {node_id}: type {kind!r} is not installed on this server "
                                f"(not in /object_info); install the pack that provides it.")
        inputs: dict[str, Any] = dict(_widget_values(node, widget_layout(schema)))
        for index, entry in enumerate(node.get("inputs") or []):
            link = graph.input_link(node, index)
            name = entry.get("name")
            if link is None:
                continue
            source = graph.resolve_source(link[0], link[1], entry.get("type", "*"))
            if source is None:
                # A muted or unconnected source: the input is dropped (a widget keeps its own value).
                if _input_spec(schema, name) is None or not is_widget_input(*_input_spec(schema, name)):
                    inputs.pop(name, None)
                continue
            inputs[name] = source[1]
        api[str(node_id)] = {"inputs": inputs, "class_type": kind,
                             "_meta": {"title": node.get("title") or schema.get("display_name") or kind}}
    return api


def output_node_ids(api_graph: dict, object_info: dict) -> list[str]:
    return [nid for nid, n in api_graph.items() if object_info.get(n["class_type"], {}).get("output_node")]


# ----------------------------------------------------------------------------------------- validate

def validate_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Problems that would stop this UI workflow from loading or running, one readable line each
    (empty list = fine): unknown node types, unknown input names, link type mismatches, widget-count
    mismatches, combo values that are not offered, required inputs left unconnected, no output node."""
    if is_api_format(workflow):
        return _validate_api(workflow, object_info)
    problems: list[str] = []
    try:
        graph = _Graph(workflow)
    except WorkflowError as err:
        return [str(err)]
    active_outputs = 0
    for node_id, node in sorted(graph.nodes.items()):
        kind = node.get("type")
        where = f"node {node_id} ({kind})"
        if kind in VIRTUAL_NODES:
            continue
        schema = object_info.get(kind)
        if schema is None:
            problems.append(f"{where}: node type {kind!r} is not installed (missing from /object_info).")
            continue
        muted = node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS)
        if schema.get("output_node") and not muted:
            active_outputs += 1
        layout = widget_layout(schema)
        try:
            values = _widget_values(node, layout)
        except WorkflowError as err:
            problems.append(str(err))
            values = {}
        linked: set[str] = set()
        for index, entry in enumerate(node.get("inputs") or []):
            name = entry.get("name")
            spec = _input_spec(schema, name)
            if spec is None:
                problems.append(f"{where}: input {name!r} does not exist on the node "
                                f"(inputs: {sorted(_all_inputs(schema))}).")
                continue
            try:
                link = graph.input_link(node, index)
            except WorkflowError as err:
                problems.append(str(err))
                continue
            if link is None:
                continue
            linked.add(name)
            src, src_slot, dst, dst_slot, link_type = link
            if dst != node_id or dst_slot != index:
                problems.append(f"{where}: link for input {name!r} says it ends at node {dst} slot {dst_slot}.")
            if not _types_match(link_type, spec[0]):
                problems.append(f"{where}: input {name!r} expects {_show(spec[0])} but its link carries {link_type}.")
            source = graph.nodes.get(src)
            if source is None:
                problems.append(f"{where}: input {name!r} is linked from node {src}, which does not exist.")
                continue
            source_schema = object_info.get(source.get("type"))
            if source_schema is not None:
                outputs = source_schema.get("output", [])
                if src_slot >= len(outputs):
                    problems.append(f"{where}: input {name!r} is linked from output {src_slot} of node {src} "
                                    f"({source['type']}), which has only {len(outputs)} outputs.")
                elif not _types_match(outputs[src_slot], spec[0]):
                    problems.append(f"{where}: input {name!r} expects {_show(spec[0])} but node {src} "
                                    f"({source['type']}) output {src_slot} is {_show(outputs[src_slot])}.")
        for name in _ordered_inputs(schema, "required"):
            spec = _input_spec(schema, name)
            if name not in linked and name not in values and not muted:
                problems.append(f"{where}: required input {name!r} ({_show(spec[0])}) is not connected.")
        for name, value in values.items():
            if name in linked:
                continue
            kind_, options = _input_spec(schema, name)
            choices = kind_ if isinstance(kind_, list) else options.get("options") if kind_ == "COMBO" else None
            if choices is not None and value not in choices and not muted:
                problems.append(f"{where}: {name} = {value!r} is not one of the offered values "
                                f"{choices[:10]}{'...' if len(choices) > 10 else ''}.")
    if active_outputs == 0:
        problems.append("the workflow has no active output node (SaveImage, PreviewImage, ...): "
                        "ComfyUI would reject it with prompt_no_outputs.")
    return problems


def _validate_api(graph: dict, object_info: dict) -> list[str]:
    problems = []
    for node_id, node in graph.items():
        schema = object_info.get(node["class_type"])
        if schema is None:
            problems.append(f"node {node_id}: node type {node['class_type']!r} is not installed.")
            continue
        for name in node.get("inputs", {}):
            if _input_spec(schema, name) is None:
                problems.append(f"node {node_id} ({node['class_type']}): input {name!r} does not exist.")
    return problems


def _all_inputs(schema: dict) -> set[str]:
    return set(schema.get("input", {}).get("required", {})) | set(schema.get("input", {}).get("optional", {}))


def _show(kind: Any) -> str:
    return "COMBO" if isinstance(kind, list) else str(kind)
