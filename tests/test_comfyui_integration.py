"""The pack inside a real ComfyUI: every shipped workflow queued through /prompt.

Runs only when COMFYUI_DIR points at a ComfyUI checkout whose requirements (and this
project's) are installed in the Python running pytest, e.g.

    COMFYUI_DIR=~/ComfyUI python -m pytest -m comfyui tests/test_comfyui_integration.py

It starts ``main.py --cpu`` on a free loopback port with a fresh base directory holding the
pack (linked), the tiny model in models/diffusers and models/tagmoe, and the same VAE in
ComfyUI's format in models/vae; converts each workflow to API format with the server's own
/object_info, makes it small (steps, sizes), queues it and checks the images that come back; "00 Try
it" runs as shipped (the pack's own tiny model) and its pictures are judged by the task set's rule.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from comfy_server import (COMFYUI_DIR, LORA_NAME, images_of, is_hiddenswitch_fork, offline_page, run_prompt,
                          same_on_every_tree)
from node_harness import REPO
from try_it import TRY_IT, TryIt
from workflow_api import ui_to_api

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))


def _for_the_tiny_model(prompt: dict) -> dict:
    """Few steps and small sizes, so each workflow runs in seconds on the CPU; and the tiny model's
    files. Its text encoder is a diffusers one (ComfyUI's qwen_image CLIP is fixed at 7B), so every
    Load CLIP + CLIP Text Encode becomes TAG-MoE Text Encode (diffusers folder) with the same text."""
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CLIPLoader":
            del prompt[node_id]
        elif kind == "CLIPTextEncode":
            prompt[node_id] = {"class_type": "TagMoETextEncodeDiffusers",
                               "inputs": {"base_model": "Qwen-Image", "text": inputs["text"]}}
        elif kind == "TagMoESampler":
            inputs.update(steps=2, width=64, height=48, seed=7)
        elif kind == "TagMoEEditConditioning":
            inputs.update(width=64, height=48)
        elif kind in ("EmptySD3LatentImage", "TagMoEScheduler"):
            inputs.update(width=64, height=48) if kind == "EmptySD3LatentImage" else inputs.update(steps=2)
        elif kind == "KSampler":
            inputs.update(steps=2)
        elif kind == "TagMoELoraLoader":
            inputs.update(lora_name=LORA_NAME)
    return prompt


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_in_comfyui(comfy_server, path):
    server = comfy_server
    import requests

    object_info = requests.get(f"{server['url']}/object_info", timeout=60).json()
    workflow = json.loads(path.read_text())
    prompt = ui_to_api(workflow, object_info)
    if path != TRY_IT:  # the try-it workflow runs the shipped tiny model as a user gets it; the others made small
        prompt = _for_the_tiny_model(prompt)
    entry = run_prompt(server, prompt)
    images = images_of(server, entry)
    assert images, f"no images came back: {entry['outputs']}"
    if path == TRY_IT:
        _judge_try_it(workflow, images)
    for node_id, pictures in images.items():
        kind = prompt[node_id]["class_type"]
        for picture in pictures:
            assert picture.size[0] >= 32 and picture.size[1] >= 32, (kind, picture.size)
    sizes = {prompt[n]["class_type"]: {p.size for p in ps} for n, ps in images.items()}
    print(f"{path.stem}: {sizes}")
    for node_id, pictures in sorted(images.items()):  # the same workflow on another ComfyUI: the same pixels
        pixels = np.stack([np.asarray(p.convert("RGB"), dtype=np.float32) for p in pictures])
        for tree, diff in same_on_every_tree(f"{path.stem} node {node_id}", pixels).items():
            assert diff <= 1, (path.stem, node_id, tree, diff)


def _judge_try_it(workflow: dict, images: dict) -> None:
    """The drawn picture and both edits pass the task set's pixel rule, as without ComfyUI
    (tests/test_try_it_workflow.py)."""
    verdicts = TryIt(workflow).judge(lambda node: images[str(node["id"])][0].convert("RGB"))
    print("\n".join(f"{prompt}: {v.summary()}" for prompt, v in verdicts))
    assert len(verdicts) == 3 and all(v.ok for _, v in verdicts), [v.summary() for _, v in verdicts]


def test_native_vae_decode_matches_ours(comfy_server):
    server = comfy_server
    """Our LATENT through ComfyUI's VAE Decode (Qwen-Image VAE in ComfyUI's format) gives the
    same pixels as TAG-MoE Decode with the same VAE weights."""
    prompt = {
        "1": {"class_type": "TagMoEModelLoader", "inputs": {"base_model": "Qwen-Image", "tagmoe_weights": "TAG-MoE/",
                                                             "device": "cpu", "dtype": "fp32", "moe_backend": "auto"}},
        "2": {"class_type": "TagMoETextEncode", "inputs": {"model": ["1", 0], "prompt": "a red cloak",
                                                            "negative_prompt": ""}},
        "3": {"class_type": "TagMoESampler", "inputs": {"model": ["1", 0], "conditioning": ["2", 0], "seed": 3,
                                                         "steps": 2, "cfg": 4.0, "width": 64, "height": 48,
                                                         "images_per_prompt": 1}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "native"}},
        "7": {"class_type": "TagMoEDecode", "inputs": {"model": ["1", 0], "latent": ["3", 0],
                                                        "keep_original_size": False}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "ours"}},
    }
    images = images_of(server, run_prompt(server, prompt))
    native, ours = np.asarray(images["6"][0], dtype=np.int16), np.asarray(images["8"][0], dtype=np.int16)
    assert native.shape == ours.shape == (48, 64, 3)
    diff = np.abs(native - ours)
    print(f"native VAE Decode vs TAG-MoE Decode: max {diff.max()}, mean {diff.mean():.3f} (0-255)")
    assert diff.mean() < 1.0 and diff.max() <= 8


def test_pack_loads_serves_its_extension_and_lists_its_workflows(comfy_server):
    server = comfy_server
    import requests

    log = server["log"].read_text()
    # ComfyUI's own optional nodes may fail to import (nodes_audio without torchaudio); the pack may not
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line or "import failed" in line.lower()]
    assert not [line for line in failed if "tagmoe" in line], failed
    assert "comfyui-tagmoe" in log
    script = requests.get(f"{server['url']}/extensions/comfyui-tagmoe/tagmoe.js", timeout=10)
    assert script.ok and "registerExtension" in script.text
    templates = requests.get(f"{server['url']}/workflow_templates", timeout=10).json()
    assert set(templates.get("comfyui-tagmoe", [])) == {p.stem for p in WORKFLOWS}
    thumb = requests.get(f"{server['url']}/api/workflow_templates/comfyui-tagmoe/01 Edit an image.jpg", timeout=10)
    if is_hiddenswitch_fork() and thumb.status_code == 404:
        # the fork's server registers the template routes with no loaded packs (comfy/cmd/server.py passes
        # custom_node_manager.add_routes an empty map): no pack's template files are served there
        print("hiddenswitch fork: /api/workflow_templates/<pack>/ is not served for any pack")
    else:
        assert thumb.ok and thumb.content[:3] == b"\xff\xd8\xff"
    info = requests.get(f"{server['url']}/object_info/TagMoESampler", timeout=10).json()["TagMoESampler"]
    assert info["category"] == "TAG-MoE" and info["output"] == ["LATENT", "INT", "TAGMOE_ROUTING"]


def test_tag_picker_in_the_real_frontend(comfy_server):
    server = comfy_server
    """ComfyUI's own frontend in headless Chromium: the picker is on the Task Tags node, follows the
    annotation rules, writes the node's tags text, and the node is tall enough to show it."""
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Chromium (Debian package 'chromium')")
    workflow = json.loads((REPO / "example_workflows" / "15 Diffusers folder - task intent.json").read_text())
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        try:
            page = offline_page(browser, viewport={"width": 1600, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(e.stack or str(e)))
            page.goto(server["url"], wait_until="networkidle", timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph", timeout=60_000)
            page.wait_for_timeout(1000)
            page.keyboard.press("Escape")  # the first-run template browser
            page.evaluate("wf => window.app.loadGraphData(wf)", workflow)
            page.wait_for_timeout(1500)
            state = page.evaluate("""() => {
                const n = window.app.graph._nodes.find(n => n.type === 'TagMoETaskTags');
                const c = window.app.canvas; c.ds.scale = 1; c.ds.offset = [-n.pos[0] + 60, -n.pos[1] + 60];
                c.setDirty(true, true);
                return {widgets: n.widgets.map(w => w.name), size: n.size, min: n.computeSize()}; }""")
            assert "tag_picker" in state["widgets"] and state["size"][1] >= state["min"][1]
            page.wait_for_timeout(500)
            page.get_by_label("attribute editing").check()
            page.get_by_label("style transfer").check()
            tags = page.evaluate("() => window.app.graph._nodes.find(n => n.type === 'TagMoETaskTags')"
                                 ".widgets.find(w => w.name === 'tags').value")
            assert "style transfer" in tags and "attribute editing" not in tags
            assert not page.get_by_label("attribute editing").is_checked()
            assert not [e for e in errors if "tagmoe" in e.lower()], errors
        finally:
            browser.close()


INFO_TEXT = "\n".join(f"line {i}: placement details" for i in range(1, 8))  # what the loader reports: 7 lines


def test_node_texts_are_readable_and_nodes_do_not_cover_each_other(comfy_server):
    """In ComfyUI's frontend, every template after its nodes reported their texts: each text shows all
    its lines, nodes are as tall as their content, none covers another, and the sampler's one-line text
    is drawn among its widgets (a text area would float over its preview)."""
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Chromium (Debian package 'chromium')")
    check = """async (text) => {
        const g = window.app.graph, c = window.app.canvas, out = {texts: [], sizes: [], overlaps: [], oneLine: []};
        const info = new Set(["TagMoEModelLoader", "TagMoESampler", "TagMoEPromptRefine", "TagMoETaskTags",
                              "TagMoERoutingMap", "TagMoELoadDiffusionModel", "TagMoELoraLoader"]);
        for (const n of g._nodes) if (info.has(n.type)) n.onExecuted({text: [text]});
        for (const n of g._nodes) {
            const w = n.widgets?.find(w => w.name === "tagmoe_info");
            if (!w) continue;
            if (n.type === "TagMoESampler") { out.oneLine.push(!w.inputEl); continue; }
            c.ds.scale = 1; c.ds.offset = [-n.pos[0] + 40, -n.pos[1] + 60]; c.setDirty(true, true);
            await new Promise(r => setTimeout(r, 400));
            const el = w.inputEl;
            out.texts.push({node: n.type, scroll: el.scrollHeight, client: el.clientHeight});
        }
        const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
        for (const n of g._nodes) {
            const min = n.computeSize();
            if (n.size[1] + 1 < min[1]) out.sizes.push(`${n.type} ${n.size[1]} < ${min[1]}`);
        }
        const box = n => [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
        const nodes = g._nodes;
        for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
            const a = box(nodes[i]), b = box(nodes[j]);
            if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3])
                out.overlaps.push(`${nodes[i].type} #${nodes[i].id} / ${nodes[j].type} #${nodes[j].id}`);
        }
        return out; }"""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        try:
            page = offline_page(browser, viewport={"width": 1600, "height": 1000})
            page.goto(comfy_server["url"], wait_until="networkidle", timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph", timeout=60_000)
            page.wait_for_timeout(1000)
            page.keyboard.press("Escape")
            problems = {}
            for path in WORKFLOWS:
                page.evaluate("wf => window.app.loadGraphData(wf)", json.loads(path.read_text()))
                page.wait_for_timeout(800)
                out = page.evaluate(check, INFO_TEXT)
                cut = [t for t in out["texts"] if t["scroll"] > t["client"] + 2]
                found = {"cut texts": cut, "too small": out["sizes"], "overlaps": out["overlaps"],
                         "sampler text as a text area": [x for x in out["oneLine"] if not x]}
                if any(found.values()):
                    problems[path.stem] = {k: v for k, v in found.items() if v}
                print(f"{path.stem}: {len(out['texts'])} texts shown whole, {len(out['oneLine'])} one-line")
            assert not problems, json.dumps(problems, indent=1)
        finally:
            browser.close()
