"""Region edits: a box on the input image -> the box of condition tokens that is kept.

A box comes in pixels of the image as given (``--region``, or a MASK's bounding box) and becomes
an inclusive box of 16-pixel patches on the grid the condition is encoded at (the target size).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError
from .latents import PIXELS_PER_TOKEN


def region_from_pixel_box(box: Sequence[float], image_size: tuple[int, int],
                          target_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box (x1, y1, x2, y2; pixels of the image as given, x2/y2 exclusive) -> the inclusive
    patch box of the condition grid the image is encoded at (``target_size`` pixels)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    (iw, ih), (tw, th) = image_size, target_size
    if not all(np.isfinite([x1, y1, x2, y2])):
        raise InputError(f"region {tuple(box)} must be four finite numbers")
    if not (0 <= x1 < x2 <= iw and 0 <= y1 < y2 <= ih):
        raise InputError(f"region {tuple(box)} must lie inside the {iw}x{ih} image with x1 < x2 and y1 < y2")
    gw, gh = tw // PIXELS_PER_TOKEN, th // PIXELS_PER_TOKEN
    px1 = int(np.floor(x1 / iw * gw))
    py1 = int(np.floor(y1 / ih * gh))
    px2 = max(px1, int(np.ceil(x2 / iw * gw)) - 1)
    py2 = max(py1, int(np.ceil(y2 / ih * gh)) - 1)
    return px1, py1, min(px2, gw - 1), min(py2, gh - 1)


def check_patch_box(box: Sequence[float]) -> tuple[int, int, int, int]:
    """A patch box (x1, y1, x2, y2; inclusive, 16-pixel patches) as four whole numbers (NaN,
    infinities and fractions refused; whether it fits the grid is ``RegionShape``'s check)."""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4 or not all(np.isfinite(values)) or any(v != int(v) for v in values):
        shown = tuple(box) if isinstance(box, Sequence) else box
        raise InputError(f"region box {shown} must be four whole numbers x1, y1, x2, y2 (16-pixel patches)")
    x1, y1, x2, y2 = (int(v) for v in values)
    return x1, y1, x2, y2


def mask_box(mask: torch.Tensor, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel bounding box (x1, y1, x2, y2; x2/y2 exclusive) of ``mask > 0.5`` in an image of ``image_size``."""
    height, width = mask.shape[-2:]
    rows = torch.nonzero(mask > 0.5)
    if rows.numel() == 0:
        raise InputError("the mask is empty: paint the region to edit (white = edit)")
    if (width, height) != tuple(image_size):
        raise InputError(f"the mask is {width}x{height} but the image is {image_size[0]}x{image_size[1]}; "
                         "use a mask made for this image")
    y1, x1 = rows.min(dim=0).values.tolist()
    y2, x2 = rows.max(dim=0).values.tolist()
    return x1, y1, x2 + 1, y2 + 1


def box_from_fractions(text: str, image_size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """``"x1,y1,x2,y2"`` as fractions (0..1) of the image's width and height -> a pixel box of an
    image of ``image_size``; an empty text is no region."""
    if not str(text).strip():
        return None
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(np.isfinite(values)):
        raise InputError(f"region must be four numbers x1,y1,x2,y2 (fractions of the image, e.g. 0.25,0.25,0.75,0.75), "
                         f"got {text!r}")
    x1, y1, x2, y2 = values
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
        raise InputError(f"region {text!r}: fractions must satisfy 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")
    width, height = image_size
    return x1 * width, y1 * height, x2 * width, y2 * height
