"""Write the example workflows in workflows/ (ComfyUI UI format 0.4) and their thumbnails.

    python scripts/make_workflows.py

Each workflow is laid out left to right; its thumbnail is a drawing of the graph. The
workflows are checked by tests/test_workflows.py against the nodes' real inputs.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "workflows"

EDIT_PROMPT = "Change the cloak to red color"
T2I_PROMPT = "A cat holding a sign that says hello world, studio photo"
REGION_PROMPT = "Replace the object in the painted region with a bouquet of sunflowers"
BASE = "Qwen-Image"
WEIGHTS = "TAG-MoE/"
COLORS = {"STRING": (140, 200, 140), "TAGMOE_TAGS": (0, 188, 212), "TAGMOE_ROUTING": (244, 143, 177),
          "IMAGE": (100, 181, 246), "MASK": (129, 199, 132), "LATENT": (255, 158, 193), "VAE": (255, 112, 67),
          "TAGMOE_MODEL": (179, 157, 219), "TAGMOE_CONDITIONING": (255, 213, 79), "INT": (160, 160, 160)}


class Graph:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, kind: str, pos, widgets, inputs=(), outputs=(), size=(320, 140), title=None, color=None):
        node = {
            "id": len(self.nodes) + 1, "type": kind, "pos": list(pos), "size": list(size), "flags": {},
            "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} | ({"shape": 7} if optional else {})
                       for n, t, optional in inputs],
            "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs],
            "properties": {"Node name for S&R": kind}, "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color
        self.nodes.append(node)
        return node

    def link(self, src: dict, output: str, dst: dict, input_name: str) -> None:
        slot = next(i for i, o in enumerate(src["outputs"]) if o["name"] == output)
        target = next(i for i, o in enumerate(dst["inputs"]) if o["name"] == input_name)
        kind = src["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        self.links.append([link_id, src["id"], slot, dst["id"], target, kind])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][target]["link"] = link_id

    def to_json(self) -> dict:
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-tagmoe/{self.name}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}


# -- node factories (sockets in INPUT_TYPES order; widget values in INPUT_TYPES order) -------------------------
def loader(g, pos):
    return g.add("TagMoEModelLoader", pos, [BASE, WEIGHTS, "auto", "auto", "auto", "auto", False, False, -1, "", False],
                 outputs=[("model", "TAGMOE_MODEL"), ("placement", "STRING")], size=(340, 300))


def text_encode(g, pos, prompt, negative="", prompt_input=False):
    node = g.add("TagMoETextEncode", pos, [prompt, negative],
                 inputs=[("model", "TAGMOE_MODEL", False), ("image", "IMAGE", True)],
                 outputs=[("conditioning", "TAGMOE_CONDITIONING")], size=(360, 220))
    if prompt_input:  # the prompt widget fed by a link (e.g. from Prompt Refine)
        node["inputs"].append({"name": "prompt", "type": "STRING", "widget": {"name": "prompt"}, "link": None})
    return node


def sampler(g, pos, width=0, height=0, seed=1234, steps=30, cfg=4.0, denoise=1.0, guidance=0.0, record=False):
    return g.add("TagMoESampler", pos, [seed, "randomize", steps, cfg, width, height, 1, denoise, guidance, record],
                 inputs=[("model", "TAGMOE_MODEL", False), ("conditioning", "TAGMOE_CONDITIONING", False),
                         ("image", "IMAGE", True), ("mask", "MASK", True), ("latent", "LATENT", True),
                         ("tags", "TAGMOE_TAGS", True)],
                 outputs=[("latent", "LATENT"), ("seed", "INT"), ("routing", "TAGMOE_ROUTING")], size=(320, 380))


def decode(g, pos, keep=False):
    return g.add("TagMoEDecode", pos, [keep, "auto"],
                 inputs=[("model", "TAGMOE_MODEL", False), ("latent", "LATENT", False),
                         ("original_image", "IMAGE", True)],
                 outputs=[("image", "IMAGE")], size=(260, 130))


def load_image(g, pos, name="example.png"):
    return g.add("LoadImage", pos, [name, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], size=(300, 330))


def save_image(g, pos, prefix):
    return g.add("SaveImage", pos, [prefix], inputs=[("images", "IMAGE", False)], size=(300, 320))


def note(g, pos, text, size=(340, 200)):
    return g.add("MarkdownNote", pos, [text], size=size, title="Read me", color=("#432", "#653"))


SETUP = ("**Models**: put the Qwen-Image diffusers folder in `models/diffusers/Qwen-Image` and the TAG-MoE "
         "weights (the YUXU915/TAG-MoE folder, or a single file) in `models/tagmoe/`, then pick them in the "
         "loader. The release needs about 60 GB of GPU memory; `device` `0,1` splits it over two GPUs.")


def _chain(name: str, prompt: str, prefix: str, note_text: str, *, image: bool = True, mask: bool = False,
           negative: str = "", size: int = 0, note_size=(340, 200)) -> Graph:
    """Loader -> Text Encode -> Sampler (-> from an image, with its mask) -> Decode -> Save."""
    g = Graph(name)
    m = loader(g, (40, 80))
    t = text_encode(g, (420, 80), prompt, negative)
    s = sampler(g, (820, 80), width=size, height=size)
    d = decode(g, (1180, 80), keep=image)
    out = save_image(g, (1480, 80), prefix)
    note(g, (420, 360) if image else (40, 420), note_text, size=note_size)
    links = [(m, "model", t, "model"), (m, "model", s, "model"), (m, "model", d, "model"),
             (t, "conditioning", s, "conditioning"), (s, "latent", d, "latent"), (d, "image", out, "images")]
    if image:
        img = load_image(g, (40, 420))
        links.append((img, "IMAGE", s, "image"))
        if mask:
            links.append((img, "MASK", s, "mask"))
    for a, out_name, b, in_name in links:
        g.link(a, out_name, b, in_name)
    return g


def instruction_edit() -> Graph:
    return _chain("tagmoe_instruction_edit", EDIT_PROMPT, "TAG-MoE/edit",
                  SETUP + "\n\nWidth/height 0: the input's preferred Qwen-Image bucket; keep_original_size resizes "
                          "the result back to the input's size.")


def text_to_image() -> Graph:
    return _chain("tagmoe_text_to_image", T2I_PROMPT, "TAG-MoE/t2i",
                  SETUP + "\n\nNo image on the sampler: TAG-MoE makes a new picture (the 'image generation' task).",
                  image=False, negative="blurry, low quality", size=1024)


def region_edit() -> Graph:
    return _chain("tagmoe_region_edit", REGION_PROMPT, "TAG-MoE/region",
                  "**Paint the region**: right-click the image, *Open in MaskEditor*, paint where the edit goes and "
                  "save. The mask's bounding box selects which part of the input conditions the edit (the "
                  "reference's cond_bbox).\n\n" + SETUP, mask=True, note_size=(340, 260))


def native_latent_chain() -> Graph:
    g = Graph("tagmoe_native_latent_chain")
    m = loader(g, (40, 80))
    img = load_image(g, (40, 420))
    t = text_encode(g, (420, 80), EDIT_PROMPT)
    s = sampler(g, (820, 80), width=512, height=512)
    up = g.add("LatentUpscaleBy", (1180, 80), ["bislerp", 1.5], inputs=[("samples", "LATENT", False)],
               outputs=[("LATENT", "LATENT")], size=(280, 90))
    vae = g.add("VAELoader", (1180, 240), ["qwen_image_vae.safetensors"], outputs=[("VAE", "VAE")], size=(300, 60))
    native = g.add("VAEDecode", (1520, 80), [], inputs=[("samples", "LATENT", False), ("vae", "VAE", False)],
                   outputs=[("IMAGE", "IMAGE")], size=(210, 50))
    out = save_image(g, (1780, 80), "TAG-MoE/native")
    d = decode(g, (1180, 380))
    preview = g.add("PreviewImage", (1520, 380), [], inputs=[("images", "IMAGE", False)], size=(300, 300))
    note(g, (420, 360), "TAG-MoE's LATENT is ComfyUI's Qwen-Image latent format ([B,16,1,H/8,W/8], "
                        "un-normalised), so native latent nodes and **VAE Decode with the Qwen-Image VAE** "
                        "(`models/vae/qwen_image_vae.safetensors`) take it. Below: the same latent decoded by "
                        "TAG-MoE Decode, for comparison.\n\n" + SETUP, size=(340, 280))
    for a, out_name, b, in_name in ((m, "model", t, "model"), (m, "model", s, "model"), (m, "model", d, "model"),
                                    (t, "conditioning", s, "conditioning"), (img, "IMAGE", s, "image"),
                                    (s, "latent", up, "samples"), (up, "LATENT", native, "samples"),
                                    (vae, "VAE", native, "vae"), (native, "IMAGE", out, "images"),
                                    (s, "latent", d, "latent"), (d, "image", preview, "images")):
        g.link(a, out_name, b, in_name)
    return g


DISPLAY = {"TagMoEModelLoader": "TAG-MoE Model Loader", "TagMoETextEncode": "TAG-MoE Text Encode",
           "TagMoESampler": "TAG-MoE Sampler", "TagMoEDecode": "TAG-MoE Decode", "TagMoETaskTags": "TAG-MoE Task Tags",
           "TagMoEPromptRefine": "TAG-MoE Prompt Refine", "TagMoERoutingMap": "TAG-MoE Routing Map"}


def task_intent() -> Graph:
    g = Graph("tagmoe_task_intent")
    m = loader(g, (40, 80))
    img = load_image(g, (40, 420))
    refine = g.add("TagMoEPromptRefine", (420, 320), [EDIT_PROMPT, "TAG-MoE text encoder", 0, "fixed", 0.0, 160, "",
                                                      "http://127.0.0.1:8000/v1", "", "OPENAI_API_KEY", 60.0, 2],
                   inputs=[("image", "IMAGE", False), ("model", "TAGMOE_MODEL", True)],
                   outputs=[("instruction", "STRING"), ("proposed_tags", "TAGMOE_TAGS"),
                            ("proposed_tags_text", "STRING")], size=(360, 420))
    tags = g.add("TagMoETaskTags", (820, 420), ["auto (rules)", "local editing",
                                                "identity preservation, background preservation, style preservation",
                                                True],
                 inputs=[("instruction", "STRING", True), ("model", "TAGMOE_MODEL", True), ("image", "IMAGE", True)],
                 outputs=[("tags", "TAGMOE_TAGS"), ("tags_text", "STRING")], size=(340, 420))
    t = text_encode(g, (820, 80), EDIT_PROMPT, prompt_input=True)
    s = sampler(g, (1220, 80), guidance=1.0, record=True)
    d = decode(g, (1580, 80))
    out = save_image(g, (1880, 80), "TAG-MoE/intent")
    routing = g.add("TagMoERoutingMap", (1580, 420), ["all", "all"],
                    inputs=[("model", "TAGMOE_MODEL", False), ("routing", "TAGMOE_ROUTING", False),
                            ("image", "IMAGE", True), ("condition_image", "IMAGE", True),
                            ("tags", "TAGMOE_TAGS", True)],
                    outputs=[("maps", "IMAGE"), ("report", "STRING")], size=(300, 200))
    maps = g.add("PreviewImage", (1880, 420), [], inputs=[("images", "IMAGE", False)], size=(420, 300))
    note(g, (40, 700), "**Task intent**: the VLM (here TAG-MoE's own text encoder) rewrites the instruction while "
                       "looking at the image; the Task Tags node tags the refined instruction; tag_guidance steers "
                       "the MoE routers toward the gate mix that best expresses those tags (0 = the release's "
                       "behaviour); the Routing Map shows where each expert worked and how well the routing "
                       "matches the tags.\n\n" + SETUP, size=(560, 200))
    for a, out_name, b, in_name in (
            (m, "model", refine, "model"), (img, "IMAGE", refine, "image"), (refine, "instruction", t, "prompt"),
            (refine, "instruction", tags, "instruction"), (m, "model", t, "model"), (m, "model", s, "model"),
            (m, "model", d, "model"), (m, "model", routing, "model"), (t, "conditioning", s, "conditioning"),
            (img, "IMAGE", s, "image"), (tags, "tags", s, "tags"), (s, "latent", d, "latent"),
            (d, "image", out, "images"), (s, "routing", routing, "routing"), (d, "image", routing, "image"),
            (img, "IMAGE", routing, "condition_image"), (tags, "tags", routing, "tags"),
            (routing, "maps", maps, "images")):
        g.link(a, out_name, b, in_name)
    return g


def thumbnail(graph: dict, path: Path, size: tuple[int, int] = (640, 480)) -> None:
    """A drawing of the graph, fitted to a 4:3 card: nodes as titled boxes, links as curves."""
    xs = [n["pos"][0] for n in graph["nodes"]] + [n["pos"][0] + n["size"][0] for n in graph["nodes"]]
    ys = [n["pos"][1] - 20 for n in graph["nodes"]] + [n["pos"][1] + n["size"][1] for n in graph["nodes"]]
    span_x, span_y = max(xs) - min(xs), max(ys) - min(ys)
    scale = min((size[0] - 24) / span_x, (size[1] - 24) / span_y)
    x0 = min(xs) - (size[0] / scale - span_x) / 2
    y0 = min(ys) - (size[1] / scale - span_y) / 2
    width, height = size
    image = Image.new("RGB", (width, height), (32, 33, 36))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    nodes = {n["id"]: n for n in graph["nodes"]}

    def xy(x, y):
        return (x - x0) * scale, (y - y0) * scale

    for n in graph["nodes"]:
        left, top = xy(*n["pos"])
        right, bottom = xy(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        body = (70, 52, 40) if n["type"] == "MarkdownNote" else (53, 53, 58)
        head = (110, 80, 60) if n["type"] == "MarkdownNote" else ((90, 70, 140) if n["type"].startswith("TagMoE")
                                                                   else (70, 70, 78))
        draw.rectangle([left, top - 14, right, bottom], fill=body, outline=(90, 90, 96))
        draw.rectangle([left, top - 14, right, top], fill=head)
        label = n.get("title") or DISPLAY.get(n["type"], n["type"])
        draw.text((left + 4, top - 13), label[:28], fill=(235, 235, 235), font=font)
    for link_id, src, src_slot, dst, dst_slot, kind in graph["links"]:
        a, b = nodes[src], nodes[dst]
        p0 = xy(a["pos"][0] + a["size"][0], a["pos"][1] + 20 + 22 * src_slot)
        p3 = xy(b["pos"][0], b["pos"][1] + 20 + 22 * dst_slot)
        mid = (p0[0] + p3[0]) / 2
        points = []
        for i in range(21):  # a cubic bezier, like the editor's links
            t = i / 20
            x = (1 - t) ** 3 * p0[0] + 3 * (1 - t) ** 2 * t * mid + 3 * (1 - t) * t ** 2 * mid + t ** 3 * p3[0]
            y = (1 - t) ** 3 * p0[1] + 3 * (1 - t) ** 2 * t * p0[1] + 3 * (1 - t) * t ** 2 * p3[1] + t ** 3 * p3[1]
            points.append((x, y))
        draw.line(points, fill=COLORS.get(kind, (200, 200, 200)), width=2)
    image.save(path, quality=90)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for build in (instruction_edit, text_to_image, region_edit, native_latent_chain, task_intent):
        graph = build()
        data = graph.to_json()
        (OUT / f"{graph.name}.json").write_text(json.dumps(data, indent=2) + "\n")
        thumbnail(data, OUT / f"{graph.name}.jpg")
        print(f"wrote workflows/{graph.name}.json (+ .jpg)", file=sys.stderr)


if __name__ == "__main__":
    main()
