"""TAG-MoE's sampling rules as ComfyUI objects (part of the door to ComfyUI; imported when a
native node runs): the reference's CFG as a GUIDER and as a MODEL patch, the reference's noise as a
NOISE, and tag guidance / routing recording as per-run MODEL wrappers.

The math is ``tagmoe_core``'s (``pipeline.guidance``, ``intent.routing``); this module only plugs it
into ComfyUI's extension points: ``sampler_cfg_function``, ``CFGGuider.predict_noise``, the NOISE
protocol (``seed``, ``generate_noise``), and ``WrappersMP.OUTER_SAMPLE`` / ``APPLY_MODEL`` wrappers,
which exist per sampling run, so nothing is set on the shared model.
"""

from __future__ import annotations

import comfy.patcher_extension as pe
import comfy.samplers
import torch

from ..tagmoe_core.intent.routing import RoutingCapture, RoutingRecorder, guidance_bias
from ..tagmoe_core.model.run_state import routing_run
from ..tagmoe_core.model.positions import RegionShape
from ..tagmoe_core.pipeline.guidance import true_cfg_latents, uses_cfg
from ..tagmoe_core.taxonomy import TaskTags
from .comfy_positions import current_plan

GUIDANCE_KEY = "tagmoe_tag_guidance"
RECORD_KEY = "tagmoe_record_routing"


# -- CFG -------------------------------------------------------------------------------------------------
def reference_cfg(args: dict) -> torch.Tensor:
    """``sampler_cfg_function``: ComfyUI hands over ``x - denoised`` of both passes (sigma times the
    velocity); the per-token rescale does not care about that common factor."""
    return true_cfg_latents(args["cond"], args["uncond"], float(args["cond_scale"]))


def with_reference_cfg(model):
    patched = model.clone()
    patched.set_model_sampler_cfg_function(reference_cfg)
    return patched


class ReferenceCFGGuider(comfy.samplers.CFGGuider):
    """ComfyUI's CFGGuider with the reference's rule: true CFG with per-token rescale when cfg > 1,
    the conditional prediction alone otherwise (no unconditional pass is run then)."""

    def __init__(self, model_patcher):
        super().__init__(with_reference_cfg(model_patcher))

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        scale = self.cfg if uses_cfg(self.cfg) else 1.0
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                self.conds.get("positive"), scale, model_options=model_options,
                                                seed=seed)


# -- noise -----------------------------------------------------------------------------------------------
class ReferenceNoise:
    """The reference's initial noise: ``randn((B, 1, 16, h, w))`` from a generator seeded on the
    device the model runs on, in the model's compute dtype (ComfyUI draws float32 on the CPU; the
    two agree only on the CPU in float32). Returned as ComfyUI expects: float32 [B, 16, 1, h, w]."""

    def __init__(self, seed: int, device: torch.device, dtype: torch.dtype):
        self.seed, self.device, self.dtype = int(seed), torch.device(device), dtype

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent["samples"]
        if samples.ndim == 5 and samples.shape[2] != 1:
            from ..tagmoe_core.errors import InputError

            raise InputError(f"this LATENT has {samples.shape[2]} frames: TAG-MoE makes single images "
                             "([batch, 16, 1, height/8, width/8])")
        b, c, h, w = samples.shape[0], samples.shape[1], samples.shape[-2], samples.shape[-1]
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        noise = torch.randn((b, 1, c, h, w), generator=generator, device=self.device, dtype=self.dtype)
        noise = noise.reshape(b, c, 1, h, w).float().cpu()
        return noise if samples.ndim == 5 else noise[:, :, 0]


def model_compute(model) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype the model runs its layers."""
    dtype = model.model.manual_cast_dtype or model.model_dtype()
    return torch.device(model.load_device), dtype


# -- per-run routing patches -------------------------------------------------------------------------------
def with_tag_guidance(model, heads, tags: TaskTags, strength: float):
    """A clone whose model calls steer the routers toward the tags: g* is found once, here, and
    its bias (``intent.routing.guidance_bias``) is set around each call, on whatever thread makes it."""
    device, dtype = model_compute(model)
    _, bias = guidance_bias(heads, tags, strength, device, dtype)

    def apply_model(executor, *args, **kwargs):
        with routing_run(logit_bias=bias):
            return executor(*args, **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, GUIDANCE_KEY, apply_model)
    return patched


def _step_of(transformer_options: dict, sigma: torch.Tensor) -> int:
    sample_sigmas = transformer_options.get("sample_sigmas")
    if sample_sigmas is None:
        return 0
    value = float(sigma.flatten()[0])
    return int(torch.argmin((sample_sigmas.float().cpu() - value).abs()))


def with_routing_recorder(model, capture: RoutingCapture):
    """A clone whose sampling runs record every MoE routing decision into ``capture``."""
    state: dict[str, RoutingRecorder | None] = {"recorder": None}

    def outer_sample(executor, *args, **kwargs):
        state["recorder"] = RoutingRecorder()
        try:
            out = executor(*args, **kwargs)
            capture.recording, capture.runs = state["recorder"].recording, capture.runs + 1
        finally:
            state["recorder"] = None
        return out

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        recorder = state["recorder"]
        if recorder is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        passes = ["cond" if i == 0 else "uncond" for i in transformer_options.get("cond_or_uncond", [0])]
        recorder.before_pass(_step_of(transformer_options, t), passes)
        plan = current_plan()
        if plan is not None and "cond" in passes:  # the maps show the conditional pass's layout
            first = plan.conditions[0] if plan.conditions else None
            condition = (first.rows, first.cols) if isinstance(first, RegionShape) else first
            recorder.set_layout(plan.target[0] * plan.target[1], plan.target, condition)
        with recorder.attached():  # around the call: on the thread that makes it
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, RECORD_KEY, outer_sample)
    patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, RECORD_KEY, apply_model)
    return patched

