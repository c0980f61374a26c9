"""Image files and PIL modes as the model takes them: EXIF orientation, decompression bombs,
unreadable files, and every PIL mode converted to the RGB picture it shows."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tagmoe_core.errors import InputError
from tagmoe_core.images import open_image

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
