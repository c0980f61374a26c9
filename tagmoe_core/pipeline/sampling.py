"""The denoising loop of the reference: FlowMatch Euler with dynamic shift and true CFG.

* sigmas ``linspace(1, 1/steps, steps)`` shifted by ``mu``, which grows linearly with the
  target's token count between the scheduler config's base and max sequence lengths;
* the transformer sees ``t / 1000``;
* true CFG combines ``neg + s (pos - neg)`` and rescales every token back to the norm of the
  conditional prediction; it runs only when ``s > 1``;
* condition tokens ride after the target tokens and are cut off the prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .latents import denormalize, unpack
from .text_encoding import PromptEmbeds


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def reference_sigmas(steps: int) -> np.ndarray:
    return np.linspace(1.0, 1.0 / steps, steps)


def make_schedule(scheduler_config, steps: int, image_seq_len: int, device: torch.device | str,
                  denoise: float = 1.0) -> tuple[FlowMatchEulerDiscreteScheduler, torch.Tensor]:
    """A fresh scheduler (runs never share state) set to the reference's schedule.

    ``denoise`` < 1 keeps the last ``round(steps * denoise)`` steps (image-to-image from given
    latents), like diffusers' img2img pipelines and ComfyUI's samplers.
    """
    config = dict(scheduler_config)
    if steps == 1:
        # One step: sigma 1 -> 0. The terminal stretch divides by (1 - last sigma) = 0 (NaN in
        # the reference); a single Euler step needs no stretch.
        config["shift_terminal"] = None
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=reference_sigmas(steps), device=device, mu=mu)
    timesteps = scheduler.timesteps
    start = steps - max(1, min(steps, int(round(steps * denoise)))) if denoise < 1.0 else 0
    scheduler.set_begin_index(start)
    return scheduler, timesteps[start:]


def true_cfg(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """``neg + s (pos - neg)`` rescaled per token to the norm of ``pos`` (channel dimension)."""
    combined = negative + scale * (positive - negative)
    cond_norm = torch.norm(positive, dim=-1, keepdim=True)
    comb_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / comb_norm)


@dataclass
class StepInfo:
    """What a step callback sees after step ``step`` (0-based) of ``total``.

    ``latents`` and ``denoised`` are model-space packed tokens [B, N, 64]; ``denoised`` is the
    prediction of the clean image, ``x_t - sigma * v``.
    """

    step: int
    total: int
    timestep: float
    sigma: float
    latents: torch.Tensor
    denoised: torch.Tensor
    height: int
    width: int
    vae_config: object

    def denoised_latents(self) -> torch.Tensor:
        """The clean-image prediction, unpacked but still normalised: [B, 16, 1, H/8, W/8]
        (what ComfyUI's latent previewers expect)."""
        return unpack(self.denoised.float(), self.height, self.width)

    def denoised_vae_latents(self) -> torch.Tensor:
        """The clean-image prediction as VAE latents [B, 16, 1, H/8, W/8]."""
        return denormalize(self.denoised_latents(), self.vae_config)


StepCallback = Callable[[StepInfo], None]


@dataclass
class DenoiseInputs:
    latents: torch.Tensor  # [B, N, 64] model space, already noised for the first step
    img_shapes: Sequence  # diffusers img_shapes for one sample: target first, then the condition
    positive: PromptEmbeds
    negative: PromptEmbeds | None
    condition: torch.Tensor | None = None  # [B, M, 64] condition tokens, or None (text-to-image)


@torch.inference_mode()
def denoise(transformer, scheduler: FlowMatchEulerDiscreteScheduler, timesteps: torch.Tensor,
            inputs: DenoiseInputs, cfg_scale: float, height: int, width: int, vae_config,
            callback: StepCallback | None = None,
            before_pass: Callable[[int, str], None] | None = None) -> torch.Tensor:
    """``callback`` runs after every step; ``before_pass(step, "cond" | "uncond")`` before every
    transformer pass (a cancellation raised there stops the run within half a step)."""
    latents = inputs.latents
    batch, num_target = latents.shape[0], latents.shape[1]
    img_shapes = [list(inputs.img_shapes)] * batch
    do_cfg = cfg_scale > 1.0 and inputs.negative is not None

    def predict(prompt: PromptEmbeds, timestep: torch.Tensor, step: int, cache: str) -> torch.Tensor:
        if before_pass is not None:
            before_pass(step, cache)
        hidden = latents if inputs.condition is None else torch.cat([latents, inputs.condition], dim=1)
        with transformer.cache_context(cache):
            out = transformer(
                hidden_states=hidden,
                timestep=timestep / 1000,
                encoder_hidden_states=prompt.embeds,
                # The reference attends over every text token; a mask is only needed for padding.
                encoder_hidden_states_mask=None if prompt.fully_valid else prompt.mask,
                img_shapes=img_shapes,
                return_dict=False,
            )[0]
        return out[:, :num_target]

    sigmas = scheduler.sigmas
    begin = scheduler.begin_index or 0
    for i, t in enumerate(timesteps):
        timestep = t.expand(batch).to(latents.dtype)
        noise_pred = predict(inputs.positive, timestep, i, "cond")
        if do_cfg:
            noise_pred = true_cfg(noise_pred, predict(inputs.negative, timestep, i, "uncond"), cfg_scale)
        sigma = sigmas[begin + i]
        step_input = latents
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if callback is not None:
            denoised = step_input - sigma.to(step_input.device, step_input.dtype) * noise_pred
            callback(StepInfo(i, len(timesteps), float(t), float(sigma), latents, denoised, height, width,
                              vae_config))
    return latents
