"""TAG-MoE as a ComfyUI model: ComfyUI's own Qwen-Image diffusion model with the MoE layers.

Part of the door to ComfyUI (with ``comfy_bridge``, ``comfy_sampling``, ``comfy_lora``): only
these modules import ComfyUI. Imported when a native node runs, never at ComfyUI's start.

* :class:`TagMoEQwenImageTransformer` is ComfyUI's ``QwenImageTransformer2DModel`` whose ``img_mlp``
  in the MoE blocks is replaced, inside its constructor and so before any weight loads, by
  ``LinearExpertsMoE`` built from the model's own ``operations.Linear``: the router and each
  expert's two Linears are ordinary ComfyUI Linears, so partial loading, cast-on-forward, fp8
  weight dtypes, LoRA patches and other packs' device handling apply to them as to every Linear.
* :class:`TagMoEQwenImage` is ComfyUI's ``QwenImage`` model with that transformer. Around each
  model call it tells the rotary embedding the reference's token positions (grids centred as
  diffusers centres odd sizes; a region edit's crop at its full-grid positions in frame 0), and it
  passes the region of a TAG-MoE Edit Conditioning on to the transformer.
* :func:`load_tagmoe_model` builds it from any checkpoint layout the library reads, checks every
  key and shape, streams the weights in (one copy in memory), and wraps it in a ModelPatcher whose
  size includes the experts; ``tag_embedding``/``router_head`` ride along as an attachment.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import comfy.conds
import comfy.ldm.qwen_image.model as qwen_image
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
import torch

from ..tagmoe_core.errors import MissingKeysError, UnexpectedKeysError
from ..tagmoe_core.model.expert_checkpoint import LinearExpertsCheckpoint
from ..tagmoe_core.model.moe_linear import LinearExpertsMoE
from ..tagmoe_core.model.tag_heads import TagHeads
from ..tagmoe_core.pipeline.schedule import QWEN_IMAGE_SCHEDULER, image_seq_len, shift_for
from . import comfy_positions
from .comfy_positions import REGION_KEY, ReferencePositions

log = logging.getLogger("tagmoe")

HEADS_ATTACHMENT = "tagmoe_heads"
# weight_dtype as ComfyUI's Load Diffusion Model offers it: (storage dtype, fp8 matmuls)
WEIGHT_DTYPES: dict[str, tuple[torch.dtype | None, bool]] = {
    "default": (None, False),
    "fp8_e4m3fn": (torch.float8_e4m3fn, False),
    "fp8_e4m3fn_fast": (torch.float8_e4m3fn, True),
    "fp8_e5m2": (torch.float8_e5m2, False),
}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# ComfyUI's Qwen-Image default flow shift is 1.15; the reference's is resolution-dependent. The
# model's default is the reference's at 1024x1024, so that KSampler's schedules land near it.
DEFAULT_SHIFT = shift_for(image_seq_len(1024, 1024), QWEN_IMAGE_SCHEDULER)


def accepted_arguments(function: Callable, arguments: dict) -> dict:
    """The part of ``arguments`` that ``function`` takes: ComfyUI's constructors gain and lose
    arguments between versions (0.10 dropped ``guidance_embeds``) and take no ``**kwargs``. A value
    dropped here is logged, never silently meant."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(arguments)
    dropped = sorted(set(arguments) - set(parameters))
    if dropped:
        log.info("TAG-MoE: this ComfyUI's %s takes no %s; not passed", function.__qualname__, ", ".join(dropped))
    return {k: v for k, v in arguments.items() if k in parameters}


# -- the model -------------------------------------------------------------------------------------------------
class TagMoEQwenImageTransformer(qwen_image.QwenImageTransformer2DModel):
    """ComfyUI's Qwen-Image transformer with ``LinearExpertsMoE`` as ``img_mlp`` of the MoE blocks."""

    def __init__(self, tagmoe_moe_blocks=(), tagmoe_num_experts: int = 4, tagmoe_ffn_hidden_size: int | None = None,
                 tagmoe_top_k: int = 1, dtype=None, device=None, operations=None, **kwargs):
        super().__init__(dtype=dtype, device=device, operations=operations, **accepted_arguments(
            qwen_image.QwenImageTransformer2DModel.__init__, kwargs))
        ffn = tagmoe_ffn_hidden_size or 4 * self.inner_dim
        router_dtype = torch.bfloat16 if dtype in FP8 else dtype  # routes are chosen from its logits
        for index in tagmoe_moe_blocks:
            self.transformer_blocks[index].img_mlp = LinearExpertsMoE(
                self.inner_dim, ffn, tagmoe_num_experts, tagmoe_top_k, "gelu_tanh", layer_index=index,
                linear_cls=operations.Linear, device=device, dtype=dtype, router_dtype=router_dtype)
        self.pe_embedder = ReferencePositions(self.pe_embedder)
        self.tagmoe_operations = operations  # for the loader's key check (expected_state)


class TagMoEQwenImage(comfy.model_base.QwenImage):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLUX, device=None):
        if "unet_model" in inspect.signature(comfy.model_base.QwenImage.__init__).parameters:  # newer ComfyUI
            super().__init__(model_config, model_type, device=device, unet_model=TagMoEQwenImageTransformer)
        else:
            comfy.model_base.BaseModel.__init__(self, model_config, model_type, device=device,
                                                unet_model=TagMoEQwenImageTransformer)
            self.memory_usage_factor_conds = ("ref_latents",)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        region = kwargs.get(REGION_KEY)
        if region is not None and "ref_latents" in out:
            out[REGION_KEY] = comfy.conds.CONDConstant(region)
        return out


# -- loading ---------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    patcher: comfy.model_patcher.ModelPatcher
    checkpoint: LinearExpertsCheckpoint
    weight_dtype: torch.dtype
    manual_cast_dtype: torch.dtype | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ckpt = self.checkpoint
        blocks = ckpt.blocks
        lines = [
            f"TAG-MoE: {ckpt.describe()}",
            f"{ckpt.dims['num_layers']} blocks, MoE in {blocks[0]}-{blocks[-1]}: {ckpt.spec.num_experts} experts, "
            f"top-{ckpt.spec.top_k}",
            f"weights {str(self.weight_dtype).removeprefix('torch.')}"
            + (f", computed in {str(self.manual_cast_dtype).removeprefix('torch.')}" if self.manual_cast_dtype else ""),
            f"{self.patcher.model_size() / 2**30:.2f} GiB, managed by ComfyUI (loads to {self.patcher.load_device})",
        ]
        return "\n".join(lines + self.notes)


def new_tagmoe_model(dims: dict, spec, blocks: list[int], weight_dtype: str = "default", num_parameters: int = 0,
                     file_dtype: torch.dtype | None = None, custom_operations=None,
                     ) -> tuple[TagMoEQwenImage, torch.dtype, torch.dtype | None]:
    """An empty TAG-MoE model (weights allocated, not loaded) with ComfyUI's choice of storage and
    compute dtypes, as its Load Diffusion Model makes them: ``(model, storage dtype, compute dtype)``."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    unet_config = {
        "image_model": "qwen_image",
        **{k: dims[k] for k in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                                "num_attention_heads", "joint_attention_dim")},
        "axes_dims_rope": tuple(dims["axes_dims_rope"]),
        "tagmoe_moe_blocks": list(blocks),
        "tagmoe_num_experts": spec.num_experts,
        "tagmoe_ffn_hidden_size": spec.ffn_hidden_size,
        "tagmoe_top_k": spec.top_k,
    }
    model_config = comfy.supported_models.QwenImage(unet_config)
    model_config.sampling_settings["shift"] = DEFAULT_SHIFT
    storage, fast = WEIGHT_DTYPES[weight_dtype]
    supported = list(model_config.supported_inference_dtypes)
    unet_dtype = storage or mm.unet_dtype(model_params=num_parameters, supported_dtypes=supported,
                                          weight_dtype=file_dtype)
    manual_cast_dtype = mm.unet_manual_cast(unet_dtype, mm.get_torch_device(), supported)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype, **accepted_arguments(
        model_config.set_inference_dtype, {"device": mm.get_torch_device()}))  # newer ComfyUI takes the device
    if fast:
        model_config.optimizations["fp8"] = True
    if custom_operations is not None:  # as ComfyUI's loader takes model_options["custom_operations"]
        model_config.custom_operations = custom_operations
    return TagMoEQwenImage(model_config), unet_dtype, manual_cast_dtype


def expected_state(model: TagMoEQwenImage) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key the model will hold after loading, with its shape and dtype, read off a twin built
    on the meta device (no memory) from the same config and operations, with plain torch Linears.

    The model itself cannot tell before loading: newer ComfyUI (dynamic VRAM) builds its Linears
    with ``weight = bias = None`` and creates them from the file's tensors at load time."""
    operations = model.diffusion_model.tagmoe_operations

    class Eager(operations):
        class Linear(torch.nn.Linear):
            def reset_parameters(self):
                return None

        class Embedding(torch.nn.Embedding):
            def reset_parameters(self):
                return None

    with torch.device("meta"):
        twin = type(model.diffusion_model)(**model.model_config.unet_config, device=torch.device("meta"),
                                           operations=Eager)
    return {k: (tuple(v.shape), v.dtype) for k, v in twin.state_dict().items()}


def patcher_class(disable_dynamic: bool = False) -> type:
    """The patcher ComfyUI's own loader wraps diffusion models in: ``CoreModelPatcher`` where it exists
    (newer ComfyUI: ``ModelPatcherDynamic`` when dynamic VRAM is on), else ``ModelPatcher``. Looked up
    at call time: ComfyUI rebinds it at start-up."""
    core = getattr(comfy.model_patcher, "CoreModelPatcher", None)
    return comfy.model_patcher.ModelPatcher if disable_dynamic or core is None else core


def is_dynamic(patcher) -> bool:
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def new_patcher(model: TagMoEQwenImage, disable_dynamic: bool = False, wrap: Callable[[type], type] | None = None):
    cls = patcher_class(disable_dynamic)
    cls = wrap(cls) if wrap is not None else cls
    return cls(model, **accepted_arguments(cls.__init__, {"load_device": mm.get_torch_device(),
                                                           "offload_device": mm.unet_offload_device()}))


def load_weights(diffusion_model: torch.nn.Module, chunk: dict[str, torch.Tensor], assign: bool) -> list[str]:
    """Load one chunk of the state dict as ComfyUI's ``load_model_weights`` does (``load_state_dict``,
    ``assign`` when the patcher is dynamic), but module by module: a dynamic-VRAM Linear that is
    handed a state dict without its keys makes zero placeholders, so each module only sees its own.
    Returns the keys loading reported unexpected."""
    owners: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in chunk.items():
        owner, _, name = key.rpartition(".")
        # a release expert's w2 is a transposed view; ComfyUI's own files give contiguous tensors (what a
        # kept tensor must be for dynamic VRAM's copies, and what a copied one becomes anyway)
        owners.setdefault(owner, {})[name] = tensor if tensor.is_contiguous() else tensor.contiguous()
    unexpected = []
    for owner, local in owners.items():
        try:
            module = diffusion_model.get_submodule(owner)
        except AttributeError:
            unexpected += [f"{owner}.{name}" for name in local]
            continue
        result = module.load_state_dict(local, strict=False, assign=assign)
        unexpected += [f"{owner}.{name}" for name in result.unexpected_keys]
    return unexpected


def finish(patcher, heads: TagHeads | None, reload: tuple | None = None):
    """What every TAG-MoE patcher carries: the rotary-position hooks, the tag heads, and the factory
    ComfyUI uses to build a fresh copy (MultiGPU, non-dynamic delegates)."""
    comfy_positions.install(patcher)
    if heads is not None:
        patcher.set_attachments(HEADS_ATTACHMENT, heads)
    if reload is not None:
        patcher.cached_patcher_init = reload
    return patcher


def manage(model: TagMoEQwenImage, heads: TagHeads | None) -> comfy.model_patcher.ModelPatcher:
    """Hand a model whose weights are in place to ComfyUI (benchmarks build such models by hand)."""
    return finish(new_patcher(model), heads)


def load_tagmoe_model(path: str | Path, weight_dtype: str = "default",
                      progress: Callable[[int, int], None] | None = None, disable_dynamic: bool = False,
                      custom_operations=None) -> LoadedModel:
    """TAG-MoE weights -> a ComfyUI patcher, the way ComfyUI's ``load_diffusion_model_state_dict`` does
    it on the running version: model built by ComfyUI's config and operations (``custom_operations``
    as its loader takes them), the patcher made before the weights load, ``assign`` when dynamic."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    ckpt = LinearExpertsCheckpoint.open(path)
    gguf = all(f.suffix == ".gguf" for f in ckpt.reader.weights.files)  # quantized Linears: nodes/comfy_gguf.py
    try:
        file_dtype = ckpt.weight_dtype()
        if gguf:
            from . import comfy_gguf

            if weight_dtype != "default":
                raise ValueError(f"weight_dtype {weight_dtype} is for .safetensors weights; a .gguf keeps its own "
                                 "quantization (choose default)")
            custom_operations, file_dtype = comfy_gguf.operations(custom_operations or comfy.ops.manual_cast), None
        model, unet_dtype, manual_cast_dtype = new_tagmoe_model(ckpt.dims, ckpt.spec, ckpt.blocks, weight_dtype,
                                                                ckpt.num_parameters, file_dtype, custom_operations)
        expected = expected_state(model)
        ckpt.check({k: shape for k, (shape, _) in expected.items()})
        patcher = new_patcher(model, disable_dynamic or gguf, comfy_gguf.patcher_class if gguf else None)
        assign = is_dynamic(patcher)  # the file's tensors become the weights (memory-mapped), as ComfyUI does
        if not assign:
            _check_host_memory(ckpt.nbytes if gguf else sum(torch.Size(s).numel() * d.itemsize
                                                            for s, d in expected.values()), weight_dtype)
            if not mm.is_device_cpu(mm.unet_offload_device()):
                model.to(mm.unet_offload_device())
        diffusion_model = model.diffusion_model
        loaded: set[str] = set()
        unexpected: list[str] = []
        total = ckpt.nbytes
        for chunk, done in ckpt.chunks(quantized=gguf):
            mm.throw_exception_if_processing_interrupted()
            unexpected += load_weights(diffusion_model, chunk, assign)
            loaded.update(chunk)
            if progress is not None:
                progress(done, total)
        missing = sorted(set(expected) - loaded)
        if missing:
            raise MissingKeysError(missing, ckpt.describe())
        if unexpected:
            raise UnexpectedKeysError(unexpected, ckpt.describe())
        heads = TagHeads.from_state_dict(ckpt.tag_state()) if ckpt.has_tag_modules else None
    finally:
        ckpt.close()
    notes = [] if heads is not None else [
        "no tag_embedding/router_head in the checkpoint: routing analysis and tag guidance are off"]
    if gguf:
        comfy_gguf.weights_loaded(patcher)
        notes.append(comfy_gguf.describe(model))
    finish(patcher, heads, reload=(reload_patcher, (str(path), weight_dtype)))
    return LoadedModel(patcher, ckpt, unet_dtype, manual_cast_dtype, notes)


def reload_patcher(path: str, weight_dtype: str = "default", disable_dynamic: bool = False):
    """``cached_patcher_init``'s factory: a fresh TAG-MoE patcher from the same file."""
    return load_tagmoe_model(path, weight_dtype, disable_dynamic=disable_dynamic).patcher


def _check_host_memory(needed: int, weight_dtype: str) -> None:
    """ComfyUI keeps the weights in host memory (and streams what does not fit the GPU): refuse a
    model that cannot be held there with a message, before the OOM killer ends ComfyUI."""
    from ..tagmoe_core.errors import DeviceError
    from ..tagmoe_core.runtime.memory import available_host_bytes

    available = available_host_bytes()
    if available is not None and needed > available:
        hint = "" if weight_dtype.startswith("fp8") else " (weight_dtype fp8_e4m3fn needs half)"
        raise DeviceError(f"TAG-MoE's weights need {needed / 2**30:.1f} GiB of host memory, {available / 2**30:.1f} "
                          f"GiB are available{hint}: close other programs, or add memory or swap")


def tag_heads(model: comfy.model_patcher.ModelPatcher) -> TagHeads | None:
    return model.get_attachment(HEADS_ATTACHMENT) if hasattr(model, "get_attachment") else None


def is_tagmoe(model) -> bool:
    return isinstance(getattr(model, "model", None), TagMoEQwenImage)
