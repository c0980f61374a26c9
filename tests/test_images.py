"""Image files and PIL modes as the model takes them: EXIF orientation, decompression bombs,
unreadable files, and every PIL mode converted to the RGB picture it shows."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tagmoe_core.errors import InputError
from tagmoe_core.images import open_image, to_rgb

ORIENTATION = 0x0112


def _with_orientation(image: Image.Image, path, orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    image.save(path, exif=exif)


def test_exif_orientation_is_applied(photo, tmp_path):
    """A phone photo stored landscape with "rotate 90 CW to view" (orientation 6) opens upright."""
    _with_orientation(photo, tmp_path / "phone.png", 6)
    with Image.open(tmp_path / "phone.png") as raw:
        assert raw.size == (72, 40)  # PIL alone gives the sensor's sideways picture
    opened = open_image(tmp_path / "phone.png")
    assert opened.size == (40, 72)
    assert np.array_equal(np.asarray(opened), np.asarray(photo.transpose(Image.Transpose.ROTATE_270)))
    _with_orientation(photo, tmp_path / "mirrored.png", 2)  # mirrored: no size change, flipped pixels
    assert np.array_equal(np.asarray(open_image(tmp_path / "mirrored.png")),
                          np.asarray(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def test_open_image_returns_a_loaded_copy(photo, tmp_path):
    photo.save(tmp_path / "p.png")
    opened = open_image(str(tmp_path / "p.png"))
    (tmp_path / "p.png").unlink()  # the file handle is closed and the pixels are in memory
    assert opened.mode == "RGB" and np.array_equal(np.asarray(opened), np.asarray(photo))


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` (8-bit RGB) over a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_decompression_bombs_are_refused_naming_the_pixels_and_the_limit(photo, tmp_path):
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(InputError, match=r"400,000,000 pixels, more than the 178,956,970 allowed"):
        open_image(tmp_path / "bomb.png")
    photo.save(tmp_path / "p.png")
    with pytest.raises(InputError, match=r"72x40 = 2,880 pixels, more than the 1,000 allowed"):
        open_image(tmp_path / "p.png", max_pixels=1000)


def test_files_that_are_not_images_are_clear_errors(photo, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="is a folder"):
        open_image(tmp_path)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputError, match="cannot be read as an image"):
        open_image(tmp_path / "notes.png")
    photo.save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot be read as an image"):
        open_image(tmp_path / "cut.png")


# -- PIL modes ---------------------------------------------------------------------------------------------------
def _gray(photo: Image.Image) -> np.ndarray:
    return np.asarray(photo.convert("L"))


def _pixels(image: Image.Image) -> np.ndarray:
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out).astype(np.int16)


def _as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1).astype(np.int16)


def test_16_bit_pictures_give_the_8_bit_pixels(photo, tmp_path):
    """A 16-bit grayscale picture (values x 257) is the same picture as its 8-bit version (it came
    out 99.6% white: PIL clips 16-bit values to 255)."""
    gray = _gray(photo)
    wide = gray.astype(np.uint16) * 257
    expected = _pixels(Image.fromarray(gray, "L"))
    assert np.array_equal(expected, _as_rgb(gray))
    little = Image.fromarray(wide)
    assert little.mode == "I;16"
    big = Image.frombytes("I;16B", little.size, wide.astype(">u2").tobytes())
    widened = Image.fromarray(wide.astype(np.int32))  # what some readers (PGM, TIFF) hand out: mode I
    assert widened.mode == "I"
    for image in (little, big, widened):
        assert np.array_equal(_pixels(image), expected), image.mode
    little.save(tmp_path / "16bit.png")  # a real 16-bit PNG file
    reopened = open_image(tmp_path / "16bit.png")
    assert reopened.mode.startswith("I") and np.array_equal(_pixels(reopened), expected)


def test_float_pictures_are_scaled_from_0_1_or_from_their_range(photo, tmp_path):
    gray = _gray(photo)
    unit = Image.fromarray(gray.astype(np.float32) / 255)  # 0..1, as float TIFFs usually hold
    assert unit.mode == "F"
    assert np.array_equal(_pixels(unit), _as_rgb(gray))  # it came out all black
    unit.save(tmp_path / "float.tif")
    assert np.array_equal(_pixels(open_image(tmp_path / "float.tif")), _as_rgb(gray))
    # Outside 0..1 (e.g. HDR or raw sensor values): stretched from its minimum to its maximum.
    values = gray.astype(np.float32) * 7.5 - 300.0
    stretched = np.round((values - values.min()) / (values.max() - values.min()) * 255)
    assert np.array_equal(_pixels(Image.fromarray(values)), _as_rgb(stretched))
    # 32-bit integers beyond 16 bits: likewise stretched.
    big = gray.astype(np.int64) * 100_000 - 5
    stretched = np.round((big - big.min()) / (big.max() - big.min()) * 255)
    assert np.array_equal(_pixels(Image.fromarray(big.astype(np.int32))), _as_rgb(stretched))


def test_pictures_with_nan_or_inf_are_refused(photo):
    values = _gray(photo).astype(np.float32) / 255
    values[3, 4] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        to_rgb(Image.fromarray(values))


@pytest.mark.parametrize("mode, tolerance", [
    ("RGB", 0), ("RGBX", 0), ("RGBA", 0), ("CMYK", 0), ("YCbCr", 3), ("HSV", 6), ("LAB", 24),
])
def test_colour_modes_show_the_same_picture(photo, mode, tolerance):
    """Within the rounding of each mode's 8-bit channels (LAB's are coarse in the saturated colours)."""
    converted = photo.convert(mode)
    assert converted.mode == mode
    error = np.abs(_pixels(converted) - np.asarray(photo).astype(np.int16))
    assert error.max() <= tolerance and error.mean() < 2, (mode, error.max(), error.mean())


def test_palette_pictures_show_their_palette_colours(photo):
    indexed = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette = np.array(indexed.getpalette()[:3 * 64]).reshape(-1, 3)
    assert np.array_equal(_pixels(indexed), palette[np.asarray(indexed)])


@pytest.mark.parametrize("mode", ["1", "L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"])
def test_gray_modes_show_the_same_picture(photo, mode):
    gray = _gray(photo)
    if mode == "1":
        expected = np.where(gray >= 128, 255, 0)
        image = Image.fromarray(gray).point(lambda v: 255 if v >= 128 else 0).convert("1", dither=Image.Dither.NONE)
    elif mode.startswith("I;16"):
        order = {"I;16B": ">u2", "I;16N": "=u2"}.get(mode, "<u2")
        image = Image.frombytes(mode, photo.size, (gray.astype(np.uint16) * 257).astype(order).tobytes())
        expected = gray
    elif mode == "I":
        image, expected = Image.fromarray(gray.astype(np.int32) * 257), gray
    elif mode == "F":
        image, expected = Image.fromarray(gray.astype(np.float32) / 255), gray
    else:
        image, expected = Image.fromarray(gray), gray
    assert image.mode == mode
    assert np.array_equal(_pixels(image), _as_rgb(expected)), mode


def test_transparency_is_composited_on_white_in_every_mode():
    # A red square, its right half 25% opaque.
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:, 4:, 3] = 64
    image = Image.fromarray(rgba, "RGBA")
    over_white = np.round(200 * 64 / 255 + 255 * (1 - 64 / 255))
    out = _pixels(image)
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert np.abs(out[0, 7] - [over_white, round(255 * (1 - 64 / 255)), round(255 * (1 - 64 / 255))]).max() <= 1
    for mode in ("RGBa", "PA"):  # premultiplied, and a palette with per-pixel alpha
        assert np.abs(_pixels(image.convert(mode)) - out).max() <= 2, mode
    la = image.convert("LA")
    gray = np.asarray(la)[..., 0].astype(np.float64)
    alpha = np.asarray(la)[..., 1] / 255
    expected = np.round(gray * alpha + 255 * (1 - alpha))
    assert np.abs(_pixels(la) - _as_rgb(expected)).max() <= 1
    assert np.abs(_pixels(la.convert("La")) - _as_rgb(expected)).max() <= 2  # premultiplied gray
    # A palette with a transparent index, and a gray/RGB picture with a transparent colour (PNG tRNS).
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    assert tuple(_pixels(palette)[0, 0]) == (255, 255, 255) and tuple(_pixels(palette)[1, 1]) == (10, 200, 30)
    keyed = Image.new("RGB", (4, 4), (0, 0, 0))
    keyed.putpixel((2, 2), (9, 9, 9))
    keyed.info["transparency"] = (0, 0, 0)
    assert tuple(_pixels(keyed)[0, 0]) == (255, 255, 255) and tuple(_pixels(keyed)[2, 2]) == (9, 9, 9)
    gray_keyed = Image.new("L", (4, 4), 0)
    gray_keyed.info["transparency"] = 0
    assert tuple(_pixels(gray_keyed)[0, 0]) == (255, 255, 255)


MODES = ("1", "CMYK", "F", "HSV", "I", "I;16", "I;16B", "I;16L", "I;16N", "L", "LA", "La", "LAB", "P", "PA", "RGB",
         "RGBA", "RGBa", "RGBX", "YCbCr")  # Pillow's Image.MODES


def test_every_pil_mode_is_handled():
    assert set(getattr(Image, "MODES", MODES)) <= set(MODES)  # a mode added to Pillow gets a look here
    for mode in MODES:
        assert to_rgb(Image.new(mode, (4, 4))).mode == "RGB", mode


def test_a_16_bit_picture_gives_the_same_edit_as_its_8_bit_version(tiny_pipe, photo):
    gray = _gray(photo)
    eight = tiny_pipe.edit(Image.fromarray(gray, "L"), "Make it night", width=32, height=32, steps=1, seed=4)
    sixteen = tiny_pipe.edit(Image.fromarray(gray.astype(np.uint16) * 257), "Make it night", width=32, height=32,
                             steps=1, seed=4)
    assert np.array_equal(np.asarray(sixteen.images[0]), np.asarray(eight.images[0]))
