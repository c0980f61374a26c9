"""Rotary positions of target, condition and region-condition tokens (the reference's layout).

diffusers' ``QwenEmbedRope`` already gives image ``i`` of ``img_shapes`` frame index ``i``, the
reference's convention for the condition image (target frame 0, condition frame 1). Two things
of the reference it cannot express, added here:

* the text positions start after the *target* grid only (diffusers takes the largest image);
* region editing: only a box of condition tokens is kept, each with the position it has in
  the full condition grid and, as in the reference, frame index 0.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

from .positions import RegionShape, centred_positions


ImageShape = tuple[int, int, int] | RegionShape


class TagMoERope(QwenEmbedRope):
    """``QwenEmbedRope`` that also accepts :class:`RegionShape` entries in ``img_shapes``."""

    @classmethod
    def like(cls, other: QwenEmbedRope) -> "TagMoERope":
        return cls(theta=other.theta, axes_dim=list(other.axes_dim), scale_rope=other.scale_rope)

    def forward(self, video_fhw, device: torch.device | None = None, max_txt_seq_len=None):
        if max_txt_seq_len is None:
            raise ValueError("`max_txt_seq_len` must be provided.")
        shapes = video_fhw[0] if isinstance(video_fhw, list) else video_fhw
        shapes = list(shapes) if isinstance(shapes, list) else [shapes]
        freqs = [self._entry_freqs(entry, index, device) for index, entry in enumerate(shapes)]
        _, height, width = shapes[0]  # text positions follow the target grid, as in the reference
        start = max(height // 2, width // 2) if self.scale_rope else max(height, width)
        pos = self._get_device_freqs(device)[0] if device is not None else self.pos_freqs
        txt_freqs = pos[start:start + int(max_txt_seq_len)]
        return torch.cat(freqs, dim=0), txt_freqs

    def _entry_freqs(self, entry: ImageShape, index: int, device) -> torch.Tensor:
        if isinstance(entry, RegionShape):
            return self._region_freqs(entry, device)
        frame, height, width = entry
        return self._compute_video_freqs(frame, height, width, index, device)

    @functools.lru_cache(maxsize=32)  # noqa: B019 - a handful of shapes per model, like diffusers
    def _region_freqs(self, region: RegionShape, device) -> torch.Tensor:
        pos, neg = self._get_device_freqs(device) if device is not None else (self.pos_freqs, self.neg_freqs)
        split = [d // 2 for d in self.axes_dim]
        pos_f, pos_h, pos_w = pos.split(split, dim=1)
        neg_f, neg_h, neg_w = neg.split(split, dim=1)
        x1, y1, x2, y2 = region.box
        rows = centred_positions(region.height, y1, y2, self.scale_rope)
        cols = centred_positions(region.width, x1, x2, self.scale_rope)
        n_rows, n_cols = len(rows), len(cols)
        f = pos_f[:1].view(1, 1, -1).expand(n_rows, n_cols, -1)  # frame index 0, as the reference
        h = _lookup(pos_h, neg_h, rows).view(n_rows, 1, -1).expand(n_rows, n_cols, -1)
        w = _lookup(pos_w, neg_w, cols).view(1, n_cols, -1).expand(n_rows, n_cols, -1)
        return torch.cat([f, h, w], dim=-1).reshape(n_rows * n_cols, -1).contiguous()


def _lookup(pos: torch.Tensor, neg: torch.Tensor, positions: list[int]) -> torch.Tensor:
    # neg[p] for p < 0 is position p (the table ends at -1), pos[p] for p >= 0.
    return torch.cat([neg[[p for p in positions if p < 0]], pos[[p for p in positions if p >= 0]]], dim=0)
