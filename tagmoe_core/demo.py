"""A small built-in picture for demos and tests (drawn, so nothing has to be shipped)."""

from __future__ import annotations

from PIL import Image, ImageDraw


def demo_image(width: int = 256, height: int = 192) -> Image.Image:
    """A landscape: sky gradient, sun, hills, and a figure in a blue cloak."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / max(height - 1, 1)
        draw.line([(0, y), (width, y)], fill=(int(90 + 100 * t), int(150 + 60 * t), int(235 - 40 * t)))
    s = min(width, height)
    draw.ellipse([width * 0.75, height * 0.08, width * 0.75 + s * 0.18, height * 0.08 + s * 0.18], fill=(255, 214, 90))
    draw.polygon([(0, height * 0.7), (width * 0.35, height * 0.5), (width * 0.7, height * 0.72), (width, height * 0.6),
                  (width, height), (0, height)], fill=(70, 140, 70))
    cx, top = width * 0.45, height * 0.38
    draw.polygon([(cx, top), (cx - s * 0.12, top + s * 0.42), (cx + s * 0.12, top + s * 0.42)], fill=(40, 60, 170))
    draw.ellipse([cx - s * 0.05, top - s * 0.1, cx + s * 0.05, top], fill=(235, 195, 160))
    return image
