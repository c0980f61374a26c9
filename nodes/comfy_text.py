"""A diffusers Qwen-Image folder's text encoder as a ComfyUI-managed model (part of the door to
ComfyUI; imported when the node runs). Its output is native CONDITIONING: the reference's template
and prefix drop (``tagmoe_core.pipeline.text_encoding``), the hidden states in float32."""

from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.model_patcher
import torch

from ..tagmoe_core.pipeline.text_encoding import encode_prompts, normalize_negative_prompt

log = logging.getLogger("tagmoe")


class _Holder(torch.nn.Module):
    """ModelPatcher writes attributes such as ``device`` on its model; transformers' models have a
    read-only ``device``, so ComfyUI manages this holder and the encoder moves with it."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder


class DiffusersTextEncoder:
    def __init__(self, patcher, tokenizer):
        self.patcher, self.tokenizer = patcher, tokenizer

    @classmethod
    def load(cls, folder: str) -> "DiffusersTextEncoder":
        from ..tagmoe_core.pipeline.components import load_text_encoder, load_tokenizer

        device, offload = mm.text_encoder_device(), mm.text_encoder_offload_device()
        # what the reference uses: bf16 where the device has it, else fp32 (Qwen2.5-VL overflows in
        # fp16; ComfyUI's --*-unet dtype flags are for the diffusion model, not this)
        dtype = torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
        encoder = load_text_encoder(folder, dtype, torch.device(offload))
        patcher = comfy.model_patcher.ModelPatcher(_Holder(encoder), load_device=device, offload_device=offload)
        return cls(patcher, load_tokenizer(folder))

    @torch.inference_mode()
    def encode(self, text: str) -> list:
        # A transformers model has none of ComfyUI's cast-on-forward layers, so it runs whole on one
        # device: the GPU when it fits there (ComfyUI frees room first), else where it is kept.
        if self.patcher.model_size() < mm.get_total_memory(self.patcher.load_device) * 0.9:
            mm.load_models_gpu([self.patcher], force_full_load=True)
        else:
            log.warning("the diffusers text encoder (%.1f GiB) does not fit %s: encoding on %s",
                        self.patcher.model_size() / 2**30, self.patcher.load_device, self.patcher.offload_device)
        embeds = encode_prompts(self.patcher.model.encoder, self.tokenizer, [normalize_negative_prompt(text)])
        return [[embeds.embeds.float().to(mm.intermediate_device()), {}]]
