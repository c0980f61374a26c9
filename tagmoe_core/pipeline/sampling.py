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

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .guidance import true_cfg, uses_cfg
from .latents import denormalize, unpack
from .schedule import first_step, shifted_sigmas
from .text_encoding import PromptEmbeds


def make_schedule(scheduler_config, steps: int, image_seq_len: int, device: torch.device | str,
                  denoise: float = 1.0) -> tuple[FlowMatchEulerDiscreteScheduler, torch.Tensor]:
    """A fresh scheduler (runs never share state) stepping through the reference's schedule
    (``schedule.shifted_sigmas``: computed there, handed over unshifted). ``denoise`` < 1 keeps the
    last ``round(steps * denoise)`` steps."""
    config = dict(scheduler_config)
    sigmas = shifted_sigmas(steps, image_seq_len, config)
    plain = {**config, "use_dynamic_shifting": False, "shift": 1.0, "shift_terminal": None}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(plain)
    scheduler.set_timesteps(sigmas=sigmas, device=device)
    start = first_step(steps, denoise)
    scheduler.set_begin_index(start)
    return scheduler, scheduler.timesteps[start:]


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
    do_cfg = uses_cfg(cfg_scale) and inputs.negative is not None

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
