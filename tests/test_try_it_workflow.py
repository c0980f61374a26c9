""""00 Try it": the shipped tiny model picked by name in the TAG-MoE Model Loader, run as the workflow
file wires it (without ComfyUI: the pack's nodes in dependency order), draws a picture and edits it
as asked, and the two edits route to different experts. The same workflow inside a real ComfyUI:
tests/test_comfyui_integration.py."""

from __future__ import annotations

import json

import pytest
from node_harness import PACK_ERROR, load_pack, run_node
from test_workflows import node_specs
from try_it import TRY_IT, judge, try_it_prompts
from workflow_api import run_offline

pack = load_pack()
bridge = pack.nodes.comfy_bridge


@pytest.fixture(scope="module")
def ran():
    workflow = json.loads(TRY_IT.read_text())
    info = {name: {"input": spec["input"]} for name, spec in node_specs().items()}
    return ui_to_nodes(workflow), *run_offline(workflow, pack.NODE_CLASS_MAPPINGS, info)


def ui_to_nodes(workflow: dict) -> dict[str, dict]:
    return {str(n["id"]): n for n in workflow["nodes"]}


def _pictures(nodes, shown) -> dict[str, object]:
    """Each preview/save node's picture by what it shows: 'drawn', or the save prefix."""
    out = {}
    for node_id, batch in shown.items():
        node = nodes[node_id]
        if node["type"] == "SaveImage":
            key = node["widgets_values"][0]
        elif node.get("title") == "The drawn picture":
            key = "drawn"
        else:
            continue
        out[key] = pack.nodes.conversions.image_batch_to_pil(batch)[0]
    return out


def test_the_loader_offers_the_shipped_model_and_resolves_it():
    from tagmoe_core.tiny import trained_tiny_bundle

    spec = pack.NODE_CLASS_MAPPINGS["TagMoEModelLoader"].INPUT_TYPES()["required"]
    assert bridge.EMBEDDED_MODEL in spec["base_model"][0] and bridge.EMBEDDED_MODEL in spec["tagmoe_weights"][0]
    bundle = trained_tiny_bundle()
    assert bridge.resolve_model("diffusers", bridge.EMBEDDED_MODEL) == bundle.base
    assert bridge.resolve_model("tagmoe", bridge.EMBEDDED_MODEL) == bundle.tagmoe
    assert bridge.weights_missing(bridge.EMBEDDED_MODEL) is True


def test_half_the_embedded_model_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(bridge, "_fallback_roots", {})
    bridge.configure(tmp_path)
    (tmp_path / "tagmoe").mkdir()
    (tmp_path / "tagmoe" / "other.safetensors").write_bytes(b"")
    loader = pack.NODE_CLASS_MAPPINGS["TagMoEModelLoader"]
    with pytest.raises(PACK_ERROR, match="pick it for both"):
        run_node(loader, base_model=bridge.EMBEDDED_MODEL, tagmoe_weights="other.safetensors")


def test_the_workflow_draws_and_edits_as_asked(ran):
    nodes, results, shown = ran
    pictures = _pictures(nodes, shown)
    prompts = try_it_prompts()
    saves = [n["widgets_values"][0] for n in nodes.values() if n["type"] == "SaveImage"]
    assert set(pictures) == {"drawn", *saves} and len(saves) == len(prompts) - 1
    verdicts = judge(prompts, pictures["drawn"], [pictures[prefix] for prefix in saves])
    print("\n".join(v.summary() for v in verdicts))
    assert len(verdicts) == len(prompts) and all(v.ok for v in verdicts), [v.summary() for v in verdicts]


def test_the_two_edits_route_to_different_experts(ran):
    """The local edit and the global style change (TAG-MoE's point: experts by task) send most of their
    tokens to different experts, and what the router head reads from each routing is that task's tags
    (the task set's: remove and grayscale), ranked above every other tag."""
    from tagmoe_core.intent.routing import analyse
    from tagmoe_core.training.synthetic import TASK_TAGS

    nodes, results, shown = ran
    loader = next(i for i, n in nodes.items() if n["type"] == "TagMoEModelLoader")
    transformer = results[loader][0].require().transformer
    maps = [i for i, n in nodes.items() if n["type"] == "TagMoERoutingMap"]
    samplers = [i for i, n in nodes.items() if n["type"] == "TagMoESampler" and n["widgets_values"][9]]
    assert len(maps) == len(samplers) == 2
    for i in maps:  # the node drew its maps and wrote its report
        assert results[i][0].shape[0] == 1 and "top-1 share of target tokens" in results[i][1]
    analyses = [analyse(results[i][2], transformer) for i in samplers]
    shares = [a.expert_share for a in analyses]
    print("\n".join(f"{task}: shares {[round(float(v), 3) for v in share]}, reads {a.ranking[:5]}"
                    for task, share, a in zip(("remove", "grayscale"), shares, analyses)))
    assert int(shares[0].argmax()) != int(shares[1].argmax()), shares
    for task, a in zip(("remove", "grayscale"), analyses):
        expected = set(TASK_TAGS[task].names)
        assert {name for name, _ in a.ranking[:len(expected)]} == expected, (task, a.ranking[:6])
