"""TAG-MoE Prompt Refine: image + instruction -> a precise instruction (and proposed tags), via a VLM."""

from __future__ import annotations

import contextlib

import torch

from ...tagmoe_core.errors import InputError
from .. import comfy_bridge as bridge
from ..conversions import image_batch_to_pil

BACKENDS = ["TAG-MoE text encoder", "local VLM folder", "OpenAI-compatible endpoint"]
_local_vlms: dict[str, object] = {}  # one local VLM kept loaded (by folder)


class TagMoEPromptRefine:
    DESCRIPTION = ("Rewrites an edit instruction with a vision-language model that looks at the image: precise, "
                   "self-contained, and naming what must stay unchanged. Refusals, empty or overlong answers keep "
                   "the original instruction.")
    CATEGORY = "TAG-MoE"
    FUNCTION = "refine"
    RETURN_TYPES = ("STRING", "TAGMOE_TAGS", "STRING")
    RETURN_NAMES = ("instruction", "proposed_tags", "proposed_tags_text")
    OUTPUT_TOOLTIPS = ("the refined instruction (or the original one)", "task tags the VLM proposed",
                       "the proposed tags as text")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "the image the instruction is about"}),
                "instruction": ("STRING", {"multiline": True, "default": "", "tooltip": "the user's instruction"}),
                "backend": (BACKENDS, {"default": BACKENDS[0], "tooltip": "who answers: the loaded TAG-MoE text "
                                                                           "encoder (no extra memory), another local "
                                                                           "VLM, or a chat endpoint"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "the same seed gives the same answer (with temperature > 0)"}),
                "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                          "tooltip": "0 = greedy (deterministic)"}),
                "max_new_tokens": ("INT", {"default": 160, "min": 16, "max": 1024,
                                           "tooltip": "longest answer, in tokens"}),
            },
            "optional": {
                "model": ("TAGMOE_MODEL", {"tooltip": "for the 'TAG-MoE text encoder' backend"}),
                "vlm_folder": ("STRING", {"default": "", "tooltip": "local VLM: a Qwen2/2.5-VL instruct folder"}),
                "endpoint_url": ("STRING", {"default": "http://127.0.0.1:8000/v1",
                                            "tooltip": "OpenAI-compatible base URL (…/v1)"}),
                "endpoint_model": ("STRING", {"default": "", "tooltip": "model name at the endpoint"}),
                "api_key_env": ("STRING", {"default": "OPENAI_API_KEY",
                                           "tooltip": "environment variable holding the API key (never stored)"}),
                "timeout": ("FLOAT", {"default": 60.0, "min": 1.0, "max": 600.0,
                                      "tooltip": "seconds to wait for one answer"}),
                "retries": ("INT", {"default": 2, "min": 0, "max": 10, "tooltip": "retries on errors and timeouts"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def refine(self, image, instruction, backend, seed, temperature, max_new_tokens, model=None, vlm_folder="",
               endpoint_url="", endpoint_model="", api_key_env="OPENAI_API_KEY", timeout=60.0, retries=2,
               unique_id=None):
        from ...tagmoe_core.intent.refine import LocalVLM, OpenAIChatVLM, TextEncoderVLM, refine_instruction

        visit = contextlib.nullcontext()
        if backend == BACKENDS[0]:
            if model is None:
                raise InputError("the 'TAG-MoE text encoder' backend needs the model: connect TAG-MoE Model Loader")
            pipe = model.require()
            visit = pipe.using("text_encoder")  # brings an offloaded encoder to the GPU for the chat
            vlm = TextEncoderVLM(pipe.text_encoder, pipe.tokenizer, pipe.vlm_image_processor)
        elif backend == BACKENDS[1]:
            if not vlm_folder.strip():
                raise InputError("set vlm_folder to a local vision-language model folder")
            if vlm_folder not in _local_vlms:
                _local_vlms.clear()
                device = bridge.execution_device()
                _local_vlms[vlm_folder] = LocalVLM(vlm_folder, device=device,
                                                   dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            vlm = _local_vlms[vlm_folder]
        else:
            if not endpoint_model.strip():
                raise InputError("set endpoint_model to the model name the endpoint serves")
            vlm = OpenAIChatVLM(endpoint_url, endpoint_model, api_key_env, timeout, retries)
        picture = image_batch_to_pil(image)[0]
        with visit:
            result = refine_instruction(vlm, instruction, picture, seed=seed, temperature=temperature,
                                        max_new_tokens=max_new_tokens)
        tags = result.tags.tags
        shown = [result.instruction] + [f"warning: {w}" for w in result.warnings]
        return {"ui": {"text": ["\n".join(shown)]}, "result": (result.instruction, tags, tags.to_text())}
