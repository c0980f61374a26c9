"""TAG-MoE LoRA Loader: a Qwen-Image LoRA on the TAG-MoE MODEL, saying what it could not apply."""

from __future__ import annotations

from ...tagmoe_core.pipeline.checks import check_number
from .. import comfy_bridge as bridge

NO_LORAS = "(no LoRA files in models/loras)"


class TagMoELoraLoader:
    DESCRIPTION = ("Applies a LoRA (e.g. a Qwen-Image Lightning LoRA) to the TAG-MoE MODEL, like Load LoRA (model "
                   "only), and reports by name the keys it could not apply: a Qwen-Image LoRA's keys for the dense "
                   "FFN of the MoE blocks have no layer in TAG-MoE (the experts replaced it).")
    CATEGORY = "TAG-MoE"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "from TAG-MoE Load Diffusion Model"}),
                "lora_name": (bridge.list_files("loras") or [NO_LORAS], {"tooltip": "a LoRA in models/loras"}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                             "tooltip": "how strongly the LoRA applies (1 = as trained)"}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        try:
            bridge.file_path("loras", lora_name)
        except FileNotFoundError:
            return f"the LoRA was not found in models/loras (got '{lora_name}')"
        return True

    def load(self, model, lora_name, strength_model):
        from ..comfy_lora import apply_lora

        strength_model = check_number("strength_model", strength_model)
        if strength_model == 0:
            return {"ui": {"text": ["strength 0: LoRA not applied"]}, "result": (model, "strength 0: not applied")}
        patched, report = apply_lora(model, str(bridge.file_path("loras", lora_name)), float(strength_model))
        text = f"{lora_name}: " + report.text()
        return {"ui": {"text": [text]}, "result": (patched, text)}
