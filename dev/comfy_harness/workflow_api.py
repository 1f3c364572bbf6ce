"""UI-format workflows (what the front end saves) -> API-format prompts (what POST /prompt takes).

Plain helper module, used by tests/comfyui/test_workflows.py, tests/comfyui/test_browser.py,
dev/scripts/build_workflows.py and dev/scripts/demo.py. It does what the front end's
graphToPrompt does for the graphs in example_workflows/:

- a node's `widgets_values` are matched to its widget inputs in the order of
  /object_info's `input_order` (required, then optional); an input with
  `control_after_generate` (seeds) is followed by one more value, the
  control's ("fixed", "randomize", ...), which is not an input; values after
  the last widget (LoadImage's upload button) are not inputs either;
- a linked input (socket or widget) becomes `[origin node id, output slot]`;
- muted nodes (mode 2) are left out, bypassed ones (mode 4) pass their input of
  the same type through; front-end-only nodes (Note, MarkdownNote, Reroute) are
  not sent, a Reroute's link is followed to its source.

The end-to-end tests write their API-format graphs by hand; `loader_node` is the
VILA-U Model Loader node they all start from.
"""

from __future__ import annotations

from typing import Any

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class WorkflowError(ValueError):
    pass


def input_specs(info: dict) -> dict[str, list]:
    """{input name: [type, options]} of a node's /object_info entry, required then optional, in input order."""
    specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = info.get("input_order") or {}
    names = [*order.get("required", []), *order.get("optional", [])] or list(specs)
    return {name: specs[name] for name in names if name in specs}


def spec_type(spec: list) -> str:
    """'COMBO' for combos (V1 lists its options as the type, V3 says 'COMBO'), else the type name."""
    return "COMBO" if isinstance(spec[0], list) else str(spec[0])


def spec_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_values(spec: list) -> list:
    return list(spec[0]) if isinstance(spec[0], list) else list(spec_options(spec).get("options", []))


def is_widget(spec: list) -> bool:
    return spec_type(spec) in WIDGET_TYPES and not spec_options(spec).get("forceInput")


def widget_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """[(name, spec, has a control_after_generate value after it)] in widgets_values order."""
    return [
        (name, spec, bool(spec_options(spec).get("control_after_generate")))
        for name, spec in input_specs(info).items()
        if is_widget(spec)
    ]


def widget_values(node: dict, info: dict) -> dict[str, Any]:
    """{widget input name: value} from a UI node's widgets_values."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some front ends save {name: value}
        return {name: values[name] for name, _, _ in widget_inputs(info) if name in values}
    out: dict[str, Any] = {}
    i = 0
    for name, _, has_control in widget_inputs(info):
        if i >= len(values):
            raise WorkflowError(
                f"node {node['id']} ({node['type']}) has {len(values)} widget values; its widget inputs "
                f"{[n for n, _, _ in widget_inputs(info)]} need more (was the template saved from older node versions?)"
            )
        out[name] = values[i]
        i += 2 if has_control else 1
    return out


def control_values(node: dict, info: dict) -> dict[str, Any]:
    """{widget name: its control_after_generate value} ('fixed', 'randomize', ...)."""
    values = node.get("widgets_values") or []
    out, i = {}, 0
    if isinstance(values, dict):
        return out
    for name, _, has_control in widget_inputs(info):
        if has_control:
            out[name] = values[i + 1] if i + 1 < len(values) else None
        i += 2 if has_control else 1
    return out


class Graph:
    """Nodes and links of a UI-format workflow, by id."""

    def __init__(self, workflow: dict):
        self.workflow = workflow
        self.nodes = {int(n["id"]): n for n in workflow["nodes"]}
        self.links = {}
        for link in workflow.get("links", []):
            if isinstance(link, dict):  # schema 1 saves links as objects
                link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                        link["type"]]
            self.links[int(link[0])] = link

    def source(self, link_id: int | None) -> tuple[int, int] | None:
        """(origin node id, output slot) feeding a link, through Reroutes and bypassed nodes; None if it comes
        from a muted node."""
        seen = 0
        while link_id is not None:
            seen += 1
            if seen > 1000:
                raise WorkflowError("link cycle through reroutes/bypassed nodes")
            _, origin, slot, _, _, link_type = self.links[int(link_id)]
            node = self.nodes[int(origin)]
            mode = node.get("mode", MODE_ALWAYS)
            if node["type"] == "Reroute":
                link_id = node["inputs"][0].get("link")
            elif mode == MODE_BYPASS:
                # as the front end: a bypassed node passes on its first linked input of the output's type
                link_id = next((i.get("link") for i in node.get("inputs", [])
                                if i.get("link") is not None and i.get("type") == link_type), None)
                if link_id is None:
                    return None
            elif mode == MODE_NEVER:
                return None
            else:
                return int(origin), int(slot)
        return None


def to_api(workflow: dict, object_info: dict, overrides: dict[int, dict[str, Any]] | None = None,
           muted: set[int] | frozenset[int] = frozenset()) -> dict[str, dict]:
    """The API-format prompt of a UI-format workflow. `overrides` {node id: {input: value}} replace widget
    values (e.g. the model name); `muted` node ids are treated as mode 2."""
    overrides = overrides or {}
    graph = Graph(workflow)
    for node_id in muted:
        graph.nodes[int(node_id)] = {**graph.nodes[int(node_id)], "mode": MODE_NEVER}
    prompt: dict[str, dict] = {}
    for node_id, node in sorted(graph.nodes.items()):
        if node["type"] in VIRTUAL_NODES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowError(f"node {node_id}: ComfyUI has no node type {node['type']!r} (missing custom nodes?)")
        specs = input_specs(info)
        inputs: dict[str, Any] = widget_values(node, info)
        for slot in node.get("inputs", []):
            name = slot.get("name")
            if name not in specs:
                continue
            source = graph.source(slot.get("link")) if slot.get("link") is not None else None
            if source is not None:
                inputs[name] = [str(source[0]), source[1]]
            elif slot.get("link") is not None:
                inputs.pop(name, None)  # fed by a muted node: the input is missing, as in the front end
        inputs.update(overrides.get(node_id, {}))
        entry = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node_id)] = entry
    return prompt


def nodes_of_type(workflow: dict, *types: str) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] in types]


def model_node_ids(workflow: dict) -> list[int]:
    """The nodes of a template that need model files this test ComfyUI does not have (an SD checkpoint, a
    ControlNet, an upscale model; listed by dev/scripts/build_workflows.py in extra.vila_u.needs_model_files):
    tests mute them."""
    return list(((workflow.get("extra") or {}).get("vila_u") or {}).get("needs_model_files", []))


def model_overrides(workflow: dict, model: str, **extra_by_type: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """{node id: {...}} that swaps `model` into every VILA-U loader, plus per-type widget overrides
    (e.g. VILAU_ImageQA={"max_new_tokens": 16})."""
    out: dict[int, dict[str, Any]] = {}
    for n in workflow["nodes"]:
        values = {}
        if n["type"] == "VILAU_ModelLoader":
            values["model"] = model
        values.update(extra_by_type.get(n["type"], {}))
        if values:
            out[int(n["id"])] = values
    return out


def loader_node(
    model: str, *, dtype: str = "auto", device: str = "auto", download_if_missing: bool = False,
    quantize: str = "none", keep_loaded: bool = True, compile: str | None = None,
) -> dict:
    """An API-format VILA-U Model Loader node (a value of the graph POST /prompt takes) for `model`;
    it never downloads unless asked. `compile` None leaves that optional input out (its default, auto)."""
    inputs = {"model": model, "dtype": dtype, "device": device, "download_if_missing": download_if_missing,
              "quantize": quantize, "keep_loaded": keep_loaded}
    if compile is not None:
        inputs["compile"] = compile
    return {"class_type": "VILAU_ModelLoader", "inputs": inputs}


# ---- example inputs the templates name --------------------------------------------------


CAPTION_FOLDER = "vila-u-caption-example"  # under the input folder: the pack installs it when it loads
