"""TAG-MoE Text Encode: prompts -> TAGMOE_CONDITIONING (kept apart so a new seed does not re-encode)."""

from __future__ import annotations

import logging

from ..conversions import image_batch_to_pil

log = logging.getLogger("tagmoe")


class TagMoETextEncode:
    DESCRIPTION = "Encodes the instruction and the negative prompt with TAG-MoE's Qwen2.5-VL text encoder."
    CATEGORY = "TAG-MoE"
    FUNCTION = "encode"
    RETURN_TYPES = ("TAGMOE_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("encoded prompts for the TAG-MoE Sampler",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TAGMOE_MODEL", {"tooltip": "from TAG-MoE Model Loader"}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "the edit instruction (or, without an image, the picture to make)"}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "what to avoid; empty is encoded as ' ', as the reference"}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "let the text encoder also see this image (the reference's use_vlm "
                                               "variant); leave unconnected for the release's default"}),
            },
        }

    def encode(self, model, prompt, negative_prompt="", image=None):
        pipe = model.require()
        picture = image_batch_to_pil(image)[0] if image is not None else None
        conditioning = pipe.encode(prompt, negative_prompt, picture)
        if not str(prompt).strip():
            warning = "warning: the prompt is empty: the model gets no instruction (write the edit, or the picture)"
            log.warning("TAG-MoE Text Encode: %s", warning.removeprefix("warning: "))
            return {"ui": {"text": [warning]}, "result": (conditioning,)}
        return (conditioning,)
