"""Workflows as the front end handles them: a UI-format file (what the editor saves and the template
browser loads) becomes the API-format prompt ``POST /prompt`` takes, and the helpers the workflow
tests use to find and check nodes in such a prompt."""
from __future__ import annotations

_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
_FRONTEND_ONLY = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
_MUTED, _BYPASSED = 2, 4


def _options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec) -> bool:
    opts = _options(spec)
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(spec[0], list) or spec[0] in _WIDGET_TYPES


def _has_control_widget(name: str, spec) -> bool:
    """Whether the frontend adds a "control after generate" widget (fixed/increment/randomize)
    after this one, whose value then sits in widgets_values too (frontend rule: INT inputs named
    seed/noise_seed get one unless the input says otherwise; others only when asked)."""
    cag = _options(spec).get("control_after_generate")
    if spec[0] == "INT" and cag is None:
        return name in ("seed", "noise_seed")
    return bool(cag)


def _linked_inputs(node: dict, links: dict) -> dict:
    out = {}
    for inp in node.get("inputs", []):
        if inp.get("link") is not None:
            _, src, slot, *_ = links[inp["link"]]
            out[inp["name"]] = [str(src), slot]
    return out


def _node_inputs(node: dict, info: dict, links: dict) -> dict:
    """One node's API inputs: every widget takes the next ``widgets_values`` entry in the node's
    input order (plus one for a control-after-generate widget); a linked input takes the link."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    linked = _linked_inputs(node, links)
    values = list(node.get("widgets_values") or [])
    where = f"node {node['id']} ({node['type']})"
    inputs, i = {}, 0
    for name in [*order.get("required", []), *order.get("optional", [])]:
        if _is_widget(specs[name]):
            if i >= len(values):
                raise ValueError(f"{where}: no widgets_values entry for {name!r}")
            inputs[name] = values[i]
            i += 1 + _has_control_widget(name, specs[name])
        if name in linked:
            inputs[name] = linked[name]
    if i > len(values) or any(v is not None for v in values[i:]):  # the frontend's own widgets
        raise ValueError(f"{where}: {len(values)} widgets_values for {i} widget slots")
    return inputs


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt for a UI-format workflow, converted the way the frontend does it (see
    :func:`_node_inputs`).  Frontend-only nodes (notes) and muted/bypassed nodes are left out.
    Every ``widgets_values`` entry must be used up, except trailing nulls (widgets the frontend
    adds itself, e.g. PreviewAny's preview)."""
    links = {l[0]: l for l in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind not in object_info:
            if kind in _FRONTEND_ONLY:
                continue
            raise KeyError(f"node {node['id']}: type {kind!r} is not known to the server")
        if node.get("mode", 0) in (_MUTED, _BYPASSED):
            continue
        prompt[str(node["id"])] = {"class_type": kind, "inputs": _node_inputs(node, object_info[kind], links)}
    return prompt


def find_node(prompt: dict, class_type: str, where=lambda node: True) -> str:
    """The id of the one node of ``class_type`` (that ``where`` accepts) in an API prompt."""
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type and where(v)]
    assert len(ids) == 1, f"expected one {class_type} in the workflow, found {ids}"
    return ids[0]


def _check_value(kind, spec, name: str, value, where: str) -> None:
    if isinstance(kind, list) or kind == "COMBO":
        options = kind if isinstance(kind, list) else _options(spec).get("options", [])
        files = name.endswith("_name")  # model files: the tests pick the tiny ones
        assert isinstance(value, str) and (files or value in options), where
    elif kind in ("INT", "FLOAT"):
        allowed = int if kind == "INT" else (int, float)
        assert isinstance(value, allowed) and not isinstance(value, bool), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where


def check_widget_types(prompt: dict, object_info: dict) -> None:
    """Every widget value is of its input's type (a misplaced widgets_values entry shows up here
    even where /prompt would silently convert it); combos other than file lists hold an option."""
    for nid, node in prompt.items():
        info = object_info[node["class_type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link
                continue
            where = f"node {nid} ({node['class_type']}) input {name!r} = {value!r}"
            _check_value(specs[name][0], specs[name], name, value, where)


def add_trigger_probes(prompt: dict, replace: str, positive: str, clip: list) -> tuple[str, str]:
    """Probe whether a trained word changes the conditioning: ``LikenessTestCondProbe`` nodes
    (tests/support/server_nodes.py) on the ``positive`` CLIPTextEncode and on the same prompt
    encoded by ``clip`` without the word that the StringReplace node ``replace`` splices in.
    Adds nodes "900" to "902"; returns the ids of the two probes (with word, without)."""
    r = prompt[replace]["inputs"]
    plain = r["string"].replace(r["find"], "").replace("  ", " ")
    prompt["900"] = {"class_type": "LikenessTestCondProbe", "inputs": {"conditioning": [positive, 0]}}
    prompt["901"] = {"class_type": "CLIPTextEncode", "inputs": {"text": plain, "clip": clip}}
    prompt["902"] = {"class_type": "LikenessTestCondProbe", "inputs": {"conditioning": ["901", 0]}}
    return "900", "902"
