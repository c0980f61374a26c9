"""Pictures as the model takes them: image files opened upright, and every PIL mode as RGB, with
any transparency composited on white."""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

# PIL's own hard limit (twice its default ``Image.MAX_IMAGE_PIXELS``): ~540 MB as 8-bit RGB, far
# more than the model looks at (the condition image is resized to a ~1 megapixel bucket).
MAX_PIXELS = 178_956_970


def _too_large(path, pixels: int, limit: int, size: tuple[int, int] | None = None) -> InputError:
    what = f"{size[0]}x{size[1]} = {pixels:,}" if size else f"{pixels:,}"
    return InputError(f"input image '{path}' is {what} pixels, more than the {limit:,} allowed (a decompression "
                      "bomb, or a far larger picture than the model uses): shrink it first")


def open_image(path: str | os.PathLike, *, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """An image file, loaded and upright: its EXIF orientation applied (a phone photo stored
    sideways comes out as it is shown). Pictures over ``max_pixels`` (None: no limit) are
    refused before their pixels are decoded; missing, unreadable, truncated and non-image files
    are :class:`InputError` with a one-line message. The mode is the file's (see :func:`to_rgb`)."""
    try:
        with warnings.catch_warnings():
            # The size is checked below, against max_pixels; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                pixels = im.width * im.height
                if max_pixels is not None and pixels > max_pixels:
                    raise _too_large(path, pixels, max_pixels, im.size)
                im.load()
                upright = ImageOps.exif_transpose(im)
                return upright if upright is not im else im.copy()
    except Image.DecompressionBombError as exc:  # over PIL's own limit: refused before our check
        found = [int(n) for n in re.findall(r"\d+", str(exc))]
        if len(found) >= 2:
            raise _too_large(path, found[0], found[1]) from exc
        raise InputError(f"input image '{path}' is too large ({exc})") from exc
    except FileNotFoundError as exc:
        raise InputError(f"input image '{path}' does not exist") from exc
    except IsADirectoryError as exc:
        raise InputError(f"input image '{path}' is a folder, not an image file") from exc
    except PermissionError as exc:
        raise InputError(f"input image '{path}' cannot be read (permission denied)") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # PIL raises OSError for truncated data, SyntaxError/ValueError from some broken headers.
        raise InputError(f"input image '{path}' cannot be read as an image ({exc})") from exc


_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_KEYED_MODES = ("P", "L", "RGB")  # a transparent index or colour in ``info["transparency"]`` (PNG tRNS)


def _high_depth_to_8_bit(image: Image.Image) -> Image.Image:
    """Modes I;16*, I and F as 8-bit L (see :func:`to_rgb` for the rule)."""
    values = np.asarray(image)  # numpy reads the byte order of I;16B and I;16N
    if image.mode == "F" or values.dtype.kind == "f":
        values = values.astype(np.float64)
        if not np.isfinite(values).all():
            raise InputError("the image has NaN or infinite pixel values; it cannot be shown as a picture")
        low, high = (0.0, 1.0) if values.size == 0 or (values.min() >= 0.0 and values.max() <= 1.0) \
            else (float(values.min()), float(values.max()))
    else:
        values = values.astype(np.int64)
        in_16_bits = values.size == 0 or (values.min() >= 0 and values.max() <= 65535)
        low, high = (0, 65535) if in_16_bits else (int(values.min()), int(values.max()))
    if high == low:  # a flat picture outside 0..1 (or 16 bits): as its value clipped to the nominal range
        nominal = 1.0 if image.mode == "F" else 65535
        scaled = np.clip(values / nominal, 0.0, 1.0)
    else:
        scaled = (values - low) / (high - low)
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L")


def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """The picture ``image`` shows, as 8-bit RGB, from any PIL mode.

    * Alpha (RGBA, RGBa, LA, La, PA) and a transparent palette index or colour (P, L and RGB with
      ``info["transparency"]``, PNG's tRNS) are composited on white.
    * 16-bit grayscale (I;16, I;16L, I;16B, I;16N) is scaled from 0..65535, so a 16-bit picture
      gives the same pixels as its 8-bit version (values x 257). Mode I (32-bit integers, what
      PIL widens 16-bit files to) likewise when every value is within 0..65535, else stretched
      from its minimum to its maximum.
    * Floats (F) are scaled from 0..1 when every value is within 0..1, else stretched from their
      minimum to their maximum; NaN or infinite values are refused (:class:`InputError`).
    * 1, L, P, RGB, RGBX, CMYK, YCbCr, LAB and HSV are converted by PIL.
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_8_bit(image).convert("RGB")
    if mode == "La":  # premultiplied: PIL converts it only to LA
        image, mode = image.convert("LA"), "LA"
    if mode in _ALPHA_MODES or (mode in _KEYED_MODES and "transparency" in image.info):
        return _on_white(image.convert("RGBA"))
    return image.convert("RGB")
