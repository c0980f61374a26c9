""""00 Try it": the shipped tiny model picked by name in the TAG-MoE Model Loader, run as the workflow
file wires it (without ComfyUI: the pack's nodes in dependency order), draws a picture and edits it
as asked, and the two edits route to different experts. The same workflow inside a real ComfyUI:
tests/test_comfyui_integration.py.

Measured on the CPU (fp32, as the workflow loads it; the model shipped at fce1b76): the drawing passes
with its shape's fill at 0.789 and its centre 0.04 off the middle, the removal with the rest at 52.5 dB,
the black-and-white at 37.7 dB (bound 25); the removal sends 76% of its tokens' top-1 to expert 1
(shares 0.24 / 0.76 / 0.00 / 0.00), the black-and-white splits them between experts 2 and 3 (0.00 / 0.00 /
0.50 / 0.50): 1.00 apart."""

from __future__ import annotations

import importlib

import pytest
from node_harness import PACK_ERROR, load_pack, run_node
from test_workflows import node_specs
from try_it import TryIt, read_instruction
from workflow_api import run_offline

pack = load_pack()
bridge = pack.nodes.comfy_bridge
# The two edits' top-1 shares per expert are this far apart at least (total-variation distance: 0 for the
# same use of the experts, 1 for disjoint ones; the shipped model: 1.00).
ROUTING_APART = 0.5


@pytest.fixture(scope="module")
def ran():
    graph = TryIt()
    info = {name: {"input": spec["input"]} for name, spec in node_specs().items()}
    results, shown = run_offline(graph.workflow, pack.NODE_CLASS_MAPPINGS, info)
    return graph, results, shown


def test_the_loader_offers_the_shipped_model_and_resolves_it():
    from tagmoe_core.tiny import trained_tiny_bundle

    spec = pack.NODE_CLASS_MAPPINGS["TagMoEModelLoader"].INPUT_TYPES()["required"]
    assert spec["base_model"][0][-1] == spec["tagmoe_weights"][0][-1] == bridge.EMBEDDED_MODEL
    bundle = trained_tiny_bundle()
    assert bridge.resolve_model("diffusers", bridge.EMBEDDED_MODEL).samefile(bundle.base)
    assert bridge.resolve_model("tagmoe", bridge.EMBEDDED_MODEL).samefile(bundle.tagmoe)
    assert bridge.weights_missing(bridge.EMBEDDED_MODEL) is True


def test_half_the_embedded_model_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(bridge, "_fallback_roots", {})
    bridge.configure(tmp_path)
    (tmp_path / "tagmoe").mkdir()
    (tmp_path / "tagmoe" / "other.safetensors").write_bytes(b"")
    loader = pack.NODE_CLASS_MAPPINGS["TagMoEModelLoader"]
    with pytest.raises(PACK_ERROR, match="pick it for both"):
        run_node(loader, base_model=bridge.EMBEDDED_MODEL, tagmoe_weights="other.safetensors")


def test_an_install_without_the_assets_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(pack.tagmoe_core.tiny, "TRAINED_ROOT", tmp_path / "tiny-shapes")
    problem = bridge.weights_missing(bridge.EMBEDDED_MODEL)
    assert isinstance(problem, str) and "\n" not in problem and "reinstall the pack" in problem
    loader = pack.NODE_CLASS_MAPPINGS["TagMoEModelLoader"]
    with pytest.raises(PACK_ERROR, match="trained tiny model is incomplete"):
        loader().load(bridge.EMBEDDED_MODEL, bridge.EMBEDDED_MODEL, device="cpu")


def test_the_workflow_draws_and_edits_as_asked(ran):
    graph, results, shown = ran
    pictures = {node_id: pack.nodes.conversions.image_batch_to_pil(batch)[0].convert("RGB")
                for node_id, batch in shown.items()}
    verdicts = graph.judge(lambda node: pictures[str(node["id"])])
    print("\n".join(f"{prompt}: {v.summary()}" for prompt, v in verdicts))
    assert len(verdicts) == 3 and all(v.ok for _, v in verdicts), [v.summary() for _, v in verdicts]


def test_the_two_edits_route_to_different_experts(ran):
    """The removal (a local edit) and the black-and-white (a global style change) send their tokens to
    different experts (TAG-MoE's point: experts by task), and what the router head reads from each
    routing ranks that task's own tags (the task set's) above every other tag."""
    analyse = importlib.import_module(f"{pack.__name__}.tagmoe_core.intent.routing").analyse  # the pack's copy
    task_tags = importlib.import_module(f"{pack.__name__}.tagmoe_core.training.synthetic").TASK_TAGS
    graph, results, shown = ran
    loader = next(n for n in graph.nodes.values() if n["type"] == "TagMoEModelLoader")
    transformer = results[str(loader["id"])][0].require().transformer
    by_task = {}
    for save, sampler, _ in graph.edits():
        task, _ = read_instruction(graph.prompt_of(graph.origin(save, "images")))
        routing = results[str(sampler["id"])][2]
        by_task[task] = analyse(routing, transformer)
        maps = next(n for n in graph.nodes.values() if n["type"] == "TagMoERoutingMap"
                    and graph.origin(n, "routing")["id"] == sampler["id"])
        image, report = results[str(maps["id"])]
        assert image.shape[0] == 1 and "top-1 share of target tokens" in report  # the node drew and reported
    print("\n".join(f"{task}: shares {[round(float(v), 3) for v in a.expert_share]}, reads {a.ranking[:5]}"
                    for task, a in by_task.items()))
    assert set(by_task) == {"remove", "grayscale"}
    apart = float(abs(by_task["remove"].expert_share - by_task["grayscale"].expert_share).sum()) / 2
    assert apart > ROUTING_APART, (apart, {task: a.expert_share for task, a in by_task.items()})
    for task, a in by_task.items():
        expected = set(task_tags[task].names)
        assert {name for name, _ in a.ranking[:len(expected)]} == expected, (task, a.ranking[:6])


def test_a_cpu_load_leaves_comfyuis_gpu_models_and_a_bad_device_stops_first(monkeypatch):
    """Loading on the CPU does not unload ComfyUI's models from the GPU (they would reload for nothing);
    a device that cannot be parsed is one line before anything is freed or loaded."""
    freed = []
    monkeypatch.setattr(bridge, "free_vram_for_external_model", lambda: freed.append(True))
    loader = pack.NODE_CLASS_MAPPINGS["TagMoEModelLoader"]
    with pytest.raises(PACK_ERROR, match="invalid device"):
        loader().load(bridge.EMBEDDED_MODEL, bridge.EMBEDDED_MODEL, device="gpu seven")
    assert not freed
    (model, info), _ = run_node(loader, base_model=bridge.EMBEDDED_MODEL, tagmoe_weights=bridge.EMBEDDED_MODEL,
                                device="cpu", dtype="fp32")
    assert not freed and model.pipe is not None and "4 experts, top-1" in info
