"""The reference's true classifier-free guidance, once for both paths.

``comb = neg + s (pos - neg)``, then every token rescaled to the norm of the conditional
prediction: ``comb * ||pos|| / ||comb||``, the norm over the token's 64 values (16 latent channels
x a 2x2 patch), no clamp. It runs only when ``s > 1`` (otherwise the conditional prediction alone).
ComfyUI's CFGNorm is a different rule (per channel, on the clean-image prediction, clamped at 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .latents import pack, unpack


def uses_cfg(scale: float) -> bool:
    return float(scale) > 1.0


def true_cfg(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """On packed tokens [..., 64]: ``neg + s (pos - neg)`` rescaled per token to the norm of ``pos``."""
    combined = negative + scale * (positive - negative)
    cond_norm = torch.norm(positive, dim=-1, keepdim=True)
    comb_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / comb_norm)


def true_cfg_latents(positive: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`true_cfg` on latent-layout predictions [B, C, H, W] or [B, C, T, H, W] (every frame
    on its own), with the tokens the transformer sees: 2x2 patches of all channels. An odd height
    or width (not a size the reference makes) is padded with zeros, which add nothing to the norms."""
    if not uses_cfg(scale):
        return positive
    frames = positive.ndim == 5
    if frames:
        b, c, t, h, w = positive.shape
        positive, negative = (x.movedim(2, 1).reshape(b * t, c, h, w) for x in (positive, negative))
    _, _, h, w = positive.shape
    pad = (0, w % 2, 0, h % 2)
    if any(pad):
        positive, negative = F.pad(positive, pad), F.pad(negative, pad)
    ph, pw = positive.shape[-2:]
    out = unpack(true_cfg(pack(positive), pack(negative), scale), ph * 8, pw * 8)[:, :, 0, :h, :w]
    if frames:
        out = out.reshape(b, t, c, h, w).movedim(1, 2)
    return out
