"""TAG-MoE Edit Conditioning and TAG-MoE Text Encode (diffusers): what a native TAG-MoE graph
feeds its sampler. The first prepares the image exactly as the reference does and attaches it as
the reference latent; the second turns a diffusers Qwen-Image folder's text encoder into CONDITIONING."""

from __future__ import annotations

import torch

from ...tagmoe_core.errors import InputError
from ...tagmoe_core.pipeline.buckets import target_size
from ...tagmoe_core.pipeline.condition import condition_pixels
from ...tagmoe_core.pipeline.regions import box_from_fractions, mask_box, region_from_pixel_box
from .. import comfy_bridge as bridge
from ..conversions import image_batch_to_pil, mask_batch

NO_BASE = "(no Qwen-Image folder in models/diffusers)"


def _with_reference(conditioning, latent: torch.Tensor, region):
    from ..comfy_positions import REGION_KEY  # the TAG-MoE model reads the region under this key

    out = []
    for embeds, options in conditioning:
        options = {k: v for k, v in options.items() if k != REGION_KEY}
        options.update(reference_latents=[latent], reference_latents_method="index")
        if region is not None:
            options[REGION_KEY] = region
        out.append([embeds, options])
    return out


class TagMoEEditConditioning:
    DESCRIPTION = ("Prepares an edit as the TAG-MoE reference does: the image on white (transparency), resized "
                   "(Lanczos) to the preferred Qwen-Image resolution nearest its aspect ratio, VAE-encoded and "
                   "attached to both prompts as the reference latent (RoPE frame 1). Gives the empty latent to "
                   "denoise at that size. With a mask, only the mask's bounding box of the image conditions the "
                   "edit (region edit).")
    CATEGORY = "TAG-MoE"
    FUNCTION = "prepare"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("the instruction with the image attached", "the negative prompt with the image attached",
                       "an empty latent at the edit's size (for the sampler and TAG-MoE Scheduler)")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "the instruction (CLIP Text Encode, qwen_image CLIP)"}),
                "negative": ("CONDITIONING", {"tooltip": "the negative prompt (the reference encodes an empty one "
                                                         "as a single space)"}),
                "vae": ("VAE", {"tooltip": "the Qwen-Image VAE (Load VAE: qwen_image_vae.safetensors)"}),
                "image": ("IMAGE", {"tooltip": "the image to edit (a batch edits each image)"}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "region edit: its bounding box is the part of the image that conditions "
                                             "the edit (white = region); leave unconnected for a whole-image edit"}),
                "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16,
                                  "tooltip": "output width (multiple of 16); 0 = the image's preferred bucket"}),
                "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16,
                                   "tooltip": "output height (multiple of 16); 0 = as for width"}),
                "region": ("STRING", {"default": "", "tooltip": (
                    "region edit without a mask: x1,y1,x2,y2 as fractions of the image (e.g. 0.25,0.25,0.75,0.75); "
                    "a connected mask takes precedence; empty = the whole image")}),
            },
        }

    def prepare(self, positive, negative, vae, image, mask=None, width=0, height=0, region=""):
        pictures = image_batch_to_pil(image)
        if (width == 0) != (height == 0):
            raise InputError("set both width and height, or leave both at 0 (the image's preferred bucket)")
        width, height = target_size(pictures[0], width or None, height or None)
        size = pictures[0].size
        masks = mask_batch(mask) if mask is not None else None
        if masks is not None and masks.shape[0] not in (1, len(pictures)):
            raise InputError(f"{masks.shape[0]} masks for {len(pictures)} images: give one mask, or one per image")
        boxes = {region_from_pixel_box(mask_box(m, size), size, (width, height)) for m in masks} \
            if masks is not None else set()
        if len(boxes) > 1:
            raise InputError(f"{len(boxes)} different mask regions in one batch: a run edits one region; split the "
                             "batch or use one mask")
        fraction_box = box_from_fractions(region, size) if not boxes else None
        if fraction_box is not None:
            boxes.add(region_from_pixel_box(fraction_box, size, (width, height)))
        region = (height // 16, width // 16, boxes.pop()) if boxes else None
        latents = []
        for picture in pictures:
            bridge.check_interrupt()
            latents.append(vae.encode(condition_pixels(picture, width, height)))  # one image at a time: no frames
        latent = torch.cat(latents)
        if latent.ndim == 4:
            latent = latent[:, :, None]
        if region is not None:
            x1, y1, x2, y2 = region[2]
            latent = latent[..., 2 * y1:2 * (y2 + 1), 2 * x1:2 * (x2 + 1)]
        empty = torch.zeros((len(pictures), 16, 1, height // 8, width // 8), device=bridge.intermediate_device())
        return (_with_reference(positive, latent, region), _with_reference(negative, latent, region),
                {"samples": empty})


_encoders: dict[tuple[str, str], object] = {}  # one diffusers text encoder stays loaded (as a ComfyUI model)


class TagMoETextEncodeDiffusers:
    DESCRIPTION = ("Encodes a prompt with the text encoder of a diffusers Qwen-Image folder (the reference's "
                   "template and 34-token drop) into CONDITIONING for the native TAG-MoE model. For users of the "
                   "diffusers folder and the tiny test model; with ComfyUI's split files use Load CLIP (type "
                   "qwen_image) and CLIP Text Encode instead.")
    CATEGORY = "TAG-MoE"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("the encoded prompt",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "base_model": (bridge.list_diffusers_models() or [NO_BASE], {
                    "tooltip": "a diffusers Qwen-Image folder (model_index.json, text_encoder/, tokenizer/) in "
                               "models/diffusers"}),
                "text": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "the prompt; an empty one is encoded as a single space, as the reference does for its "
                    "negative prompt")}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, base_model):
        try:
            bridge.resolve_model("diffusers", base_model)
        except FileNotFoundError:
            return f"the diffusers Qwen-Image folder was not found in models/diffusers (got '{base_model}')"
        return True

    def encode(self, base_model, text):
        from ..comfy_text import DiffusersTextEncoder

        folder = str(bridge.resolve_model("diffusers", base_model))
        key = (folder, "text_encoder")
        encoder = _encoders.get(key)
        if encoder is None:
            _encoders.clear()
            encoder = _encoders[key] = DiffusersTextEncoder.load(folder)
        return (encoder.encode(text),)
