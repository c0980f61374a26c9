"""TAG-MoE Model Loader: base Qwen-Image + TAG-MoE weights -> TAGMOE_MODEL."""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass, field

import torch

from ..tagmoe_core.errors import TagMoEError
from ..tagmoe_core.moe import BACKENDS, effective_backend, moe_layers
from . import comfy_bridge as bridge

log = logging.getLogger("tagmoe")

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NO_BASE = "(no Qwen-Image folder in models/diffusers)"
NO_WEIGHTS = "(no TAG-MoE weights in models/tagmoe)"


@dataclass
class TagMoEModel:
    """What flows on a TAGMOE_MODEL link: the loaded pipeline and how it was placed."""

    pipe: object | None
    info: str
    key: tuple = ()
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def require(self):
        if self.pipe is None:
            raise TagMoEError("this TAG-MoE model was unloaded (another one was loaded since); "
                              "run the TAG-MoE Model Loader again")
        return self.pipe

    def release(self) -> None:
        self.pipe = None


_loaded: list[TagMoEModel] = []  # at most one model lives: a 22B model is not kept twice


def _release_all() -> None:
    for handle in _loaded:
        handle.release()
    _loaded.clear()
    gc.collect()
    bridge.empty_cache()


class TagMoEModelLoader:
    DESCRIPTION = ("Loads Qwen-Image with the TAG-MoE transformer (4-expert MoE in the last 10 image FFNs). "
                   "Stays loaded until an input changes.")
    CATEGORY = "TAG-MoE"
    FUNCTION = "load"
    RETURN_TYPES = ("TAGMOE_MODEL", "STRING")
    RETURN_NAMES = ("model", "placement")
    OUTPUT_TOOLTIPS = ("the loaded TAG-MoE model", "where and how it was placed (devices, dtype, MoE backend)")

    @classmethod
    def INPUT_TYPES(cls):
        bases = bridge.list_diffusers_models() or [NO_BASE]
        weights = bridge.list_tagmoe_weights() or [NO_WEIGHTS]
        return {
            "required": {
                "base_model": (bases, {"tooltip": "Qwen-Image in diffusers layout (a folder with model_index.json) "
                                                  "under models/diffusers"}),
                "tagmoe_weights": (weights, {"tooltip": "TAG-MoE weights under models/tagmoe or "
                                                        "models/diffusion_models: a .safetensors/.bin/.pt file, or a "
                                                        "folder with the weights or a *.index.json and its shards"}),
                "device": ("STRING", {"default": "auto", "tooltip": "'auto' (first GPU, else CPU), 'cpu', 'cuda:0', "
                                                                    "or '0,1' to split the transformer across GPUs"}),
                "dtype": (list(DTYPES), {"default": "auto", "tooltip": "auto: bf16 on GPUs, fp32 on the CPU"}),
                "moe_backend": (list(BACKENDS), {"default": "auto", "tooltip": "auto: MegaBlocks kernels on CUDA when "
                                                                               "installed, else plain PyTorch"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, base_model, tagmoe_weights):
        try:
            bridge.resolve_model("diffusers", base_model)
        except FileNotFoundError:
            return ("the base model was not found: put the Qwen-Image diffusers folder (model_index.json, "
                    f"transformer/, text_encoder/, ...) in models/diffusers and pick it (got '{base_model}')")
        try:
            bridge.resolve_model("tagmoe", tagmoe_weights)
        except FileNotFoundError:
            return ("the TAG-MoE weights were not found: put them in models/tagmoe (a file or a folder) "
                    f"and pick them (got '{tagmoe_weights}')")
        return True

    def load(self, base_model, tagmoe_weights, device="auto", dtype="auto", moe_backend="auto", unique_id=None):
        try:
            base = bridge.resolve_model("diffusers", base_model)
            weights = bridge.resolve_model("tagmoe", tagmoe_weights)
        except FileNotFoundError as exc:
            raise TagMoEError(str(exc)) from exc
        from ..tagmoe_core.loading import load_pipeline  # heavy (diffusers, transformers): not at ComfyUI start

        key = (str(base), str(weights), device, dtype, moe_backend)
        for handle in _loaded:
            if handle.key == key and handle.pipe is not None:
                return self._result(handle)
        def make_room() -> None:  # only once every check passed: a bad file keeps the current model
            _release_all()
            bridge.free_vram_for_external_model()
            bridge.send_text(unique_id, "loading TAG-MoE...")

        progress = bridge.Progress(100, unique_id)
        pipe = load_pipeline(base, weights, device=device, dtype=DTYPES[dtype], backend=moe_backend,
                             progress=lambda done, total: progress.update(int(100 * done / max(total, 1))),
                             before_load=make_room)
        handle = TagMoEModel(pipe, placement_text(pipe), key)
        _loaded.append(handle)
        log.info("TAG-MoE loaded:\n%s", handle.info)
        return self._result(handle)

    @staticmethod
    def _result(handle: TagMoEModel):
        return {"ui": {"text": [handle.info]}, "result": (handle, handle.info)}


def placement_text(pipe) -> str:
    report = pipe.load_report
    backend = {effective_backend(layer) for layer in moe_layers(pipe.transformer)} or {"-"}
    lines = [
        f"transformer: {report.devices}",
        f"text encoder: {next(pipe.text_encoder.parameters()).device}",
        f"VAE: {next(pipe.vae.parameters()).device}",
        f"dtype: {str(report.dtype).removeprefix('torch.')}",
        f"MoE backend: {', '.join(sorted(backend))}; blocks {report.moe_blocks[0]}-{report.moe_blocks[-1]}, "
        f"{report.spec.num_experts} experts, top-{report.spec.top_k}",
    ]
    if report.keys_from_base:
        lines.append(f"{report.keys_from_base} tensors from the base transformer")
    return "\n".join(lines)
