"""Rotary position ids of the reference's token layout, in plain torch (no diffusers).

Image tokens are 2x2 latent patches on a grid centred on 0 the way diffusers' ``QwenEmbedRope``
centres it (``scale_rope``): rows ``-(h - h//2) .. h//2 - 1``, columns likewise. Each image of a
sample has a frame index: the target 0, condition image i the index i (the reference's edit layout:
one condition, frame 1). A region edit keeps only a box of condition tokens, each at the position it
has in the full condition grid and, as in the reference, frame 0. Text tokens follow the *target*
grid: ids (p, p, p) for p from ``max(h//2, w//2)`` on.

Ids are [N, 3] (frame, row, column): what ComfyUI's ``EmbedND`` turns into rotary embeddings, and
what ``rope.TagMoERope`` looks up in diffusers' tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class RegionShape:
    """Condition tokens cropped to ``box`` = (x1, y1, x2, y2), inclusive, in patch units of a
    ``height`` x ``width`` patch grid (one patch = 2x2 latents = 16x16 pixels)."""

    height: int
    width: int
    box: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        x1, y1, x2, y2 = self.box
        if not (0 <= x1 <= x2 < self.width and 0 <= y1 <= y2 < self.height):
            raise InputError(
                f"region box {self.box} (x1, y1, x2, y2 in 16-pixel patches, inclusive) does not fit "
                f"the {self.width}x{self.height} patch grid of the condition image")

    @property
    def rows(self) -> int:
        return self.box[3] - self.box[1] + 1

    @property
    def cols(self) -> int:
        return self.box[2] - self.box[0] + 1

    @property
    def num_tokens(self) -> int:
        return self.rows * self.cols


Grid = tuple[int, int]  # (rows, cols) of patches


def centred_positions(size: int, first: int, last: int, scale_rope: bool = True) -> list[int]:
    """Positions of grid indices ``first..last`` when a ``size`` grid is centred on 0 (scale_rope)."""
    offset = -(size - size // 2) if scale_rope else 0
    return [i + offset for i in range(first, last + 1)]


def _grid_ids(frame: int, rows: Sequence[int], cols: Sequence[int]) -> torch.Tensor:
    r = torch.tensor(rows, dtype=torch.float32).view(-1, 1).expand(len(rows), len(cols))
    c = torch.tensor(cols, dtype=torch.float32).view(1, -1).expand(len(rows), len(cols))
    return torch.stack([torch.full_like(r, float(frame)), r, c], dim=-1).reshape(-1, 3)


def image_ids(frame: int, grid: Grid) -> torch.Tensor:
    rows, cols = grid
    return _grid_ids(frame, centred_positions(rows, 0, rows - 1), centred_positions(cols, 0, cols - 1))


def region_ids(region: RegionShape) -> torch.Tensor:
    x1, y1, x2, y2 = region.box
    return _grid_ids(0, centred_positions(region.height, y1, y2), centred_positions(region.width, x1, x2))


def text_start(target: Grid) -> int:
    return max(target[0] // 2, target[1] // 2)


def reference_ids(target: Grid, conditions: Sequence[Grid | RegionShape], text_len: int) -> torch.Tensor:
    """Ids [text_len + image tokens, 3]: text first, then the target, then each condition (ComfyUI's
    token order; the diffusers path keeps image and text tables apart)."""
    start = text_start(target)
    text = torch.arange(start, start + text_len, dtype=torch.float32).view(-1, 1).expand(-1, 3)
    parts = [text, image_ids(0, target)]
    for index, condition in enumerate(conditions, start=1):
        parts.append(region_ids(condition) if isinstance(condition, RegionShape) else image_ids(index, condition))
    return torch.cat(parts)
