"""The reference's rotary positions on ComfyUI's Qwen-Image model, through ComfyUI's own hooks.

Part of the door to ComfyUI. TAG-MoE was trained with diffusers' token positions: grids centred
as diffusers centres odd sizes, the condition image in frame 1, a region edit's crop at its
full-grid positions in frame 0. ComfyUI's Qwen-Image centres odd grids the other way and knows no
region, so the model is told the reference's ids, in three steps that each use a hook ComfyUI keeps:

1. an ``APPLY_MODEL`` wrapper (registered on the patcher by the loader) reads the call's layout
   from its inputs and conds (latent, ``ref_latents``, ``ref_latents_method``, the TAG-MoE region)
   into a :class:`PositionPlan` for that call (a ContextVar: per thread, per run);
2. a ``post_input`` patch, on ComfyUI versions whose Qwen-Image runs them with ``img_ids`` /
   ``txt_ids`` (newer than 0.10), swaps ComfyUI's ids for the plan's. Patches another pack adds
   later run after it and see (and may rewrite) TAG-MoE's ids;
3. on versions without that patch, the model's rotary embedder (:class:`ReferencePositions`, a
   module of TAG-MoE's own transformer) applies the plan if step 2 did not.

Where TAG-MoE's positions cannot apply (another reference method such as ``negative_index`` or
``offset``; tokens the layout does not explain) ComfyUI's positions are kept, with one log line.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from dataclasses import dataclass

import comfy.patcher_extension as pe
import torch
from torch import nn

from ..tagmoe_core.model.positions import RegionShape, reference_ids

log = logging.getLogger("tagmoe")

REGION_KEY = "tagmoe_region"  # conditioning key set by TAG-MoE Edit Conditioning with a mask
POSITIONS_KEY = "tagmoe_positions"  # the wrapper's key on the patcher
# ComfyUI's reference methods that place condition i in frame i, as the reference does
INDEX_METHODS = (None, "index", "index_timestep_zero")


@dataclass
class PositionPlan:
    """The token layout of one model call. ``applicable``: TAG-MoE's positions apply to it (an index
    reference method). ``used``: some forward of the call applied them; ``patched``: the forward in
    progress already got them through ``post_input`` (so its rotary embedder leaves its ids alone)."""

    target: tuple[int, int]
    conditions: list[tuple[int, int] | RegionShape]
    text_len: int | None = None  # from the call's context; None: not known
    applicable: bool = True
    used: bool = False
    patched: bool = False

    @property
    def image_tokens(self) -> int:
        def count(c):
            return c.num_tokens if isinstance(c, RegionShape) else c[0] * c[1]
        return self.target[0] * self.target[1] + sum(count(c) for c in self.conditions)

    def ids_for(self, text_len: int, image_tokens: int, device: torch.device, dtype: torch.dtype,
                warn: bool = True) -> torch.Tensor | None:
        """The reference's ids [text + image tokens, 3] (a fresh tensor) if this call's tokens are the
        plan's, else None (with one log line where ``warn``)."""
        if image_tokens != self.image_tokens or self.text_len not in (None, text_len):
            if warn:
                _warn_once("tokens", "TAG-MoE: the model got other tokens than its inputs explain (another patch "
                                     "adds some?); its rotary positions are ComfyUI's, not the reference's")
            return None
        self.used = True
        return _reference_ids(self.target, tuple(self.conditions), text_len, device, dtype).clone()


_PLAN: contextvars.ContextVar[PositionPlan | None] = contextvars.ContextVar("tagmoe_positions", default=None)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


@functools.lru_cache(maxsize=64)
def _reference_ids(target, conditions, text_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return reference_ids(target, list(conditions), text_len).to(device, dtype)


def _grid(latent: torch.Tensor) -> tuple[int, int]:
    return (latent.shape[-2] + 1) // 2, (latent.shape[-1] + 1) // 2


def current_plan() -> PositionPlan | None:
    """The position plan of the model call in progress (set by the APPLY_MODEL wrapper)."""
    return _PLAN.get()


def position_plan(x: torch.Tensor, ref_latents, method, region, context=None) -> PositionPlan | None:
    applicable = method in INDEX_METHODS
    if not applicable:
        _warn_once(f"method:{method}", f"TAG-MoE: reference method {method!r} lays condition images out its own way; "
                                       "the rotary positions are ComfyUI's, not the reference's (use 'index')")
    conditions: list[tuple[int, int] | RegionShape] = [_grid(r) for r in (ref_latents or [])]
    if region is not None and applicable:
        shape = RegionShape(int(region[0]), int(region[1]), tuple(int(v) for v in region[2]))
        if len(conditions) != 1 or conditions[0] != (shape.rows, shape.cols):
            _warn_once("region", "TAG-MoE: a region was set but the reference latents do not match it; ignoring "
                                 "the region's positions")
        else:
            conditions = [shape]
    return PositionPlan(_grid(x), conditions, context.shape[1] if context is not None else None, applicable)


# -- the hooks ---------------------------------------------------------------------------------------------------
def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                        **kwargs):
    """APPLY_MODEL wrapper: the plan of this call, from its inputs and conds."""
    plan = position_plan(x, kwargs.get("ref_latents"), kwargs.get("ref_latents_method"), kwargs.get(REGION_KEY),
                         c_crossattn)
    token = _PLAN.set(plan)
    try:
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        _PLAN.reset(token)
    if plan.applicable and not plan.used:
        _warn_once("unused", "TAG-MoE: this ComfyUI's Qwen-Image model did not ask for rotary embeddings the way "
                             "TAG-MoE expects; positions are ComfyUI's (results may differ slightly)")
    return out


def _eager(function):
    """Run outside torch.compile's graphs: the plan lives in a ContextVar that a compiled graph would
    bake in as a constant (TorchCompileModel then gives a later call an earlier call's positions)."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(function) if disable is not None else function


@_eager
def post_input_patch(args: dict) -> dict:
    """``post_input`` patch: ComfyUI's img/txt ids -> the reference's (newer ComfyUI). Tokens it cannot
    explain are left to the rotary embedder's fallback, which says so."""
    plan = _PLAN.get()
    img_ids, txt_ids = args.get("img_ids"), args.get("txt_ids")
    if plan is None or not plan.applicable or img_ids is None or txt_ids is None or img_ids.dim() != 3:
        return args
    text_len = txt_ids.shape[1]
    ids = plan.ids_for(text_len, img_ids.shape[1], img_ids.device, img_ids.dtype, warn=False)
    if ids is None:
        log.debug("TAG-MoE: post_input saw %s text and %s image tokens, the plan %s image tokens", text_len,
                  img_ids.shape[1], plan.image_tokens)
        return args
    plan.patched = True
    out = dict(args)
    out["txt_ids"] = ids[:text_len].expand(txt_ids.shape[0], -1, -1)
    out["img_ids"] = ids[text_len:].expand(img_ids.shape[0], -1, -1)
    return out


def install(patcher) -> None:
    """Register the hooks on a TAG-MoE patcher (clones keep them)."""
    patcher.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, POSITIONS_KEY, apply_model_wrapper)
    patcher.set_model_patch(post_input_patch, "post_input")


class ReferencePositions(nn.Module):
    """Wraps the transformer's rotary embedder (``EmbedND``): if the call's plan was not applied by
    the ``post_input`` patch (ComfyUI versions without it), it embeds the reference's ids."""

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedder = embedder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedder(_planned_ids(ids))


@_eager
def _planned_ids(ids: torch.Tensor) -> torch.Tensor:
    plan = _PLAN.get()
    if plan is None:  # no APPLY_MODEL wrapper ran: this MODEL's patcher lost TAG-MoE's hooks
        _warn_once("hooks", "TAG-MoE: this MODEL was called without TAG-MoE's position hooks (was its patcher rebuilt "
                            "by another node?); its rotary positions are ComfyUI's, not the reference's")
        return ids
    if plan.patched:  # this forward's post_input patch applied the plan; later patches may have moved ids
        plan.patched = False
        return ids
    if not plan.applicable:
        return ids
    text_len = ids.shape[1] - plan.image_tokens
    reference = plan.ids_for(text_len, plan.image_tokens if text_len >= 0 else -1, ids.device, ids.dtype)
    return ids if reference is None else reference[None].expand(ids.shape[0], -1, -1)
