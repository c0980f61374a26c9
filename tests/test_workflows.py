"""Every shipped workflow: node types exist, widget values fit the nodes' inputs, links are typed right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_native_nodes import FILE_COMBOS, FRONTEND_ONLY, NATIVE_NODES
from node_harness import REPO, load_pack

WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def node_specs() -> dict[str, dict]:
    specs = dict(NATIVE_NODES)
    for name, cls in load_pack().NODE_CLASS_MAPPINGS.items():
        specs[name] = {"input": cls.INPUT_TYPES(), "output": list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES)),
                       "output_node": getattr(cls, "OUTPUT_NODE", False)}
    return specs


def split_inputs(spec: dict) -> tuple[list, list]:
    """(widgets, sockets) in ComfyUI's order: required, then optional."""
    widgets, sockets = [], []
    for section in ("required", "optional"):
        for name, entry in spec["input"].get(section, {}).items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            target = widgets if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput") \
                else sockets
            target.append((name, kind, options, section == "required"))
    return widgets, sockets


def expected_widget_values(node_type: str, widgets: list, values: list) -> list[str]:
    """Problems found matching ``values`` to the widget inputs (empty = fine)."""
    problems, i = [], 0
    for name, kind, options, _ in widgets:
        if i >= len(values):
            return problems + [f"no value for widget '{name}'"]
        value = values[i]
        i += 1
        if isinstance(kind, list):
            if (node_type, name) in FILE_COMBOS:
                ok = isinstance(value, str) and value != ""
            else:
                ok = value in kind
        elif kind == "INT":
            ok = isinstance(value, int) and not isinstance(value, bool) \
                and options.get("min", -2**64) <= value <= options.get("max", 2**64)
        elif kind == "FLOAT":
            ok = isinstance(value, (int, float)) and options.get("min", -1e30) <= value <= options.get("max", 1e30)
        elif kind == "BOOLEAN":
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            problems.append(f"widget '{name}' ({kind if not isinstance(kind, list) else 'combo'}) got {value!r}")
        if kind == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
            if i >= len(values) or values[i] not in CONTROL_VALUES:
                problems.append(f"'{name}' must be followed by its control_after_generate value")
            i += 1
        if isinstance(kind, list) and options.get("image_upload"):
            i += 1  # the upload button's value
    if i != len(values):
        problems.append(f"{len(values)} widget values for {i} widget slots")
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_matches_the_nodes(path: Path):
    problems = check_workflow(json.loads(path.read_text()), node_specs())
    assert not problems, "\n".join(problems)


def check_workflow(workflow: dict, specs: dict) -> list[str]:
    problems: list[str] = []
    assert workflow.get("version") == 0.4, "UI workflows must be format 0.4"
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]), "node ids must be unique"
    link_ids = [link[0] for link in workflow["links"]]
    assert len(set(link_ids)) == len(link_ids), "link ids must be unique"
    assert workflow["last_node_id"] >= max(nodes) and workflow["last_link_id"] >= max(link_ids)
    has_output = False
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY:
            continue
        if kind not in specs:
            problems.append(f"node {node['id']}: unknown node type {kind}")
            continue
        spec = specs[kind]
        has_output |= bool(spec.get("output_node"))
        widgets, sockets = split_inputs(spec)
        problems += [f"node {node['id']} ({kind}): {p}"
                     for p in expected_widget_values(kind, widgets, node.get("widgets_values", []))]
        socket_types = {name: kind_ for name, kind_, _, _ in sockets}
        widget_types = {name: ("COMBO" if isinstance(kind_, list) else kind_) for name, kind_, _, _ in widgets}
        for entry in node.get("inputs", []):
            if "widget" in entry:  # a widget fed by a link: its value slot stays in widgets_values
                if widget_types.get(entry["widget"]["name"]) != entry["type"]:
                    problems.append(f"node {node['id']} ({kind}): widget input '{entry['name']}' is not a "
                                    f"{entry['type']} widget")
                continue
            if entry["name"] not in socket_types:
                problems.append(f"node {node['id']} ({kind}): input '{entry['name']}' does not exist")
            elif socket_types[entry["name"]] != entry["type"]:
                problems.append(f"node {node['id']} ({kind}): input '{entry['name']}' is "
                                f"{socket_types[entry['name']]}, not {entry['type']}")
        linked = {e["name"] for e in node.get("inputs", []) if e.get("link") is not None}
        for name, _, _, required in sockets:
            if required and name not in linked:
                problems.append(f"node {node['id']} ({kind}): required input '{name}' is not connected")
        outputs = [(o["name"], o["type"]) for o in node.get("outputs", [])]
        if [t for _, t in outputs] != [t for _, t in spec["output"]]:
            problems.append(f"node {node['id']} ({kind}): outputs {outputs} != {spec['output']}")
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        a, b = nodes.get(src), nodes.get(dst)
        if a is None or b is None:
            problems.append(f"link {link_id}: node {src if a is None else dst} does not exist")
            continue
        out, inp = a["outputs"][src_slot], b["inputs"][dst_slot]
        if not (out["type"] == inp["type"] == kind):
            problems.append(f"link {link_id}: {a['type']}.{out['name']} ({out['type']}) -> "
                            f"{b['type']}.{inp['name']} ({inp['type']}) carries {kind}")
        if inp.get("link") != link_id or link_id not in (out.get("links") or []):
            problems.append(f"link {link_id}: the nodes' own link lists disagree")
    if not has_output:
        problems.append("no output node: ComfyUI would refuse to queue it")
    return problems


def test_every_workflow_has_a_thumbnail_and_the_required_set_exists():
    names = {p.stem for p in WORKFLOWS}
    assert {"01 Edit an image", "02 Text to image with KSampler", "03 Edit a region", "04 Edit with a Lightning LoRA",
            "05 Task tags and routing map", "11 Diffusers folder - edit an image",
            "12 Diffusers folder - text to image", "13 Diffusers folder - edit a region",
            "14 Diffusers folder - latent into VAE Decode", "15 Diffusers folder - task intent"} <= names
    for path in WORKFLOWS:
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no thumbnail"
    assert not (REPO / "workflows").exists(), "ComfyUI asks to rename workflows/: templates live in example_workflows/"


def test_the_native_workflows_use_the_native_model_and_comfyuis_nodes():
    def types(stem):
        return {n["type"] for n in json.loads((REPO / "example_workflows" / f"{stem}.json").read_text())["nodes"]}

    edit = types("01 Edit an image")
    assert {"CLIPLoader", "VAELoader", "TagMoELoadDiffusionModel", "CLIPTextEncode", "TagMoEEditConditioning",
            "SamplerCustomAdvanced", "TagMoEScheduler", "TagMoECFGGuider", "TagMoENoise", "VAEDecode"} <= edit
    assert {"KSampler", "TagMoECFG"} <= types("02 Text to image with KSampler")
    assert "TagMoELoraLoader" in types("04 Edit with a Lightning LoRA")
    assert not any(t.startswith(("TagMoEModelLoader", "TagMoESampler")) for t in edit | types("03 Edit a region"))


TITLE = 30  # px of a node's title bar above its pos


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_no_node_covers_another(path: Path):
    nodes = json.loads(path.read_text())["nodes"]
    boxes = [(n["pos"][0], n["pos"][1] - TITLE, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1], n)
             for n in nodes]
    overlaps = [f"{a[4]['type']} #{a[4]['id']} and {b[4]['type']} #{b[4]['id']}"
                for i, a in enumerate(boxes) for b in boxes[i + 1:]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]
    assert not overlaps, overlaps


def test_the_checker_catches_mistakes():
    workflow = json.loads((REPO / "example_workflows" / "11 Diffusers folder - edit an image.json").read_text())
    specs = node_specs()
    sampler = next(n for n in workflow["nodes"] if n["type"] == "TagMoESampler")
    sampler["widgets_values"][2] = 999  # steps above the maximum
    link = workflow["links"][0]
    link[5] = "IMAGE"
    problems = check_workflow(workflow, specs)
    assert any("widget 'steps'" in p for p in problems) and any("carries IMAGE" in p for p in problems)
