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

import contextvars
import functools
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
import comfy.supported_models
import torch
from torch import nn

from ..tagmoe_core.model.expert_checkpoint import LinearExpertsCheckpoint
from ..tagmoe_core.model.moe_linear import LinearExpertsMoE
from ..tagmoe_core.model.positions import RegionShape, reference_ids
from ..tagmoe_core.model.tag_heads import TagHeads
from ..tagmoe_core.pipeline.schedule import QWEN_IMAGE_SCHEDULER, image_seq_len, shift_for

log = logging.getLogger("tagmoe")

HEADS_ATTACHMENT = "tagmoe_heads"
REGION_KEY = "tagmoe_region"  # conditioning key set by TAG-MoE Edit Conditioning with a mask
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


# -- rotary positions ----------------------------------------------------------------------------------------
@dataclass
class PositionPlan:
    target: tuple[int, int]
    conditions: list[tuple[int, int] | RegionShape]
    text_len: int | None = None  # from the call's context; None: not known
    used: bool = False

    @property
    def image_tokens(self) -> int:
        def count(c):
            return c.num_tokens if isinstance(c, RegionShape) else c[0] * c[1]
        return self.target[0] * self.target[1] + sum(count(c) for c in self.conditions)


_PLAN: contextvars.ContextVar[PositionPlan | None] = contextvars.ContextVar("tagmoe_positions", default=None)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


class ReferencePositions(nn.Module):
    """Wraps the transformer's rotary embedder (``EmbedND``): with a plan for the current call it
    embeds the reference's position ids instead of the ones ComfyUI computed."""

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedder = embedder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        plan = _PLAN.get()
        if plan is not None:
            text_len = ids.shape[1] - plan.image_tokens
            if text_len >= 0 and plan.text_len in (None, text_len):
                ids = _reference_ids(plan.target, tuple(plan.conditions), text_len, ids.device,
                                     ids.dtype).expand(ids.shape[0], -1, -1)
                plan.used = True
            else:
                _warn_once("tokens", "TAG-MoE: the model got other tokens than its inputs explain (another patch "
                                     "adds some?); its rotary positions are ComfyUI's, not the reference's")
        return self.embedder(ids)


@functools.lru_cache(maxsize=64)
def _reference_ids(target, conditions, text_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return reference_ids(target, list(conditions), text_len).to(device, dtype)[None]


def _grid(latent: torch.Tensor) -> tuple[int, int]:
    return (latent.shape[-2] + 1) // 2, (latent.shape[-1] + 1) // 2


def current_plan() -> PositionPlan | None:
    """The position plan of the model call in progress (set by TagMoEQwenImage.apply_model)."""
    return _PLAN.get()


def position_plan(x: torch.Tensor, ref_latents, method, region, context=None) -> PositionPlan | None:
    if method not in (None, "index"):  # another pack's layout (e.g. "offset"): leave it alone
        return None
    conditions: list[tuple[int, int] | RegionShape] = [_grid(r) for r in (ref_latents or [])]
    if region is not None:
        shape = RegionShape(int(region[0]), int(region[1]), tuple(int(v) for v in region[2]))
        if len(conditions) != 1 or conditions[0] != (shape.rows, shape.cols):
            _warn_once("region", "TAG-MoE: a region was set but the reference latents do not match it; ignoring "
                                 "the region's positions")
        else:
            conditions = [shape]
    return PositionPlan(_grid(x), conditions, context.shape[1] if context is not None else None)


# -- the model -------------------------------------------------------------------------------------------------
class TagMoEQwenImageTransformer(qwen_image.QwenImageTransformer2DModel):
    """ComfyUI's Qwen-Image transformer with ``LinearExpertsMoE`` as ``img_mlp`` of the MoE blocks."""

    def __init__(self, tagmoe_moe_blocks=(), tagmoe_num_experts: int = 4, tagmoe_ffn_hidden_size: int | None = None,
                 tagmoe_top_k: int = 1, dtype=None, device=None, operations=None, **kwargs):
        super().__init__(dtype=dtype, device=device, operations=operations, **kwargs)
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

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        region = kwargs.get(REGION_KEY)
        if region is not None and "ref_latents" in out:
            out[REGION_KEY] = comfy.conds.CONDConstant(region)
        return out

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        plan = position_plan(x, kwargs.get("ref_latents"), kwargs.get("ref_latents_method"), kwargs.get(REGION_KEY),
                             c_crossattn)
        token = _PLAN.set(plan)
        try:
            out = super().apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            _PLAN.reset(token)
        if plan is not None and not plan.used:
            _warn_once("unused", "TAG-MoE: this ComfyUI's Qwen-Image model did not ask for rotary embeddings the "
                                 "way TAG-MoE expects; positions are ComfyUI's (results may differ slightly)")
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
                     file_dtype: torch.dtype | None = None) -> tuple[TagMoEQwenImage, torch.dtype, torch.dtype | None]:
    """An empty TAG-MoE model (weights allocated, not loaded) with ComfyUI's choice of storage and
    compute dtypes, as its Load Diffusion Model makes them: ``(model, storage dtype, compute dtype)``."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    unet_config = {
        "image_model": "qwen_image",
        **{k: dims[k] for k in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                                "num_attention_heads", "joint_attention_dim", "guidance_embeds")},
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
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)
    if fast:
        model_config.optimizations["fp8"] = True
    return TagMoEQwenImage(model_config), unet_dtype, manual_cast_dtype


def manage(model: TagMoEQwenImage, heads: TagHeads | None) -> comfy.model_patcher.ModelPatcher:
    """Hand the model to ComfyUI: a ModelPatcher (its size counts every weight, experts included)."""
    model = model.to(mm.unet_offload_device())
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    if heads is not None:
        patcher.set_attachments(HEADS_ATTACHMENT, heads)
    return patcher


def load_tagmoe_model(path: str | Path, weight_dtype: str = "default",
                      progress: Callable[[int, int], None] | None = None) -> LoadedModel:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    ckpt = LinearExpertsCheckpoint.open(path)
    try:
        storage = WEIGHT_DTYPES[weight_dtype][0] or ckpt.weight_dtype()
        _check_host_memory(ckpt.num_parameters * storage.itemsize, weight_dtype)
        model, unet_dtype, manual_cast_dtype = new_tagmoe_model(ckpt.dims, ckpt.spec, ckpt.blocks, weight_dtype,
                                                                ckpt.num_parameters, ckpt.weight_dtype())
        diffusion_model = model.diffusion_model
        ckpt.check({k: tuple(v.shape) for k, v in diffusion_model.state_dict().items()})
        total = ckpt.nbytes
        for chunk, done in ckpt.chunks():
            mm.throw_exception_if_processing_interrupted()
            diffusion_model.load_state_dict(chunk, strict=False)
            if progress is not None:
                progress(done, total)
        heads = TagHeads.from_state_dict(ckpt.tag_state()) if ckpt.has_tag_modules else None
    finally:
        ckpt.close()
    notes = [] if heads is not None else [
        "no tag_embedding/router_head in the checkpoint: routing analysis and tag guidance are off"]
    return LoadedModel(manage(model, heads), ckpt, unet_dtype, manual_cast_dtype, notes)


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
