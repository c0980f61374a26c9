"""Condition-image preparation: Qwen-Image's preferred resolution buckets, as the reference."""

from __future__ import annotations

from PIL import Image

from ..images import to_rgb

_TALL = ((512, 2048), (512, 1984), (512, 1920), (512, 1856), (512, 1792), (512, 1728), (512, 1664),
         (512, 1600), (512, 1536), (576, 1472), (640, 1408), (704, 1344), (768, 1280), (832, 1216),
         (896, 1152), (960, 1088))
# (width, height): portrait buckets, the square, then the landscape transposes, in the reference's order.
PREFERRED_BUCKETS: tuple[tuple[int, int], ...] = _TALL + ((1024, 1024),) + tuple((h, w) for w, h in reversed(_TALL))


def nearest_bucket(width: int, height: int) -> tuple[int, int]:
    """The preferred (width, height) whose aspect ratio is nearest ``width / height``.

    Ties go to the smaller width, as in the reference (it takes ``min`` over
    ``(|ratio difference|, w, h)`` tuples).
    """
    ratio = width / height
    _, w, h = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_BUCKETS)
    return w, h


def snap_to_bucket(image: Image.Image) -> Image.Image:
    """RGB image resized (Lanczos) to the preferred bucket nearest its aspect ratio."""
    rgb = to_rgb(image)
    return rgb.resize(nearest_bucket(*rgb.size), Image.LANCZOS)
