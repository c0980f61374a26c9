"""A TAG-MoE checkpoint seen in the per-expert Linear layout: what the ComfyUI path loads.

Opens any layout the library accepts (a file, a folder, a sharded index, ``.safetensors`` or
``.bin``; the release's MegaBlocks keys or the per-expert keys ComfyUI saves), reads only headers
to tell the transformer's dimensions and MoE layout, checks the keys and shapes against the model
that will receive them, then hands the tensors over in chunks of about 1 GiB (views of the files'
memory maps: split and transposed experts cost no copy), so loading holds one copy of the weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MissingKeysError, ShapeMismatchError, UnexpectedKeysError, UnknownLayoutError
from .checkpoint import DEFAULT_WEIGHT_NAME, CheckpointReader, resolve_weight_files
from .expert_layout import Piece, planned_shape, to_linear_experts
from .layout import (OPTIONAL_PREFIXES, checkpoint_config, infer_moe_layout, strip_wrapper_prefix, transformer_dims,
                     uses_linear_experts)
from .moe import MoESpec

log = logging.getLogger("tagmoe")

CHUNK_BYTES = 1 << 30


@dataclass
class LinearExpertsCheckpoint:
    reader: CheckpointReader
    dims: dict[str, Any]
    spec: MoESpec
    blocks: list[int]
    plan: dict[str, Piece]  # every key of the transformer (per-expert layout) -> where it is read from
    tag_keys: list[str]

    @classmethod
    def open(cls, source: str | os.PathLike, top_k: int = 1) -> "LinearExpertsCheckpoint":
        files = resolve_weight_files(source, DEFAULT_WEIGHT_NAME, "transformer")
        reader = CheckpointReader.open(files)
        strip_wrapper_prefix(reader)
        dims = transformer_dims(reader, checkpoint_config(files))
        spec, blocks = infer_moe_layout(reader, dims["num_layers"], top_k)
        shapes = {k: info.shape for k, info in reader.infos.items()}
        tag_keys = sorted(k for k in shapes if k.startswith(OPTIONAL_PREFIXES))
        body = {k: v for k, v in shapes.items() if not k.startswith(OPTIONAL_PREFIXES)}
        plan = ({k: Piece(k) for k in body} if uses_linear_experts(body)
                else to_linear_experts(body, spec.num_experts))
        return cls(reader, dims, spec, blocks, plan, tag_keys)

    def describe(self) -> str:
        return self.reader.describe()

    @property
    def has_tag_modules(self) -> bool:
        return bool(self.tag_keys)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {k: info.shape for k, info in self.reader.infos.items()}
        return {key: planned_shape(piece, shapes) for key, piece in self.plan.items()}

    def weight_dtype(self) -> torch.dtype:
        """The dtype holding most of the weights (what ComfyUI's loaders call the weight dtype)."""
        sizes: dict[torch.dtype, int] = {}
        for source in {piece.source for piece in self.plan.values()}:  # a split expert tensor counts once
            info = self.reader.infos[source]
            sizes[info.dtype] = sizes.get(info.dtype, 0) + self.reader.nbytes([source])
        return max(sizes, key=sizes.get)

    @property
    def num_parameters(self) -> int:
        return sum(int(torch.Size(shape).numel()) for shape in self.shapes().values())

    def check(self, expected: Mapping[str, tuple[int, ...]], quantized: bool = False) -> None:
        """Every key the model expects is here with its shape, and nothing else is: before any
        weight is read. ``quantized`` (the weights kept quantized, as :meth:`chunks` gives them): no
        quantized tensor needs slicing or transposing (a GGUF keeps one tensor per expert)."""
        if quantized:
            for piece in self.plan.values():
                if piece != Piece(piece.source) and self.reader.infos[piece.source].quantized:
                    raise self._release_layout_error(piece.source)
        shapes = self.shapes()
        missing = [k for k in expected if k not in shapes]
        if missing:
            raise MissingKeysError(missing, self.describe())
        unexpected = [k for k in shapes if k not in expected]
        if unexpected:
            raise UnexpectedKeysError(unexpected, self.describe(),
                                      hint="is it a TAG-MoE checkpoint for this Qwen-Image model? (the core's 'tagmoe "
                                           "convert' writes the keys this loader reads)")
        for key, shape in expected.items():
            if tuple(shape) != tuple(shapes[key]):
                raise ShapeMismatchError(key, tuple(shape), tuple(shapes[key]), self.describe())

    def chunks(self, chunk_bytes: int = CHUNK_BYTES,
               quantized: bool = False) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        """``({key: tensor}, bytes read so far)`` for the transformer, about ``chunk_bytes`` at a time.
        ``quantized``: a GGUF's quantized tensors as their raw bytes (``gguf_reader.as_quantized``)."""
        wanted: dict[str, list[tuple[str, Piece]]] = {}
        for key, piece in self.plan.items():
            wanted.setdefault(piece.source, []).append((key, piece))
        chunk: dict[str, torch.Tensor] = {}
        size = done = 0
        for source, tensor in self.reader.tensors(list(wanted), chunk_bytes, quantized=quantized):
            for key, piece in wanted[source]:
                if quantized and piece != Piece(source) and self.reader.infos[source].quantized:
                    raise self._release_layout_error(source)
                chunk[key] = piece.take(tensor)
            nbytes = self.reader.nbytes([source])
            size += nbytes
            done += nbytes
            if size >= chunk_bytes:
                yield chunk, done
                chunk, size = {}, 0
        if chunk:
            yield chunk, done

    def _release_layout_error(self, source: str) -> UnknownLayoutError:
        return UnknownLayoutError(f"{self.describe()} holds quantized MoE weights in the release layout ('{source}'); "
                                  "a GGUF keeps one tensor per expert: write it with 'tagmoe convert SRC OUT.gguf'")

    @property
    def nbytes(self) -> int:
        return self.reader.nbytes({p.source for p in self.plan.values()})

    def tag_state(self) -> dict[str, torch.Tensor]:
        return dict(self.reader.tensors(self.tag_keys))

    def close(self) -> None:
        self.reader.close()

