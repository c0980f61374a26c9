"""GGML tensor types in pure torch: their block sizes, and dequantization on any device.

A GGML-quantized row of ``n`` values is ``n / block_size`` blocks of ``type_size`` bytes each; a
tensor's data is its rows one after the other (the last dimension is the row). Every function here
takes the raw bytes as a ``torch.uint8`` tensor (any device) and gives the values in float32,
computed with the same float32 operations in the same order as gguf-py's reference
``gguf.quants.dequantize`` (bit-exact with it; the tests check every type), then cast to the dtype
asked for. No gguf import: the layouts are those of ggml's ``ggml-common.h``.

Block layouts (little-endian; ``d``, ``m`` float16)::

    Q8_0  d, 32 x int8                          x = d * q
    Q4_0  d, 16 bytes of nibbles                x = d * (q - 8)      q = low nibbles then high nibbles
    Q4_1  d, m, 16 bytes of nibbles             x = d * q + m
    Q5_0  d, 4 bytes (5th bits), 16 of nibbles  x = d * (q - 16)
    Q5_1  d, m, 4 bytes (5th bits), 16 nibbles  x = d * q + m
    BF16  the upper half of a float32;  F16, F32 as they are
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GGMLType:
    name: str
    id: int  # ggml's enum ggml_type value, what a GGUF file stores
    block_size: int  # values per block
    type_size: int  # bytes per block

    @property
    def quantized(self) -> bool:
        return self.block_size > 1

    def row_bytes(self, n: int) -> int:
        if n % self.block_size:
            raise ValueError(f"a {self.name} row holds a multiple of {self.block_size} values, not {n}")
        return n // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        rows = 1
        for d in shape[:-1]:
            rows *= d
        return rows * self.row_bytes(shape[-1] if shape else 1)


TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("BF16", 30, 1, 2),
    GGMLType("Q4_0", 2, 32, 18), GGMLType("Q4_1", 3, 32, 20), GGMLType("Q5_0", 6, 32, 22),
    GGMLType("Q5_1", 7, 32, 24), GGMLType("Q8_0", 8, 32, 34),
)}
BY_ID: dict[int, GGMLType] = {t.id: t for t in TYPES.values()}


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of each block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] values 0..15: the low nibbles (values 0-15), then the high ones (16-31)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes (a little-endian uint32 per block) -> [n, 32] bits, bit i for value i."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32) * _half(blocks, 0)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return _half(blocks, 0) * q.to(torch.float32)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 4:]).to(torch.float32)
    return _half(blocks, 0) * q + _half(blocks, 2)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(blocks[:, 6:]) | (_fifth_bits(blocks[:, 2:6]) << 4)).to(torch.int8) - 16
    return _half(blocks, 0) * q.to(torch.float32)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = (_nibbles(blocks[:, 8:]) | (_fifth_bits(blocks[:, 4:8]) << 4)).to(torch.float32)
    return _half(blocks, 0) * q + _half(blocks, 2)


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return (blocks.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).to(torch.float32)


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


_DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _f32, "F16": _f16, "BF16": _bf16, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q8_0": _q8_0,
}


def dequantize(raw: torch.Tensor, qtype: str | GGMLType, shape: tuple[int, ...] | torch.Size,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor of logical ``shape`` whose GGML bytes are ``raw`` (uint8, any shape, on any device)."""
    kind = qtype if isinstance(qtype, GGMLType) else TYPES[qtype]
    shape = tuple(shape)
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw GGML data is uint8, not {raw.dtype}")
    if raw.numel() != kind.nbytes(shape):
        raise ValueError(f"{kind.name} data of shape {list(shape)} is {kind.nbytes(shape)} bytes, not {raw.numel()}")
    blocks = raw.reshape(-1, kind.type_size)
    values = _DEQUANTIZE[kind.name](blocks).reshape(shape)
    return values if values.dtype == dtype else values.to(dtype)
