"""Write the example workflows in example_workflows/ (ComfyUI UI format 0.4) and their thumbnails.

    python scripts/make_workflows.py

ComfyUI lists them in its template browser under the pack's name, sorted by file name: the native
graphs (TAG-MoE as a ComfyUI MODEL) first, then the diffusers-folder pipeline's. Each is laid out
left to right with room for what the nodes show; its thumbnail is a drawing of the graph. They are
checked by tests/test_workflows.py against the nodes' real inputs (and for overlaps), and run in a
real ComfyUI by tests/test_comfyui_integration.py.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "example_workflows"

EDIT_PROMPT = "Change the cloak to red color"
T2I_PROMPT = "A cat holding a sign that says hello world, studio photo"
REGION_PROMPT = "Replace the object in the painted region with a bouquet of sunflowers"
BASE = "Qwen-Image"
WEIGHTS = "TAG-MoE/"
NATIVE_WEIGHTS = "TAG-MoE/"  # the release folder in models/diffusion_models (or a file from 'tagmoe convert')
CLIP = "qwen_2.5_vl_7b_fp8_scaled.safetensors"  # ComfyUI's repackaged Qwen-Image text encoder
VAE = "qwen_image_vae.safetensors"
LIGHTNING = "Qwen-Image-Lightning-8steps-V1.0.safetensors"
NEGATIVE = " "  # the reference encodes an empty negative prompt as a single space
COLORS = {"STRING": (140, 200, 140), "TAGMOE_TAGS": (0, 188, 212), "TAGMOE_ROUTING": (244, 143, 177),
          "IMAGE": (100, 181, 246), "MASK": (129, 199, 132), "LATENT": (255, 158, 193), "VAE": (255, 112, 67),
          "TAGMOE_MODEL": (179, 157, 219), "TAGMOE_CONDITIONING": (255, 213, 79), "INT": (160, 160, 160),
          "MODEL": (179, 157, 219), "CLIP": (255, 213, 79), "CONDITIONING": (255, 167, 38), "SIGMAS": (205, 220, 57),
          "GUIDER": (102, 187, 106), "NOISE": (176, 190, 197), "SAMPLER": (255, 138, 101)}


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
        link_id = max((link[0] for link in self.links), default=0) + 1
        self.links.append([link_id, src["id"], slot, dst["id"], target, kind])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][target]["link"] = link_id

    def to_json(self) -> dict:
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-tagmoe/{self.name}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": max((link[0] for link in self.links), default=0),
                "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}


# -- node factories (sockets in INPUT_TYPES order; widget values in INPUT_TYPES order) -------------------------
def loader(g, pos, base=BASE, weights=WEIGHTS, device="auto", dtype="auto"):
    return g.add("TagMoEModelLoader", pos,
                 [base, weights, device, dtype, "auto", "auto", False, False, -1, "", False],
                 outputs=[("model", "TAGMOE_MODEL"), ("placement", "STRING")], size=(360, 520))


def text_encode(g, pos, prompt, negative="", prompt_input=False):
    node = g.add("TagMoETextEncode", pos, [prompt, negative],
                 inputs=[("model", "TAGMOE_MODEL", False), ("image", "IMAGE", True)],
                 outputs=[("conditioning", "TAGMOE_CONDITIONING")], size=(360, 220))
    if prompt_input:  # the prompt widget fed by a link (e.g. from Prompt Refine)
        node["inputs"].append({"name": "prompt", "type": "STRING", "widget": {"name": "prompt"}, "link": None})
    return node


def sampler(g, pos, width=0, height=0, seed=1234, steps=30, cfg=4.0, denoise=1.0, guidance=0.0, record=False,
            region="", control="randomize"):
    return g.add("TagMoESampler", pos, [seed, control, steps, cfg, width, height, 1, denoise, guidance, record,
                                        region],
                 inputs=[("model", "TAGMOE_MODEL", False), ("conditioning", "TAGMOE_CONDITIONING", False),
                         ("image", "IMAGE", True), ("mask", "MASK", True), ("latent", "LATENT", True),
                         ("tags", "TAGMOE_TAGS", True)],
                 outputs=[("latent", "LATENT"), ("seed", "INT"), ("routing", "TAGMOE_ROUTING")], size=(340, 700))


def decode(g, pos, keep=False):
    return g.add("TagMoEDecode", pos, [keep, "auto"],
                 inputs=[("model", "TAGMOE_MODEL", False), ("latent", "LATENT", False),
                         ("original_image", "IMAGE", True)],
                 outputs=[("image", "IMAGE")], size=(260, 130))


def routing_map(g, pos, size=(400, 420)):
    return g.add("TagMoERoutingMap", pos, ["all", "all"],
                 inputs=[("routing", "TAGMOE_ROUTING", False), ("model", "TAGMOE_MODEL", True),
                         ("image", "IMAGE", True), ("condition_image", "IMAGE", True), ("tags", "TAGMOE_TAGS", True)],
                 outputs=[("maps", "IMAGE"), ("report", "STRING")], size=size)


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
           negative: str = "", size: int = 0, note_size=(360, 260), region: str = "") -> Graph:
    """Loader -> Text Encode -> Sampler (-> from an image, with its mask) -> Decode -> Save."""
    g = Graph(name)
    m = loader(g, (40, 80))
    t = text_encode(g, (440, 80), prompt, negative)
    s = sampler(g, (860, 80), width=size, height=size, region=region)
    d = decode(g, (1240, 80), keep=image)
    out = save_image(g, (1540, 80), prefix)
    note(g, (440, 360) if image else (40, 680), note_text, size=note_size)
    links = [(m, "model", t, "model"), (m, "model", s, "model"), (m, "model", d, "model"),
             (t, "conditioning", s, "conditioning"), (s, "latent", d, "latent"), (d, "image", out, "images")]
    if image:
        img = load_image(g, (40, 680))
        links.append((img, "IMAGE", s, "image"))
        if mask:
            links.append((img, "MASK", s, "mask"))
    for a, out_name, b, in_name in links:
        g.link(a, out_name, b, in_name)
    return g


def instruction_edit() -> Graph:
    return _chain("11 Diffusers folder - edit an image", EDIT_PROMPT, "TAG-MoE/edit",
                  SETUP + "\n\nWidth/height 0: the input's preferred Qwen-Image bucket; keep_original_size resizes "
                          "the result back to the input's size.")


def text_to_image() -> Graph:
    return _chain("12 Diffusers folder - text to image", T2I_PROMPT, "TAG-MoE/t2i",
                  SETUP + "\n\nNo image on the sampler: TAG-MoE makes a new picture (the 'image generation' task).",
                  image=False, negative="blurry, low quality", size=1024)


def region_edit() -> Graph:
    return _chain("13 Diffusers folder - edit a region", REGION_PROMPT, "TAG-MoE/region",
                  "**Edit only a region.** The sampler's `region` (x1,y1,x2,y2 as fractions of the image) picks the "
                  "part of the input that conditions the edit (the reference's cond_bbox). To paint it instead: "
                  "right-click the image, *Open in MaskEditor*, paint, save, and connect Load Image's MASK to the "
                  "sampler's `mask` (its bounding box is used; it takes precedence).\n\n" + SETUP,
                  note_size=(360, 300), region="0.3,0.15,0.7,0.85")


def native_latent_chain() -> Graph:
    g = Graph("14 Diffusers folder - latent into VAE Decode")
    m = loader(g, (40, 80))
    img = load_image(g, (40, 680))
    t = text_encode(g, (440, 80), EDIT_PROMPT)
    s = sampler(g, (860, 80), width=512, height=512)
    up = g.add("LatentUpscaleBy", (1240, 80), ["bislerp", 1.5], inputs=[("samples", "LATENT", False)],
               outputs=[("LATENT", "LATENT")], size=(280, 90))
    vae = g.add("VAELoader", (1240, 240), ["qwen_image_vae.safetensors"], outputs=[("VAE", "VAE")], size=(300, 60))
    native = g.add("VAEDecode", (1580, 80), [], inputs=[("samples", "LATENT", False), ("vae", "VAE", False)],
                   outputs=[("IMAGE", "IMAGE")], size=(210, 50))
    out = save_image(g, (1840, 80), "TAG-MoE/native")
    d = decode(g, (1240, 460))
    preview = g.add("PreviewImage", (1580, 460), [], inputs=[("images", "IMAGE", False)], size=(300, 300))
    note(g, (440, 360), "TAG-MoE's LATENT is ComfyUI's Qwen-Image latent format ([B,16,1,H/8,W/8], "
                        "un-normalised), so native latent nodes and **VAE Decode with the Qwen-Image VAE** "
                        "(`models/vae/qwen_image_vae.safetensors`) take it. Below: the same latent decoded by "
                        "TAG-MoE Decode, for comparison.\n\n" + SETUP, size=(360, 300))
    for a, out_name, b, in_name in ((m, "model", t, "model"), (m, "model", s, "model"), (m, "model", d, "model"),
                                    (t, "conditioning", s, "conditioning"), (img, "IMAGE", s, "image"),
                                    (s, "latent", up, "samples"), (up, "LATENT", native, "samples"),
                                    (vae, "VAE", native, "vae"), (native, "IMAGE", out, "images"),
                                    (s, "latent", d, "latent"), (d, "image", preview, "images")):
        g.link(a, out_name, b, in_name)
    return g


# -- native graphs: TAG-MoE as a ComfyUI MODEL ------------------------------------------------------------------
NATIVE_SETUP = ("**Models** (the files Qwen-Image users already have, plus TAG-MoE):\n"
                f"- `models/diffusion_models/`: the TAG-MoE weights (the YUXU915/TAG-MoE folder, or one file made by "
                f"`tagmoe convert`): pick them in **TAG-MoE Load Diffusion Model**, never in ComfyUI's own Load "
                f"Diffusion Model (it would drop the experts)\n"
                f"- `models/text_encoders/{CLIP}` (Load CLIP, type qwen_image)\n"
                f"- `models/vae/{VAE}`\n\n"
                "ComfyUI manages the memory: on a 24 GB card use weight_dtype fp8_e4m3fn and ComfyUI's partial "
                "loading does the rest.")


def tagmoe_loader(g, pos):
    return g.add("TagMoELoadDiffusionModel", pos, [NATIVE_WEIGHTS, "default"], outputs=[("model", "MODEL")],
                 size=(360, 200))


def clip_loader(g, pos):
    return g.add("CLIPLoader", pos, [CLIP, "qwen_image", "default"], outputs=[("CLIP", "CLIP")], size=(360, 110))


def clip_text(g, pos, text, title):
    return g.add("CLIPTextEncode", pos, [text], inputs=[("clip", "CLIP", False)],
                 outputs=[("CONDITIONING", "CONDITIONING")], size=(360, 160), title=title)


def vae_loader(g, pos):
    return g.add("VAELoader", pos, [VAE], outputs=[("VAE", "VAE")], size=(360, 60))


def edit_conditioning(g, pos, region=""):
    return g.add("TagMoEEditConditioning", pos, [0, 0, region],
                 inputs=[("positive", "CONDITIONING", False), ("negative", "CONDITIONING", False),
                         ("vae", "VAE", False), ("image", "IMAGE", False), ("mask", "MASK", True)],
                 outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
                 size=(340, 200))


def custom_sampling(g, x, y, steps=30, cfg=4.0, seed=1234):
    """TAG-MoE Scheduler + CFG Guider + Noise + euler -> SamplerCustomAdvanced (the reference's sampling)."""
    guider = g.add("TagMoECFGGuider", (x, y), [cfg], inputs=[("model", "MODEL", False),
                                                             ("positive", "CONDITIONING", False),
                                                             ("negative", "CONDITIONING", False)],
                   outputs=[("guider", "GUIDER")], size=(300, 110))
    sched = g.add("TagMoEScheduler", (x, y + 170), [steps, 1.0, 1024, 1024], inputs=[("latent", "LATENT", True)],
                  outputs=[("sigmas", "SIGMAS")], size=(300, 150))
    noise = g.add("TagMoENoise", (x, y + 380), [seed, "randomize", "reference (model device and dtype)"],
                  inputs=[("model", "MODEL", False)], outputs=[("noise", "NOISE")], size=(300, 130))
    select = g.add("KSamplerSelect", (x, y + 570), ["euler"], outputs=[("SAMPLER", "SAMPLER")], size=(300, 60))
    sampler = g.add("SamplerCustomAdvanced", (x + 360, y),  [], inputs=[("noise", "NOISE", False),
                                                                          ("guider", "GUIDER", False),
                                                                          ("sampler", "SAMPLER", False),
                                                                          ("sigmas", "SIGMAS", False),
                                                                          ("latent_image", "LATENT", False)],
                    outputs=[("output", "LATENT"), ("denoised_output", "LATENT")], size=(300, 330))
    for a, out_name, b, in_name in ((guider, "guider", sampler, "guider"), (sched, "sigmas", sampler, "sigmas"),
                                    (noise, "noise", sampler, "noise"), (select, "SAMPLER", sampler, "sampler")):
        g.link(a, out_name, b, in_name)
    return guider, sched, noise, sampler


def vae_decode(g, pos):
    return g.add("VAEDecode", pos, [], inputs=[("samples", "LATENT", False), ("vae", "VAE", False)],
                 outputs=[("IMAGE", "IMAGE")], size=(220, 50))


def _native_edit(name: str, prompt: str, prefix: str, note_text: str, *, region: str = "", lora: bool = False,
                 steps: int = 30, cfg: float = 4.0) -> Graph:
    """Load CLIP + Load VAE + TAG-MoE Load Diffusion Model + CLIP Text Encode + TAG-MoE Edit Conditioning +
    SamplerCustomAdvanced (TAG-MoE Scheduler / CFG Guider / Noise) + VAE Decode."""
    g = Graph(name)
    model = tagmoe_loader(g, (40, 80))
    clip = clip_loader(g, (40, 340))
    vae = vae_loader(g, (40, 510))
    image = load_image(g, (40, 630))
    pos = clip_text(g, (440, 80), prompt, "Instruction")
    neg = clip_text(g, (440, 300), NEGATIVE, "Negative prompt")
    cond = edit_conditioning(g, (860, 80), region)
    x = 1260
    if lora:
        lora_node = g.add("TagMoELoraLoader", (860, 360), [LIGHTNING, 1.0], inputs=[("model", "MODEL", False)],
                          outputs=[("model", "MODEL"), ("report", "STRING")], size=(340, 130))
        g.link(model, "model", lora_node, "model")
        model_out = (lora_node, "model")
    else:
        model_out = (model, "model")
    guider, sched, noise, sampler = custom_sampling(g, x, 80, steps=steps, cfg=cfg)
    decode_node = vae_decode(g, (x + 720, 80))
    save = save_image(g, (x + 720, 200), prefix)
    note(g, (440, 800) if lora else (440, 560), note_text, size=(760, 300))  # the LoRA report grows its node
    for a, out_name, b, in_name in (
            (clip, "CLIP", pos, "clip"), (clip, "CLIP", neg, "clip"), (pos, "CONDITIONING", cond, "positive"),
            (neg, "CONDITIONING", cond, "negative"), (vae, "VAE", cond, "vae"), (image, "IMAGE", cond, "image"),
            (*model_out, guider, "model"), (*model_out, noise, "model"), (cond, "positive", guider, "positive"),
            (cond, "negative", guider, "negative"), (cond, "latent", sched, "latent"),
            (cond, "latent", sampler, "latent_image"), (sampler, "output", decode_node, "samples"),
            (vae, "VAE", decode_node, "vae"), (decode_node, "IMAGE", save, "images")):
        g.link(a, out_name, b, in_name)
    return g


def native_edit() -> Graph:
    return _native_edit(
        "01 Edit an image", EDIT_PROMPT, "TAG-MoE/edit",
        "**Edit an image with TAG-MoE.** TAG-MoE Edit Conditioning prepares the picture as the TAG-MoE reference "
        "does (nearest Qwen-Image resolution, Lanczos) and attaches it to both prompts; TAG-MoE Scheduler, CFG "
        "Guider and Noise sample as the reference does (30 steps, true CFG 4 with per-token rescale). The result "
        "has the input's preferred bucket size.\n\n" + NATIVE_SETUP)


def native_region_edit() -> Graph:
    return _native_edit(
        "03 Edit a region", REGION_PROMPT, "TAG-MoE/region",
        "**Edit only a region.** The `region` on TAG-MoE Edit Conditioning (x1,y1,x2,y2 as fractions of the "
        "image) picks the part of the picture that conditions the edit. To paint it instead: right-click the "
        "image, *Open in MaskEditor*, paint, save, and connect Load Image's MASK to the conditioning's `mask` "
        "(the mask's bounding box is used; it takes precedence over `region`).\n\n" + NATIVE_SETUP,
        region="0.3,0.15,0.7,0.85")


def native_lora_edit() -> Graph:
    return _native_edit(
        "04 Edit with a Lightning LoRA", EDIT_PROMPT, "TAG-MoE/lora",
        f"**A Qwen-Image LoRA on TAG-MoE.** `models/loras/{LIGHTNING}` (8 steps, cfg 1). TAG-MoE LoRA Loader "
        "applies it like Load LoRA and says which keys it could not apply: a Qwen-Image LoRA has weights for "
        "the dense FFN of blocks 50-59, which TAG-MoE replaced with experts. ComfyUI's own Load LoRA works too "
        "(it only logs those keys).\n\n" + NATIVE_SETUP, lora=True, steps=8, cfg=1.0)


def native_text_to_image() -> Graph:
    g = Graph("02 Text to image with KSampler")
    model = tagmoe_loader(g, (40, 80))
    clip = clip_loader(g, (40, 340))
    vae = vae_loader(g, (40, 510))
    pos = clip_text(g, (440, 80), T2I_PROMPT, "Prompt")
    neg = clip_text(g, (440, 300), NEGATIVE, "Negative prompt")
    patch = g.add("TagMoECFG", (860, 80), [], inputs=[("model", "MODEL", False)], outputs=[("model", "MODEL")],
                  size=(300, 50))
    latent = g.add("EmptySD3LatentImage", (860, 200), [1024, 1024, 1], outputs=[("LATENT", "LATENT")],
                   size=(300, 110))
    ks = g.add("KSampler", (1220, 80), [1234, "randomize", 30, 4.0, "euler", "simple", 1.0],
               inputs=[("model", "MODEL", False), ("positive", "CONDITIONING", False),
                       ("negative", "CONDITIONING", False), ("latent_image", "LATENT", False)],
               outputs=[("LATENT", "LATENT")], size=(320, 480))
    decode_node = vae_decode(g, (1600, 80))
    save = save_image(g, (1600, 200), "TAG-MoE/t2i")
    note(g, (440, 560), "**Text to image with KSampler.** TAG-MoE CFG makes KSampler combine the prompts with the "
                        "reference's true CFG (per-token rescale). KSampler's schedule comes from the model's flow "
                        "shift (TAG-MoE's loader sets the reference's value at 1024x1024); for the reference's exact "
                        "schedule use SamplerCustomAdvanced with TAG-MoE Scheduler, as in '01 Edit an image'."
                        "\n\n" + NATIVE_SETUP, size=(700, 300))
    for a, out_name, b, in_name in ((clip, "CLIP", pos, "clip"), (clip, "CLIP", neg, "clip"),
                                    (model, "model", patch, "model"), (patch, "model", ks, "model"),
                                    (pos, "CONDITIONING", ks, "positive"), (neg, "CONDITIONING", ks, "negative"),
                                    (latent, "LATENT", ks, "latent_image"), (ks, "LATENT", decode_node, "samples"),
                                    (vae, "VAE", decode_node, "vae"), (decode_node, "IMAGE", save, "images")):
        g.link(a, out_name, b, in_name)
    return g


def native_task_intent() -> Graph:
    g = _native_edit("05 Task tags and routing map", EDIT_PROMPT, "TAG-MoE/intent",
                     "**Task intent on the native model.** TAG-MoE Task Tags describes the edit (scope, types, "
                     "preservations); TAG-MoE Tag Guidance steers the MoE routers toward the gate mix that best "
                     "expresses them (0 = the release's behaviour); TAG-MoE Record Routing records every routing "
                     "decision of the run, and TAG-MoE Routing Map shows where each expert worked and how well the "
                     "routing matches the tags.\n\n" + NATIVE_SETUP)
    nodes = {n["type"]: n for n in g.nodes}
    model, guider, noise = nodes["TagMoELoadDiffusionModel"], nodes["TagMoECFGGuider"], nodes["TagMoENoise"]
    # re-route the model through Tag Guidance and Record Routing
    for target in (guider, noise):
        link_id = next(i["link"] for i in target["inputs"] if i["name"] == "model")
        g.links = [link for link in g.links if link[0] != link_id]
        model["outputs"][0]["links"].remove(link_id)
        next(i for i in target["inputs"] if i["name"] == "model")["link"] = None
    tags = g.add("TagMoETaskTags", (40, 1000), ["manual", "local editing",
                                                "attribute editing, identity preservation, background preservation, "
                                                "style preservation", True],
                 inputs=[("instruction", "STRING", True), ("model", "TAGMOE_MODEL", True), ("image", "IMAGE", True)],
                 outputs=[("tags", "TAGMOE_TAGS"), ("tags_text", "STRING")], size=(380, 460))
    guidance = g.add("TagMoETagGuidance", (480, 1000), [0.5], inputs=[("model", "MODEL", False),
                                                                       ("tags", "TAGMOE_TAGS", False)],
                     outputs=[("model", "MODEL")], size=(320, 110))
    record = g.add("TagMoERecordRouting", (480, 1180), [], inputs=[("model", "MODEL", False)],
                   outputs=[("model", "MODEL"), ("routing", "TAGMOE_ROUTING")], size=(320, 70))
    image = nodes["LoadImage"]
    save = nodes["SaveImage"]
    decoded = nodes["VAEDecode"]
    routing = routing_map(g, (1980, 600), (400, 420))
    maps = g.add("PreviewImage", (2440, 600), [], inputs=[("images", "IMAGE", False)], size=(420, 320))
    for a, out_name, b, in_name in ((model, "model", guidance, "model"), (tags, "tags", guidance, "tags"),
                                    (guidance, "model", record, "model"), (record, "model", guider, "model"),
                                    (record, "model", noise, "model"), (record, "routing", routing, "routing"),
                                    (decoded, "IMAGE", routing, "image"), (image, "IMAGE", routing, "condition_image"),
                                    (tags, "tags", routing, "tags"), (routing, "maps", maps, "images")):
        g.link(a, out_name, b, in_name)
    assert save is not None
    return g


EMBEDDED = "tiny-shapes (embedded)"  # nodes.comfy_bridge.EMBEDDED_MODEL: the trained tiny model the pack ships
TRY_PICTURE = "A yellow circle on a purple background"
TRY_EDITS = (("Remove the circle", "TAG-MoE/try-remove"), ("Turn the whole image black and white", "TAG-MoE/try-gray"))


def try_it() -> Graph:
    """The shipped tiny model, nothing downloaded: draw a picture, then edit it twice, with routing maps."""
    g = Graph("00 Try it - tiny shapes model, no download")
    # on the CPU: the model is 12 MB, and the seed draws the same noise (the pictures the tests judge) everywhere
    m = loader(g, (40, 80), base=EMBEDDED, weights=EMBEDDED, device="cpu", dtype="fp32")
    note(g, (40, 680), "**Try the pack with nothing to download.** `tiny-shapes (embedded)` is a 3.5 M-parameter "
                       "TAG-MoE shipped with the pack (4 experts in its last 2 blocks), trained on 64x64 pictures of "
                       "circles, squares and triangles. It checks the machinery, not TAG-MoE's quality. On "
                       "one-object pictures it removes an object, turns the picture black and white or inverts it "
                       "(*Remove the triangle*, *Turn the whole image black and white*, *Invert the colours of the "
                       "whole image*). Recolouring (*Make the circle red*) and background changes (*Make the "
                       "background green*) succeed in about half the cases for shape-colour pairs it has not "
                       "seen (training never saw a green circle, a purple square, a yellow triangle, red on blue "
                       "or white on black), adding (*Add a blue square*) and drawing without an input (*A blue "
                       "square on a yellow background*) in 10-15% (the shape comes out as a blob); local edits "
                       "of a two-object picture mostly fail. Keep 64x64 and cfg 1 (it never learnt the empty "
                       "prompt). It runs on the CPU; loading it releases a model this loader holds.\n\nThe first "
                       "row draws a picture; the two below edit it. The routing maps show which expert worked "
                       "where: the removal and the black-and-white use different experts.", size=(360, 600))
    pictures = None
    rows = ((TRY_PICTURE, None),) + TRY_EDITS
    for row, (prompt, prefix) in enumerate(rows):
        y = 80 + 760 * row
        t = text_encode(g, (440, y), prompt)
        s = sampler(g, (860, y), width=64, height=64, seed=0, steps=20, cfg=1.0, record=prefix is not None,
                    control="fixed")
        d = decode(g, (1240, y))
        for a, out_name, b, in_name in ((m, "model", t, "model"), (m, "model", s, "model"), (m, "model", d, "model"),
                                        (t, "conditioning", s, "conditioning"), (s, "latent", d, "latent")):
            g.link(a, out_name, b, in_name)
        if prefix is None:
            pictures = d
            shown = g.add("PreviewImage", (1540, y), [], inputs=[("images", "IMAGE", False)], size=(300, 320),
                          title="The drawn picture")
            g.link(d, "image", shown, "images")
            continue
        g.link(pictures, "image", s, "image")
        out = save_image(g, (1540, y), prefix)
        routing = routing_map(g, (1880, y), (360, 420))
        maps = g.add("PreviewImage", (2280, y), [], inputs=[("images", "IMAGE", False)], size=(420, 320))
        for a, out_name, b, in_name in ((d, "image", out, "images"), (s, "routing", routing, "routing"),
                                        (m, "model", routing, "model"), (d, "image", routing, "image"),
                                        (pictures, "image", routing, "condition_image"),
                                        (routing, "maps", maps, "images")):
            g.link(a, out_name, b, in_name)
    return g


DISPLAY = {"TagMoEModelLoader": "TAG-MoE Model Loader", "TagMoETextEncode": "TAG-MoE Text Encode",
           "TagMoESampler": "TAG-MoE Sampler", "TagMoEDecode": "TAG-MoE Decode", "TagMoETaskTags": "TAG-MoE Task Tags",
           "TagMoEPromptRefine": "TAG-MoE Prompt Refine", "TagMoERoutingMap": "TAG-MoE Routing Map",
           "TagMoELoadDiffusionModel": "TAG-MoE Load Diffusion Model", "TagMoEEditConditioning": "TAG-MoE Edit Cond.",
           "TagMoEScheduler": "TAG-MoE Scheduler", "TagMoECFGGuider": "TAG-MoE CFG Guider", "TagMoECFG": "TAG-MoE CFG",
           "TagMoENoise": "TAG-MoE Noise", "TagMoELoraLoader": "TAG-MoE LoRA Loader",
           "TagMoETagGuidance": "TAG-MoE Tag Guidance", "TagMoERecordRouting": "TAG-MoE Record Routing"}


def task_intent() -> Graph:
    g = Graph("15 Diffusers folder - task intent")
    m = loader(g, (40, 80))
    img = load_image(g, (40, 680))
    refine = g.add("TagMoEPromptRefine", (440, 80), [EDIT_PROMPT, "TAG-MoE text encoder", 0, "fixed", 0.0, 160, "",
                                                      "http://127.0.0.1:8000/v1", "", "OPENAI_API_KEY", 60.0, 2],
                   inputs=[("image", "IMAGE", False), ("model", "TAGMOE_MODEL", True)],
                   outputs=[("instruction", "STRING"), ("proposed_tags", "TAGMOE_TAGS"),
                            ("proposed_tags_text", "STRING")], size=(360, 620))
    tags = g.add("TagMoETaskTags", (860, 360), ["auto (rules)", "local editing",
                                                "identity preservation, background preservation, style preservation",
                                                True],
                 inputs=[("instruction", "STRING", True), ("model", "TAGMOE_MODEL", True), ("image", "IMAGE", True)],
                 outputs=[("tags", "TAGMOE_TAGS"), ("tags_text", "STRING")], size=(360, 480))
    t = text_encode(g, (860, 80), EDIT_PROMPT, prompt_input=True)
    s = sampler(g, (1260, 80), guidance=1.0, record=True)
    d = decode(g, (1640, 80))
    out = save_image(g, (1940, 80), "TAG-MoE/intent")
    routing = routing_map(g, (1640, 480), (360, 420))
    maps = g.add("PreviewImage", (2040, 480), [], inputs=[("images", "IMAGE", False)], size=(420, 320))
    note(g, (40, 1060), "**Task intent**: the VLM (here TAG-MoE's own text encoder) rewrites the instruction while "
                       "looking at the image; the Task Tags node tags the refined instruction; tag_guidance steers "
                       "the MoE routers toward the gate mix that best expresses those tags (0 = the release's "
                       "behaviour); the Routing Map shows where each expert worked and how well the routing "
                       "matches the tags.\n\n" + SETUP, size=(760, 220))
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


BUILDERS = (try_it, native_edit, native_text_to_image, native_region_edit, native_lora_edit, native_task_intent,
            instruction_edit, text_to_image, region_edit, native_latent_chain, task_intent)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for stale in list(OUT.glob("*.json")) + list(OUT.glob("*.jpg")):
        stale.unlink()
    for build in BUILDERS:
        graph = build()
        data = graph.to_json()
        (OUT / f"{graph.name}.json").write_text(json.dumps(data, indent=2) + "\n")
        thumbnail(data, OUT / f"{graph.name}.jpg")
        print(f"wrote {OUT.name}/{graph.name}.json (+ .jpg)", file=sys.stderr)


if __name__ == "__main__":
    main()
