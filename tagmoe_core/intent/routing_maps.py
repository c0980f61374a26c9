"""Pictures of where each expert works: per-expert spatial maps over the image."""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .routing import RoutingRecording

EXPERT_COLORS = [(230, 57, 70), (42, 157, 143), (69, 123, 231), (244, 162, 97), (155, 93, 229), (255, 209, 102),
                 (6, 214, 160), (239, 71, 111)]
LABEL_HEIGHT = 18


def _panel(share: torch.Tensor, color, base: Image.Image | None, size: tuple[int, int]) -> Image.Image:
    """``share`` [rows, cols] in 0..1 drawn in ``color`` over a dimmed ``base``."""
    heat = Image.fromarray((share.clamp(0, 1).numpy() * 255).astype(np.uint8)).resize(size, Image.NEAREST)
    background = (base.convert("RGB").resize(size, Image.LANCZOS) if base is not None
                  else Image.new("RGB", size, (40, 40, 40)))
    dimmed = Image.blend(background, Image.new("RGB", size, (0, 0, 0)), 0.45)
    return Image.composite(Image.new("RGB", size, color), dimmed, heat.point(lambda v: int(v * 0.85)))


def _argmax_panel(maps: torch.Tensor, base: Image.Image | None, size: tuple[int, int]) -> Image.Image:
    winner = maps.argmax(0).numpy()
    palette = np.array([EXPERT_COLORS[i % len(EXPERT_COLORS)] for i in range(maps.shape[0])], dtype=np.uint8)
    colored = Image.fromarray(palette[winner]).resize(size, Image.NEAREST)
    if base is None:
        return colored
    return Image.blend(base.convert("RGB").resize(size, Image.LANCZOS), colored, 0.6)


def render_expert_maps(recording: RoutingRecording, layers=None, steps=None, target_image: Image.Image | None = None,
                       condition_image: Image.Image | None = None, sample: int = 0,
                       panel_width: int = 256) -> Image.Image:
    """A grid: one row for the target tokens, one for the condition tokens (when there are
    any); one panel per expert (its share of the chosen layers and steps) and one of the
    winning expert per token."""
    target, condition = recording.expert_maps(layers, steps, sample)
    rows = [("target", target, target_image)] + ([("condition", condition, condition_image)]
                                                  if condition is not None else [])
    num_experts = target.shape[0]
    font = ImageFont.load_default()
    panels_per_row = num_experts + 1
    heights = [max(16, round(panel_width * m.shape[1] / m.shape[2])) for _, m, _ in rows]
    canvas = Image.new("RGB", (panels_per_row * panel_width, sum(h + LABEL_HEIGHT for h in heights)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (label, maps, base), height in zip(rows, heights):
        size = (panel_width, height)
        for e in range(num_experts):
            color = EXPERT_COLORS[e % len(EXPERT_COLORS)]
            canvas.paste(_panel(maps[e], color, base, size), (e * panel_width, y + LABEL_HEIGHT))
            draw.text((e * panel_width + 4, y + 3), f"{label}: expert {e} ({maps[e].mean():.0%})", fill=color,
                      font=font)
        canvas.paste(_argmax_panel(maps, base, size), (num_experts * panel_width, y + LABEL_HEIGHT))
        draw.text((num_experts * panel_width + 4, y + 3), f"{label}: top expert", fill=(230, 230, 230), font=font)
        y += height + LABEL_HEIGHT
    return canvas


def parse_selection(text: str, available: list[int], what: str) -> list[int] | None:
    """'all' (None), '50,55', '50-59' or '0-4, 29' -> indices, checked against ``available``."""
    from ..errors import InputError

    text = (text or "").strip().lower()
    if text in ("", "all", "*"):
        return None
    chosen: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            chosen += list(range(int(span[1]), int(span[2]) + 1)) if span else [int(part)]
        except ValueError as exc:
            raise InputError(f"{what} must be 'all', numbers or ranges such as '50-59, 55'; got {text!r}") from exc
    if not chosen:
        raise InputError(f"{what} {text!r} selects nothing (write ranges low-high, e.g. '1-3')")
    chosen = [available[c] if -len(available) <= c < 0 else c for c in chosen]  # -1 = the last recorded
    missing = [c for c in chosen if c not in available]
    if missing:
        raise InputError(f"{what} {missing} were not recorded; recorded: {available[0]}-{available[-1]}")
    return sorted(set(chosen))
