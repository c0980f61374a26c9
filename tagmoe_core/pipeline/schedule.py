"""The reference's sigma schedule, computed once for both paths (numpy and torch, no diffusers).

Qwen-Image's ``FlowMatchEulerDiscreteScheduler`` as the reference sets it: sigmas
``linspace(1, 1/steps, steps)``, shifted by ``mu`` (growing linearly with the target's token count
between the config's base and max sequence lengths) through the exponential time shift
``e^mu / (e^mu + 1/t - 1)``, then stretched so the last one is ``shift_terminal`` (0.02), then a
final 0. The expressions are diffusers' own, in the same float32 order, so the values are
bit-identical to its scheduler's (``tests/test_schedule.py`` checks). One step cannot be
stretched (the reference divides by zero): it is a single step from 1 to 0.

The diffusers path hands these sigmas to diffusers' scheduler for stepping; the ComfyUI path puts
them on a ``SIGMAS`` link.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import InputError

# Qwen/Qwen-Image's scheduler/scheduler_config.json.
QWEN_IMAGE_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def shift_for(image_seq_len: int, config: Mapping[str, Any] = QWEN_IMAGE_SCHEDULER) -> float:
    """``mu`` of the dynamic shift for a target of ``image_seq_len`` tokens (16x16-pixel patches)."""
    return calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def shifted_sigmas(steps: int, image_seq_len: int, config: Mapping[str, Any] = QWEN_IMAGE_SCHEDULER) -> np.ndarray:
    """The ``steps`` sigmas of a full run (float32, without the final 0)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"steps must be a whole number of at least 1, got {steps!r}")
    for flag in _UNSUPPORTED:
        if config.get(flag):
            raise InputError(f"scheduler configs with {flag} are not what Qwen-Image uses; not supported")
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if config.get("use_dynamic_shifting"):
        mu = shift_for(image_seq_len, config)
        if config.get("time_shift_type", "exponential") == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        shift = config.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    terminal = config.get("shift_terminal")
    if terminal and steps > 1:  # one step: 1 -> 0, no stretch (the reference's NaN)
        one_minus_z = 1 - sigmas
        scale_factor = one_minus_z[-1] / (1 - terminal)
        sigmas = 1 - (one_minus_z / scale_factor)
    return sigmas


def check_denoise(denoise: float) -> float:
    """``denoise`` as a float in (0, 1] (NaN, infinities and non-numbers refused)."""
    try:
        value = float(denoise)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise InputError(f"denoise must be in (0, 1], got {denoise}")
    return value


def first_step(steps: int, denoise: float) -> int:
    """Index of the first step kept when ``denoise`` < 1: the last ``round(steps * denoise)``
    steps run (image-to-image from given latents), like diffusers' img2img pipelines."""
    denoise = check_denoise(denoise)
    return steps - max(1, min(steps, int(round(steps * denoise)))) if denoise < 1.0 else 0


def reference_sigmas(steps: int, image_seq_len: int, denoise: float = 1.0,
                     config: Mapping[str, Any] = QWEN_IMAGE_SCHEDULER) -> torch.Tensor:
    """The sigmas a run walks through, final 0 included (float32): a ComfyUI ``SIGMAS``."""
    start = first_step(steps, denoise)
    sigmas = torch.from_numpy(shifted_sigmas(steps, image_seq_len, config)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])[start:]


def image_seq_len(height: int, width: int) -> int:
    """Target tokens of a ``height`` x ``width`` pixel image (16x16-pixel patches)."""
    return (height // 16) * (width // 16)
