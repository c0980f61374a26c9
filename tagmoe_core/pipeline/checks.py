"""The numbers a run takes, checked before any work: sizes in whole 16-pixel patches, and finite
floats (a NaN cfg silently disabled guidance, an infinite one made a black image)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from .latents import PIXELS_PER_TOKEN


def check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be a whole number of pixels, got {value!r}")
    value = int(value)
    if value < PIXELS_PER_TOKEN or value % PIXELS_PER_TOKEN:
        lower = max(PIXELS_PER_TOKEN, value - value % PIXELS_PER_TOKEN)
        raise InputError(f"{name} must be a positive multiple of {PIXELS_PER_TOKEN} pixels, got {value} "
                         f"(try {lower} or {lower + PIXELS_PER_TOKEN})")
    return value


def check_number(name: str, value: float, minimum: float | None = None) -> float:
    """``value`` as a finite float (NaN and infinities refused: a NaN cfg silently disabled
    guidance, an infinite one made a black image), and at least ``minimum``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value}")
    if minimum is not None and number < minimum:
        bound = "must not be negative" if minimum == 0 else f"must be at least {minimum:g}"
        raise InputError(f"{name} {bound}, got {value}")
    return number
