"""Turn a UI-format workflow (what the editor saves, format 0.4) into the API format that
ComfyUI's ``/prompt`` accepts, using a server's ``/object_info`` to name the widget values."""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def _inputs_in_order(info: dict):
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            yield name, info["input"][section][name]


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode") in (2, 4):  # notes, muted, bypassed
            continue
        info = object_info[node["type"]]
        values = list(node.get("widgets_values") or [])
        inputs: dict = {}
        i = 0
        for name, entry in _inputs_in_order(info):
            kind = entry[0]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or options.get("forceInput"):
                continue
            if i < len(values):
                inputs[name] = values[i]
            i += 1
            if kind == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
                i += 1
            if options.get("image_upload"):
                i += 1
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                _, origin, slot, *_ = links[entry["link"]]
                inputs[entry["name"]] = [str(origin), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def run_offline(workflow: dict, classes: dict, object_info: dict) -> tuple[dict, dict]:
    """Run a UI workflow without ComfyUI: the pack's nodes through ``node_harness.run_node`` in
    dependency order; PreviewImage / SaveImage only collect their images. Returns (every node's
    result tuple, {node id: the IMAGE batch a preview or save node got})."""
    from node_harness import run_node

    prompt = ui_to_api(workflow, object_info)
    results: dict[str, tuple] = {}
    shown: dict[str, object] = {}

    def run(node_id: str) -> None:
        if node_id in results:
            return
        node = prompt[node_id]
        for value in node["inputs"].values():
            if isinstance(value, list):
                run(value[0])
        inputs = {k: results[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        if node["class_type"] in ("PreviewImage", "SaveImage"):
            shown[node_id] = inputs["images"]
            results[node_id] = ()
        else:
            results[node_id] = run_node(classes[node["class_type"]], **inputs)[0]

    for node_id in prompt:
        run(node_id)
    return results, shown
