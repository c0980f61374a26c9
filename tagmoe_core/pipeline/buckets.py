"""Condition-image preparation: Qwen-Image's preferred resolution buckets, as the reference."""

from __future__ import annotations

from PIL import Image

from ..images import to_rgb
from .checks import check_size

DEFAULT_SIZE = 1024  # text-to-image, when no size is given

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


def target_size(image: Image.Image | None, width: int | None, height: int | None,
                init_latents=None) -> tuple[int, int]:
    """Output size: given, else that of ``init_latents``, else the condition's bucket (edit)
    or 1024 (text-to-image). Needs no model: front ends check sizes before loading one."""
    if init_latents is not None and (width is None or height is None):
        height, width = init_latents.shape[-2] * 8, init_latents.shape[-1] * 8
    if image is not None:
        bucket = nearest_bucket(*image.size) if (width is None or height is None) else None
        width = bucket[0] if width is None else width
        height = bucket[1] if height is None else height
    width = DEFAULT_SIZE if width is None else width
    height = DEFAULT_SIZE if height is None else height
    return check_size("width", width), check_size("height", height)
