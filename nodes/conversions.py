"""ComfyUI data <-> the core's: IMAGE [B,H,W,C] floats, MASK [B,H,W], LATENT {"samples": ...}."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..tagmoe_core.errors import InputError

ORIGINAL_SIZE_KEY = "tagmoe_original_size"  # extra LATENT key: (w, h) of the edited input image


def image_batch_to_pil(image: torch.Tensor) -> list[Image.Image]:
    """IMAGE [B, H, W, 3 or 4] in 0..1 -> PIL images (RGBA stays RGBA: composited on white later)."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"expected an IMAGE of shape [batch, height, width, channels], got {shape}")
    if image.ndim == 3:
        image = image[None]
    arrays = (image.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, modes[a.shape[-1]]) for a in arrays]


def mask_batch(mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        raise InputError("expected a MASK of shape [batch, height, width]")
    return mask[None] if mask.ndim == 2 else mask


def latent_to_batch(latent: dict) -> torch.Tensor:
    """A ComfyUI LATENT's samples as [B, 16, 1, h, w] (4-D latents get their frame axis).

    Latents of several frames are refused: ComfyUI's VAE Encode makes one video of an IMAGE batch,
    and Qwen-Image's VAE compresses time 4x after the first frame (two images give one frame, five
    give two, the second mixing four images), so frames are not images, and nothing in the LATENT
    tells an image batch's video from any other."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise InputError("expected a LATENT (a dict with 'samples')")
    samples = latent["samples"]
    if samples.ndim == 4:
        samples = samples[:, :, None]
    if samples.ndim != 5 or samples.shape[1] != 16:
        raise InputError(f"this LATENT has shape {tuple(samples.shape)}: TAG-MoE (Qwen-Image) latents have 16 "
                         "channels, [batch, 16, 1, height/8, width/8]. Was it made with another model's VAE?")
    if samples.shape[2] > 1:
        raise InputError(f"this LATENT holds {samples.shape[2]} frames (a video): TAG-MoE takes single images. VAE "
                         "Encode makes one video of an IMAGE batch, whose frames are not its images: encode one "
                         "image at a time (Rebatch Images with batch_size 1 before VAE Encode)")
    return samples


def pil_to_image_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]))
