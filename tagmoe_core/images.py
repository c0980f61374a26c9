"""Pictures as the model takes them: image files opened upright, and every PIL mode as RGB, with
any transparency composited on white."""

from __future__ import annotations

import os
import re
import warnings

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


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (RGBA, LA and palette images alike)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
