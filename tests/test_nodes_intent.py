"""The task-intent nodes (Task Tags, Prompt Refine, Routing Map) and the sampler's tag guidance,
run through their ComfyUI entry points on the tiny model."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from node_harness import PACK_ERROR, load_pack, run_node

PROMPT = "Change the cloak to red color"


@pytest.fixture(scope="module")
def nodes():
    return load_pack().NODE_CLASS_MAPPINGS


@pytest.fixture
def model(nodes, tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "intent-models"
    if not root.exists():
        (root / "diffusers").mkdir(parents=True)
        (root / "tagmoe").mkdir()
        (root / "diffusers" / "Qwen-Image-tiny").symlink_to(tiny_bundle.base)
        shutil.copytree(tiny_bundle.tagmoe, root / "tagmoe" / "TAG-MoE-tiny")
    load_pack().nodes.comfy_bridge.configure(root)
    return run_node(nodes["TagMoEModelLoader"], base_model="Qwen-Image-tiny", tagmoe_weights="TAG-MoE-tiny/",
                    device="cpu")[0][0]


def image(h=40, w=72):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(0))


def test_task_tags_manual(nodes):
    (tags, text), ui = run_node(nodes["TagMoETaskTags"], mode="manual", scope="local editing",
                                tags="attribute editing, identity preservation")
    assert text == "local editing, attribute editing, identity preservation" and tags.ids == [0, 7, 14]
    assert ui["tags"][0]["scope"] == "local editing"
    with pytest.raises(PACK_ERROR, match="excludes 'attribute editing'"):
        run_node(nodes["TagMoETaskTags"], mode="manual", scope="global editing",
                 tags="style transfer, attribute editing")
    with pytest.raises(PACK_ERROR, match="unknown task tag"):
        run_node(nodes["TagMoETaskTags"], mode="manual", scope="local editing", tags="colour editing")


def test_task_tags_auto(nodes, model):
    (tags, text), ui = run_node(nodes["TagMoETaskTags"], mode="auto (rules)", scope="local editing", tags="",
                                instruction=PROMPT)
    assert text == "local editing, attribute editing, background preservation, identity preservation, " \
                   "style preservation"
    assert ui["text"][0].splitlines()[1].startswith("source: rules; confidence: scope ")
    (_, _), ui = run_node(nodes["TagMoETaskTags"], mode="auto (rules)", scope="local editing", tags="",
                          instruction="把斗篷改成红色")
    assert "warning: the instruction does not look like English" in ui["text"][0]
    (t2i, _), _ = run_node(nodes["TagMoETaskTags"], mode="auto (rules)", scope="local editing", tags="",
                           edits_an_image=False, instruction="a cat")
    assert t2i.scope == "image generation"
    # with a model, its text encoder scores every tag (random tiny weights: the tags are noise, the scoring real)
    from tagmoe_core.intent.tag_scoring import TagScorer

    pipe = model.require()
    (vlm_tags, _), ui = run_node(nodes["TagMoETaskTags"], mode="auto (VLM)", scope="local editing", tags="",
                                 instruction=PROMPT, model=model, image=image())
    picture = load_pack().nodes.conversions.image_batch_to_pil(image())[0]
    direct = TagScorer(pipe.text_encoder, pipe.tokenizer, pipe.vlm_image_processor).tag(PROMPT, picture)
    assert vlm_tags.to_dict() == direct.tags.to_dict() and ui["tagging"][0]["source"] == "vlm"
    assert ui["tagging"][0]["confidence"] == direct.confidence.to_dict()
    assert ui["text"][0].splitlines()[1] == "source: vlm; confidence: " + direct.confidence.to_text()
    with pytest.raises(PACK_ERROR, match="needs an instruction"):
        run_node(nodes["TagMoETaskTags"], mode="auto (rules)", scope="local editing", tags="")
    # without a model: the rules, saying so
    (fallback, _), ui = run_node(nodes["TagMoETaskTags"], mode="auto (VLM)", scope="local editing", tags="",
                                 instruction=PROMPT)
    assert fallback == tags and ui["tagging"][0]["source"] == "rules"
    assert "warning: auto (VLM) without a model with a text encoder: rule-based tags" in ui["text"][0]


def test_prompt_refine_with_the_text_encoder(nodes, model):
    inputs = dict(image=image(), instruction=PROMPT, backend="TAG-MoE text encoder", seed=3, temperature=0.7,
                  max_new_tokens=16, model=model)
    (first, tags, tags_text), ui = run_node(nodes["TagMoEPromptRefine"], **inputs)
    (again, _, _), _ = run_node(nodes["TagMoEPromptRefine"], **inputs)
    assert isinstance(first, str) and first == again and ui["text"][0].startswith(first)
    assert tags.to_text() == tags_text
    with pytest.raises(PACK_ERROR, match="needs the model"):
        run_node(nodes["TagMoEPromptRefine"], **(inputs | {"model": None}))


def test_prompt_refine_with_an_endpoint(nodes):
    answers = iter(["Recolor only the cloak red; keep the face, pose and background unchanged.",
                    '{"scope": "local editing", "type": ["attribute editing"], '
                    '"preservation": ["identity preservation"]}'])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            data = json.dumps({"choices": [{"message": {"content": next(answers)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (text, tags, _), _ = run_node(nodes["TagMoEPromptRefine"], image=image(), instruction=PROMPT,
                                      backend="OpenAI-compatible endpoint", seed=0, temperature=0.0,
                                      max_new_tokens=64, endpoint_url=f"http://127.0.0.1:{server.server_port}/v1",
                                      endpoint_model="qwen2.5-vl", api_key_env="")
    finally:
        server.shutdown()
        server.server_close()
    assert text.startswith("Recolor only the cloak red") and tags.types == ("attribute editing",)


def test_guided_sampling_and_routing_map(nodes, model):
    (tags, _), _ = run_node(nodes["TagMoETaskTags"], mode="manual", scope="global editing",
                            tags="style transfer, structure preservation")
    (cond,), _ = run_node(nodes["TagMoETextEncode"], model=model, prompt="Make it a watercolor", negative_prompt="")
    base = dict(model=model, conditioning=cond, seed=1, steps=2, cfg=4.0, width=64, height=48, image=image())
    (plain, _, no_routing), _ = run_node(nodes["TagMoESampler"], **base)
    assert no_routing is None
    (guided, _, routing), ui = run_node(nodes["TagMoESampler"], **base, tags=tags, tag_guidance=1.5,
                                        record_routing=True)
    assert not torch.equal(plain["samples"], guided["samples"]) and "tag guidance 1.5" in ui["text"][0]
    (maps, report), ui = run_node(nodes["TagMoERoutingMap"], model=model, routing=routing, layers="3", steps="all",
                                  image=image(48, 64), condition_image=image(), tags=tags)
    assert maps.shape[0] == 1 and maps.shape[-1] == 3 and maps.shape[2] == 5 * 256
    assert "alignment" in report and ui["text"] == [report]
    with pytest.raises(PACK_ERROR, match="turn on record_routing"):
        run_node(nodes["TagMoERoutingMap"], model=model, routing=None)
    with pytest.raises(PACK_ERROR, match="were not recorded"):
        run_node(nodes["TagMoERoutingMap"], model=model, routing=routing, layers="50-59")
    with pytest.raises(PACK_ERROR, match="tag_guidance needs tags"):
        run_node(nodes["TagMoESampler"], **base, tag_guidance=1.0)
