"""A checkpoint in the per-expert Linear layout (what ComfyUI saves, what a TAG-MoE ``.gguf`` holds), seen
in the release layout that the core's transformer loads.

Keys, shapes and sizes come from the plan of :func:`.expert_layout.to_release` (no data read); a merged
``experts.mlp.w1/w2`` is read expert by expert and concatenated when asked for, one MoE tensor at a time;
``experts.bias``, which the per-expert layout does not keep (the reference never adds it), is zeros.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from .checkpoint import CheckpointReader, TensorInfo
from .expert_layout import Piece, planned_shape, to_release

_BIAS = ".experts.bias"


@dataclass
class ReleaseView(CheckpointReader):
    inner: CheckpointReader | None = None
    pieces: dict[str, list[Piece]] = field(default_factory=dict)

    @classmethod
    def of(cls, inner: CheckpointReader) -> "ReleaseView":
        shapes = {k: info.shape for k, info in inner.infos.items()}
        pieces = to_release(shapes)
        infos: dict[str, TensorInfo] = {}
        for key, parts in pieces.items():
            first = inner.infos[parts[0].source]
            infos[key] = TensorInfo(first.file, planned_shape(parts, shapes), first.dtype,
                                    inner.nbytes([p.source for p in parts]), first.ggml_type)
            if key.endswith(".experts.mlp.w1"):
                bias = key.removesuffix(".experts.mlp.w1") + _BIAS
                infos[bias] = TensorInfo(first.file, (shapes[parts[0].source][1],), torch.float32, 0)
        return cls(inner.weights, infos, inner=inner, pieces=pieces, floats_only=inner.floats_only)

    def tensors(self, keys: Iterable[str], chunk_bytes: int = 1 << 30) -> Iterator[tuple[str, torch.Tensor]]:
        assert self.inner is not None
        for key in keys:
            if key not in self.pieces:  # a zero experts.bias
                yield key, torch.zeros(self.infos[key].shape, dtype=self.infos[key].dtype)
                continue
            parts = self.pieces[key]
            taken = [piece.take(tensor) for piece in parts for _, tensor in self.inner.tensors([piece.source])]
            yield key, taken[0] if len(taken) == 1 else torch.cat(taken)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
