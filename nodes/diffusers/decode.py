"""TAG-MoE Decode: LATENT -> IMAGE with the model's Qwen-Image VAE."""

from __future__ import annotations

import torch
from PIL import Image

from ...tagmoe_core.errors import InputError
from .. import comfy_bridge as bridge
from ..conversions import ORIGINAL_SIZE_KEY, latent_to_batch, pil_to_image_batch

TILED = {"auto": None, "always": True, "never": False}


class TagMoEDecode:
    DESCRIPTION = "Decodes Qwen-Image latents to images with the VAE of the loaded TAG-MoE model."
    CATEGORY = "TAG-MoE"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("decoded images [batch, height, width, 3]",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TAGMOE_MODEL", {"tooltip": "from TAG-MoE Model Loader (its VAE decodes)"}),
                "latent": ("LATENT", {"tooltip": "from TAG-MoE Sampler, or any Qwen-Image LATENT"}),
                "keep_original_size": ("BOOLEAN", {"default": False, "tooltip": "resize (Lanczos) back to the size "
                                                                                "of the edited input image"}),
            },
            "optional": {
                "original_image": ("IMAGE", {"tooltip": "the size to restore with keep_original_size (default: "
                                                        "the size the sampler recorded)"}),
                "tiled": (list(TILED), {"default": "auto", "tooltip": "decode in overlapping 256 px tiles (a "
                                                                      "fraction of the memory). auto: whole, and in "
                                                                      "tiles if the GPU runs out of memory"}),
            },
        }

    def decode(self, model, latent, keep_original_size=False, original_image=None, tiled="auto"):
        if tiled not in TILED:
            raise InputError(f"tiled must be one of {', '.join(TILED)}, got {tiled!r}")
        pipe = model.require()
        samples = latent_to_batch(latent)
        sizes = None
        if keep_original_size:  # checked before decoding: a refusal should not cost a decode
            if original_image is not None:
                sizes = [(original_image.shape[2], original_image.shape[1])] * samples.shape[0]
            else:
                sizes = latent.get(ORIGINAL_SIZE_KEY)
                if not sizes or len(sizes) != samples.shape[0] or any(s is None for s in sizes):
                    raise InputError("keep_original_size needs the original image: connect it to original_image "
                                     "(this latent does not carry the input's size)")
            if len({tuple(s) for s in sizes}) > 1:
                raise InputError("the images of this batch had different original sizes; decode them separately")
        images = torch.cat([pipe.decode(samples[i:i + 1], TILED[tiled]) for i in range(samples.shape[0])])
        if sizes is None:
            return (images,)
        resized = [im.resize(tuple(size), Image.LANCZOS) for im, size in zip(pipe.to_pil(images), sizes)]
        return (pil_to_image_batch(resized).to(bridge.intermediate_device()),)
