"""TAG-MoE Model Loader: base Qwen-Image + TAG-MoE weights -> TAGMOE_MODEL."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

from ...tagmoe_core.errors import TagMoEError
from ...tagmoe_core.model.moe import BACKENDS, effective_backend, moe_layers
from ...tagmoe_core.pipeline.placement import MODES as PLACEMENTS
from ...tagmoe_core.runtime.devices import DTYPES, parse_device_spec
from .. import comfy_bridge as bridge

log = logging.getLogger("tagmoe")

NO_BASE = "(no Qwen-Image folder in models/diffusers)"
NO_WEIGHTS = "(no TAG-MoE weights in models/tagmoe)"


@dataclass
class TagMoEModel:
    """What flows on a TAGMOE_MODEL link: the loaded pipeline and how it was placed."""

    pipe: object | None
    info: str
    key: tuple = ()

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
    DESCRIPTION = ("Loads Qwen-Image with the TAG-MoE transformer (the release: 4-expert MoE in the last 10 image "
                   f"FFNs), or '{bridge.EMBEDDED_MODEL}', the tiny model shipped with the pack. Stays loaded until an "
                   "input changes; one model at a time.")
    CATEGORY = "TAG-MoE"
    FUNCTION = "load"
    RETURN_TYPES = ("TAGMOE_MODEL", "STRING")
    RETURN_NAMES = ("model", "placement")
    OUTPUT_TOOLTIPS = ("the loaded TAG-MoE model", "where and how it was placed (devices, dtype, MoE backend)")

    @classmethod
    def INPUT_TYPES(cls):
        embedded = [bridge.EMBEDDED_MODEL]  # the shipped tiny model, last: nothing to download to try the pack
        bases = (bridge.list_diffusers_models() or [NO_BASE]) + embedded
        weights = (bridge.list_tagmoe_weights() or [NO_WEIGHTS]) + embedded
        return {
            "required": {
                "base_model": (bases, {"tooltip": "Qwen-Image in diffusers layout (a folder with model_index.json) "
                                                  f"under models/diffusers; '{bridge.EMBEDDED_MODEL}': the tiny "
                                                  "model shipped with the pack (64x64 shapes, for trying the "
                                                  "nodes, with the same choice for the weights)"}),
                "tagmoe_weights": (weights, {"tooltip": "TAG-MoE weights under models/tagmoe or "
                                                        "models/diffusion_models: a .safetensors/.bin/.pt file, or a "
                                                        "folder with the weights or a *.index.json and its shards; "
                                                        f"'{bridge.EMBEDDED_MODEL}' with the same base_model"}),
                "device": ("STRING", {"default": "auto", "tooltip": "'auto' (first GPU, else CPU), 'cpu', 'cuda:0', "
                                                                    "or '0,1' to split the transformer across GPUs"}),
                "dtype": (list(DTYPES), {"default": "auto", "tooltip": (
                    "auto: bf16 on GPUs, fp32 on the CPU. fp16 tends to overflow in Qwen-Image (black images)")}),
                "moe_backend": (list(BACKENDS), {"default": "auto", "tooltip": "auto: MegaBlocks kernels on CUDA when "
                                                                               "installed, else plain PyTorch"}),
            },
            # Optional, so prompts saved before these existed still validate.
            "optional": {
                "placement": (list(PLACEMENTS), {"default": "auto", "tooltip": (
                    "auto: the first that fits the free GPU memory. single: all on one device; multi-gpu: "
                    "transformer split over the listed GPUs; model-offload: each part visits the GPU while it runs; "
                    "block-swap: transformer blocks stream from host memory")}),
                "fp8_weights": ("BOOLEAN", {"default": False, "tooltip": "store the transformer's weights (MoE experts "
                                                                         "included) in float8, compute in bf16"}),
                "drop_text_encoder": ("BOOLEAN", {"default": False, "tooltip": (
                    "keep the text encoder in host memory between prompts (its output is cached)")}),
                "blocks_on_gpu": ("INT", {"default": -1, "min": -1, "max": 200, "tooltip": "block-swap: transformer "
                                                                                          "blocks kept on the GPU "
                                                                                          "(-1 = as many as fit)"}),
                "gpu_memory_gib": ("STRING", {"default": "", "tooltip": "optional per-GPU caps in GiB, e.g. '20' or "
                                                                        "'38,38' (default: free memory minus 2 GiB)"}),
                "ignore_unexpected_keys": ("BOOLEAN", {"default": False, "tooltip": (
                    "load even if the TAG-MoE weights hold keys the transformer has no place for (e.g. EMA or "
                    "optimizer leftovers); they are skipped. Off: such files are refused")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, base_model, tagmoe_weights, device="auto", dtype="auto", moe_backend="auto", **options):
        # ComfyUI re-runs a node only when this changes: while our model for these inputs is loaded
        # the same value; once it was released (another model loaded since), NaN forces a reload.
        alive = any(handle.pipe is not None and handle.key[:5] == _paths_key(base_model, tagmoe_weights, device, dtype,
                                                                              moe_backend) for handle in _loaded)
        return "loaded" if alive else float("nan")

    @classmethod
    def VALIDATE_INPUTS(cls, tagmoe_weights):
        # One input only: ComfyUI attributes a failure to every input named here. base_model keeps
        # ComfyUI's own check (a value from its list) and load() explains a missing folder.
        return bridge.weights_missing(tagmoe_weights)

    def load(self, base_model, tagmoe_weights, device="auto", dtype="auto", moe_backend="auto", placement="auto",
             fp8_weights=False, drop_text_encoder=False, blocks_on_gpu=-1, gpu_memory_gib="",
             ignore_unexpected_keys=False, unique_id=None):
        if (base_model == bridge.EMBEDDED_MODEL) != (tagmoe_weights == bridge.EMBEDDED_MODEL):
            raise TagMoEError(f"'{bridge.EMBEDDED_MODEL}' is one model: pick it for both base_model and "
                              "tagmoe_weights, or neither")
        try:
            base = bridge.resolve_model("diffusers", base_model)
        except FileNotFoundError as exc:
            if base_model == bridge.EMBEDDED_MODEL:
                raise TagMoEError(str(exc)) from exc
            raise TagMoEError("the base model was not found: put the Qwen-Image diffusers folder (model_index.json, "
                              f"transformer/, text_encoder/, ...) in models/diffusers and pick it ({exc})") from exc
        try:
            weights = bridge.resolve_model("tagmoe", tagmoe_weights)
        except FileNotFoundError as exc:
            raise TagMoEError(str(exc)) from exc
        # heavy (diffusers, transformers): imported here, not at ComfyUI start
        from ...tagmoe_core.pipeline.builder import load_pipeline

        caps = parse_gib_caps(gpu_memory_gib, device)
        key = _paths_key(base_model, tagmoe_weights, device, dtype, moe_backend) + (
            placement, fp8_weights, drop_text_encoder, blocks_on_gpu, gpu_memory_gib, ignore_unexpected_keys)
        for handle in _loaded:
            if handle.key == key and handle.pipe is not None:
                return self._result(handle)
        def make_room() -> None:  # only once every check passed: a bad file keeps the current model
            _release_all()
            bridge.send_text(unique_id, "loading TAG-MoE...")

        reclaimable: dict[int, int] = {}  # the model make_room() will release counts as free memory
        for handle in _loaded:
            if handle.pipe is not None:
                for module in (handle.pipe.transformer, handle.pipe.text_encoder, handle.pipe.vae):
                    for param in module.parameters():
                        if param.is_cuda:
                            reclaimable[param.device.index] = reclaimable.get(param.device.index, 0) + \
                                param.numel() * param.element_size()
        on = parse_device_spec(device)  # a bad device: one line, before anything is freed or loaded
        if on is None or on.kind != "cpu":  # ComfyUI's own models reload on demand: free the GPU for ours first
            bridge.free_vram_for_external_model()
        progress = bridge.Progress(100, unique_id)
        pipe = load_pipeline(base, weights, device=device, dtype=DTYPES[dtype], backend=moe_backend,
                             placement=placement, fp8=fp8_weights, drop_text_encoder=drop_text_encoder,
                             blocks_on_gpu=None if blocks_on_gpu < 0 else blocks_on_gpu, gpu_memory_caps=caps,
                             strict=not ignore_unexpected_keys,
                             progress=lambda done, total: progress.update(int(100 * done / max(total, 1))),
                             before_load=make_room, reclaimable_bytes=reclaimable)
        handle = TagMoEModel(pipe, placement_text(pipe), key)
        _loaded.append(handle)
        log.info("TAG-MoE loaded:\n%s", handle.info)
        return self._result(handle)

    @staticmethod
    def _result(handle: TagMoEModel):
        return {"ui": {"text": [handle.info]}, "result": (handle, handle.info)}


def _paths_key(base_model, tagmoe_weights, device, dtype, moe_backend) -> tuple:
    try:
        paths = (str(bridge.resolve_model("diffusers", base_model)),
                 str(bridge.resolve_model("tagmoe", tagmoe_weights)))
    except FileNotFoundError:
        paths = (base_model, tagmoe_weights)
    return paths + (device, dtype, moe_backend)


def parse_gib_caps(text: str, device: str) -> dict[int, int] | None:
    """'20' or '38,38' (GiB) -> {gpu id: bytes} for the GPUs of ``device`` in order."""
    from ...tagmoe_core.runtime.devices import GIB

    if not str(text).strip():
        return None
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError as exc:
        raise TagMoEError(f"gpu_memory_gib must be numbers in GiB such as '20' or '38,38', got {text!r}") from exc
    spec = parse_device_spec(device)
    ids = spec.ids if spec is not None and spec.kind == "cuda" else (0,)
    if len(values) == 1:
        values = values * len(ids)
    if len(values) != len(ids) or any(v <= 0 for v in values):
        raise TagMoEError(f"gpu_memory_gib gives {len(values)} cap(s) for {len(ids)} GPU(s) ({device}); give one "
                          "positive number for all, or one per GPU")
    return {i: int(v * GIB) for i, v in zip(ids, values)}


def placement_text(pipe) -> str:
    report = pipe.load_report
    backend = {effective_backend(layer, pipe.device, pipe.dtype) for layer in moe_layers(pipe.transformer)} or {"-"}
    placement = pipe.placement
    streamed = placement.mode in ("model-offload", "block-swap")
    text_encoder = (f"host memory, visits {pipe.device}" if "text_encoder" in pipe.offloaded
                    else str(next(pipe.text_encoder.parameters()).device))
    lines = [
        f"placement: {placement.describe()}",
        f"why: {placement.reason}",
        f"transformer: {f'host memory, streamed to {pipe.device}' if streamed else report.devices}",
        f"text encoder: {text_encoder}",
        f"VAE: {next(pipe.vae.parameters()).device}",
        f"dtype: {str(report.dtype).removeprefix('torch.')}",
        f"MoE backend: {', '.join(sorted(backend))}; blocks {report.moe_blocks[0]}-{report.moe_blocks[-1]}, "
        f"{report.spec.num_experts} experts, top-{report.spec.top_k}",
    ]
    if report.keys_from_base:
        lines.append(f"{report.keys_from_base} tensors from the base transformer")
    return "\n".join(lines)
