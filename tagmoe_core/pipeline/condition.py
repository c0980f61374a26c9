"""The condition image as the reference prepares it, without diffusers: RGB (transparency on white),
resized (Lanczos) to the preferred bucket nearest its aspect ratio, then to the target size (the
bucket itself unless another size is asked for), as 0..1 pixels or as the VAE's -1..1 input."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .buckets import snap_to_bucket


def condition_image(image: Image.Image, width: int, height: int) -> Image.Image:
    snapped = snap_to_bucket(image)
    # diffusers' VaeImageProcessor.resize (Lanczos, no reducing gap); PIL returns a copy at the same size.
    return snapped.resize((width, height), resample=Image.LANCZOS, reducing_gap=None)


def condition_pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, height, width, 3] float32 in 0..1 (ComfyUI's IMAGE layout)."""
    array = np.array(condition_image(image, width, height)).astype(np.float32) / 255.0
    return torch.from_numpy(array)[None]


def vae_input(pixels: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] 0..1 -> the VAE's [B, 3, 1, H, W] in -1..1."""
    return (2.0 * pixels - 1.0).permute(0, 3, 1, 2)[:, :, None]
