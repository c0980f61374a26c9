"""TAG-MoE Load Diffusion Model: TAG-MoE weights -> ComfyUI MODEL (ComfyUI manages its memory)."""

from __future__ import annotations

from .. import comfy_bridge as bridge

WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]  # as ComfyUI's Load Diffusion Model
NO_WEIGHTS = "(no TAG-MoE weights in models/diffusion_models or models/tagmoe)"


class TagMoELoadDiffusionModel:
    DESCRIPTION = ("Loads TAG-MoE weights as a ComfyUI MODEL: ComfyUI's Qwen-Image model with the MoE layers, "
                   "built and loaded the way ComfyUI's own Load Diffusion Model builds Qwen-Image, so KSampler, "
                   "SamplerCustomAdvanced, LoRA loaders, TorchCompileModel and ComfyUI's memory management apply. "
                   "Memory: on ComfyUI with dynamic VRAM (newer ComfyUI on NVIDIA, on by default) ComfyUI streams "
                   "the weights to the GPU as needed and --lowvram does nothing; --reserve-vram and fp8 apply. On "
                   "ComfyUI 0.3.x-0.10, or with --disable-dynamic-vram: partial loading, --lowvram, --novram, "
                   "--reserve-vram and fp8. Do not load TAG-MoE files with ComfyUI's own Load Diffusion Model: it "
                   "drops the experts and leaves those layers uninitialised.")
    CATEGORY = "TAG-MoE"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("TAG-MoE as a Qwen-Image MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "weights": (bridge.list_tagmoe_weights() or [NO_WEIGHTS], {"tooltip": (
                    "a TAG-MoE file or folder in models/diffusion_models or models/tagmoe: one .safetensors (e.g. "
                    "from 'tagmoe convert'), a quantized .gguf ('tagmoe convert SRC OUT.gguf --quant Q4_0'), or "
                    "the release's folder with its *.index.json and shards")}),
                "weight_dtype": (WEIGHT_DTYPES, {"default": "default", "tooltip": (
                    "how the weights are stored: default keeps the file's (bf16) or what ComfyUI picks for the "
                    "device; fp8 halves the GPU memory, and the host memory on ComfyUI without dynamic VRAM "
                    "(e4m3fn_fast also uses fp8 matmuls where the GPU has them)")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, weights):
        return bridge.weights_missing(weights)

    def load(self, weights, weight_dtype="default", unique_id=None):
        from ..comfy_model import load_tagmoe_model

        path = bridge.resolve_model("tagmoe", weights)
        progress = bridge.Progress(100, unique_id)
        loaded = load_tagmoe_model(path, weight_dtype,
                                   progress=lambda done, total: progress.update(int(100 * done / max(total, 1))))
        return {"ui": {"text": [loaded.summary()]}, "result": (loaded.patcher,)}
