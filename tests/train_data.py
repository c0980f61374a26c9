"""A small training data folder drawn with PIL: recolour edits of a circle and one text-to-image sample."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
SIZE = (64, 48)


def scene(fill: tuple[int, int, int], size: tuple[int, int] = SIZE) -> Image.Image:
    image = Image.new("RGB", size, (235, 235, 205))
    w, h = size
    ImageDraw.Draw(image).ellipse((w // 4, h // 6, 3 * w // 4, 5 * h // 6), fill=fill)
    return image


def make_data(root: Path, *, t2i: bool = True, tags: bool = True) -> Path:
    """``root/samples.jsonl`` with three edits (tags given when ``tags``) and, with ``t2i``, one text-to-image."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, colour) in enumerate(COLOURS.items()):
        scene((128, 128, 128)).save(root / f"{i}_in.png")
        scene(colour).save(root / f"{i}_out.png")
        entry = {"input": f"{i}_in.png", "target": f"{i}_out.png", "instruction": f"Make the circle {name}"}
        if tags:
            entry["tags"] = ["local editing", "attribute editing", "background preservation"]
        entries.append(entry)
    if t2i:
        square = Image.new("RGB", SIZE, (240, 220, 20))
        ImageDraw.Draw(square).rectangle((20, 10, 44, 38), fill=(30, 60, 220))
        square.save(root / "t2i.png")
        entries.append({"target": "t2i.png", "instruction": "A blue square on a yellow background"})
    write_samples(root, entries)
    return root


def write_samples(root: Path, entries: list[dict]) -> None:
    (root / "samples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
