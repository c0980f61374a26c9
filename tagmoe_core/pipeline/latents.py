"""Latent layouts.

* VAE latents: [B, 16, 1, H/8, W/8], un-normalised. This is also ComfyUI's ``LATENT`` for
  Qwen-Image (the Wan 2.1 latent format), so it is what crosses the API boundary.
* Model tokens: normalised with the VAE config's ``latents_mean`` / ``latents_std`` and packed
  2x2 into [B, H/16 * W/16, 64], the transformer's image-stream input.
"""

from __future__ import annotations

import torch

PATCH = 2  # latent pixels per token side
VAE_SCALE = 8  # image pixels per latent pixel
PIXELS_PER_TOKEN = PATCH * VAE_SCALE  # 16


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] or [B, C, h, w] -> [B, (h/2)(w/2), 4C] (diffusers' ``_pack_latents``)."""
    if latents.ndim == 5:
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, N, 4C] -> [B, C, 1, h, w] for an image of ``height`` x ``width`` pixels."""
    b, _, c4 = tokens.shape
    h, w = height // VAE_SCALE, width // VAE_SCALE
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 1, h, w)


def _stats(vae_config, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = vae_config.z_dim
    mean = torch.tensor(vae_config.latents_mean).view(1, z, 1, 1, 1).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(vae_config.latents_std).view(1, z, 1, 1, 1).to(like.device, like.dtype)
    return mean, inv_std


def normalize(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE latents -> model space, computed as the reference: ``(x - mean) * (1 / std)``."""
    mean, inv_std = _stats(vae_config, latents)
    return (latents - mean) * inv_std


def denormalize(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """Model space -> VAE latents, computed as the reference: ``x / (1 / std) + mean``."""
    mean, inv_std = _stats(vae_config, latents)
    return latents / inv_std + mean
