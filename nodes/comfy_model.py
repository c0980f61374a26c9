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


# arguments some ComfyUI versions do not take, whose absence means their default (what TAG-MoE needs)
OPTIONAL_ARGUMENTS = frozenset({"guidance_embeds", "device", "fast_disk"})


def accepted_arguments(function: Callable, arguments: dict) -> dict:
    """The part of ``arguments`` that ``function`` takes: ComfyUI's constructors gain and lose
    arguments between versions (0.10 dropped ``guidance_embeds``) and take no ``**kwargs``. Only
    the optional ones may go unpassed quietly; any other is refused, never silently dropped."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(arguments)
    dropped = set(arguments) - set(parameters)
    if dropped - OPTIONAL_ARGUMENTS:
        raise TypeError(f"this ComfyUI's {function.__qualname__} takes no {', '.join(sorted(dropped))}: TAG-MoE needs "
                        "them (is this ComfyUI supported? see the README's ComfyUI versions)")
    return {k: v for k, v in arguments.items() if k in parameters}


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


class TagMoEQwenImage(comfy.model_base.QwenImage):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLUX, device=None):
        if "unet_model" in inspect.signature(comfy.model_base.QwenImage.__init__).parameters:  # newer ComfyUI
            super().__init__(model_config, model_type, device=device, unet_model=TagMoEQwenImageTransformer)
        else:
            comfy.model_base.BaseModel.__init__(self, model_config, model_type, device=device,
                                                unet_model=TagMoEQwenImageTransformer)
            self.memory_usage_factor_conds = ("ref_latents",)

    def state_dict_for_saving(self, *args, **kwargs):
        """What ComfyUI's checkpoint saving writes (every version calls it): refused for quantized GGUF Linears."""
        from . import comfy_gguf

        comfy_gguf.refuse_saving_quantized(self.diffusion_model)
        return super().state_dict_for_saving(*args, **kwargs)

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


def tagmoe_model_config(dims: dict, spec, blocks: list[int], weight_dtype: str = "default", num_parameters: int = 0,
                        file_dtype: torch.dtype | None = None, custom_operations=None):
    """ComfyUI's Qwen-Image model config for a TAG-MoE of these sizes, with ComfyUI's choice of storage
    and compute dtypes as its Load Diffusion Model makes them: ``(config, storage dtype, compute dtype)``."""
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
    return model_config, unet_dtype, manual_cast_dtype


def new_tagmoe_model(dims: dict, spec, blocks: list[int], weight_dtype: str = "default", num_parameters: int = 0,
                     file_dtype: torch.dtype | None = None, custom_operations=None,
                     ) -> tuple[TagMoEQwenImage, torch.dtype, torch.dtype | None]:
    """An empty TAG-MoE model (weights allocated, or none yet with dynamic VRAM's lazy Linears):
    ``(model, storage dtype, compute dtype)``."""
    model_config, unet_dtype, manual_cast_dtype = tagmoe_model_config(dims, spec, blocks, weight_dtype,
                                                                      num_parameters, file_dtype, custom_operations)
    return TagMoEQwenImage(model_config), unet_dtype, manual_cast_dtype


class MetaTwinOps(comfy.ops.disable_weight_init):
    """``operations`` for a twin of a model on the meta device, built for its keys and shapes only:
    plain torch Linears and Embeddings (weights allocated at construction, whatever the ComfyUI)."""

    class Linear(torch.nn.Linear):
        def reset_parameters(self):
            return None

    class Embedding(torch.nn.Embedding):
        def reset_parameters(self):
            return None


def expected_state(model_config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key a TAG-MoE model of this config holds after loading, with its shape and dtype, read off
    a twin built on the meta device (no memory) with plain torch Linears: the model itself cannot tell
    before loading, as newer ComfyUI (dynamic VRAM) builds its Linears with ``weight = bias = None``
    and creates them from the file's tensors. Every module takes its dtype from the config, not from
    its operations class, so the twin's dtypes are the model's."""
    with torch.device("meta"):
        twin = TagMoEQwenImageTransformer(**model_config.unet_config, device=torch.device("meta"),
                                          operations=MetaTwinOps)
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
        owners.setdefault(owner, {})[name] = tensor
    unexpected: list[str] = []
    for owner, local in owners.items():
        try:
            module = diffusion_model.get_submodule(owner) if owner else None
        except AttributeError:
            module = None
        if module is None:
            unexpected += [f"{owner}.{name}" for name in local]
            continue
        for name, tensor in local.items():
            # a release expert's w2 is a transposed view: a weight kept as it is (assign, or a lazy Linear's
            # copy, which keeps strides) must be contiguous, as ComfyUI's own files give them
            if not tensor.is_contiguous() and (assign or getattr(module, name, None) is None):
                local[name] = tensor.contiguous()
        if next(module.children(), None) is None:
            unexpected += [f"{owner}.{name}" for name in module.load_state_dict(local, strict=False,
                                                                                  assign=assign).unexpected_keys]
        else:  # a module with children: its own tensors only (children handed nothing would make placeholders)
            found: list[str] = []
            module._load_from_state_dict({f"{owner}.{k}": v for k, v in local.items()}, f"{owner}.",
                                         {"assign_to_params_buffers": assign}, False, [], found, [])
            unexpected += found
    return unexpected


def host_bytes(diffusion_model: torch.nn.Module, ckpt: LinearExpertsCheckpoint, assign: bool) -> int:
    """Host memory loading will take: weights already allocated (eager Linears, norms) at their size;
    a dynamic-VRAM Linear's weight copied from the file in the file's dtype, or nothing when the
    file's memory map is kept (``assign``), except transposed expert views, which are copied."""
    total = 0
    for key, piece in ckpt.plan.items():
        owner, _, name = key.rpartition(".")
        param = getattr(diffusion_model.get_submodule(owner), name, None)
        if param is not None:
            total += param.nbytes
        elif not assign or piece.transpose:
            info = ckpt.reader.infos[piece.source]
            numel = torch.Size(info.shape).numel()
            if piece.start is not None:
                numel = numel // info.shape[0] * (piece.stop - piece.start)
            total += numel * info.dtype.itemsize
    return total


def finish(patcher, heads: TagHeads | None, reload: tuple | None = None):
    """What every TAG-MoE patcher carries: the rotary-position hooks, the tag heads, and the factory
    ComfyUI uses to build a fresh copy (MultiGPU, non-dynamic delegates)."""
    comfy_positions.install(patcher)
    if heads is not None:
        patcher.set_attachments(HEADS_ATTACHMENT, heads)
    if reload is not None:
        patcher.cached_patcher_init = reload
    return patcher


def manage(model: TagMoEQwenImage, state: dict[str, torch.Tensor], heads: TagHeads | None = None,
           gguf: bool = False):
    """A patcher for ``model`` with ``state`` loaded the way the loader loads files (benchmarks build
    random weights for ``expected_state`` keys by hand). ``gguf``: a model built with
    ``comfy_gguf.operations`` and ``state`` holding quantized tensors (``gguf_reader.as_quantized``): it gets
    the patcher a ``.gguf`` gets."""
    from . import comfy_gguf

    patcher = new_patcher(model, gguf, comfy_gguf.patcher_class if gguf else None)
    unexpected = load_weights(model.diffusion_model, state, is_dynamic(patcher))
    missing = sorted(set(expected_state(model.model_config)) - set(state))
    if missing or unexpected:
        raise ValueError(f"state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if gguf:
        comfy_gguf.weights_loaded(patcher)
    return finish(patcher, heads)


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
        file_dtype, operations = ckpt.weight_dtype(), custom_operations
        if gguf:
            from . import comfy_gguf

            if weight_dtype != "default":
                raise ValueError(f"weight_dtype {weight_dtype} is for .safetensors weights; a .gguf keeps its own "
                                 "quantization (choose default)")
            operations, file_dtype = comfy_gguf.operations(custom_operations or comfy.ops.manual_cast), None
        model_config, unet_dtype, manual_cast_dtype = tagmoe_model_config(
            ckpt.dims, ckpt.spec, ckpt.blocks, weight_dtype, ckpt.num_parameters, file_dtype, operations)
        expected = expected_state(model_config)
        ckpt.check({k: shape for k, (shape, _) in expected.items()}, quantized=gguf)  # before anything is built or read
        model = TagMoEQwenImage(model_config)
        patcher = new_patcher(model, disable_dynamic or gguf, comfy_gguf.patcher_class if gguf else None)
        assign = is_dynamic(patcher)  # the file's tensors become the weights (memory-mapped), as ComfyUI does
        _check_host_memory(ckpt.nbytes if gguf else host_bytes(model.diffusion_model, ckpt, assign), weight_dtype)
        if not assign and not mm.is_device_cpu(mm.unet_offload_device()):
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
    finish(patcher, heads, reload=(reload_patcher, (str(path), weight_dtype, custom_operations)))
    return LoadedModel(patcher, ckpt, unet_dtype, manual_cast_dtype, notes)


def reload_patcher(path: str, weight_dtype: str = "default", custom_operations=None, disable_dynamic: bool = False):
    """``cached_patcher_init``'s factory: a fresh TAG-MoE patcher from the same file."""
    return load_tagmoe_model(path, weight_dtype, disable_dynamic=disable_dynamic,
                             custom_operations=custom_operations).patcher


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
