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

K-quants (super-blocks of 256 values, read only: gguf-py has no quantizer for them)::

    Q4_K  d, dmin, 12 bytes of 6-bit scales/mins (8 sub-blocks of 32), 128 bytes of nibbles
    Q5_K  as Q4_K, then 32 bytes of 5th bits before the nibbles
    Q6_K  128 bytes low nibbles, 64 bytes 2 high bits, 16 int8 scales (sub-blocks of 16), d
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
    GGMLType("Q4_K", 12, 256, 144), GGMLType("Q5_K", 13, 256, 176), GGMLType("Q6_K", 14, 256, 210),
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


def _shifted(data: torch.Tensor, shape: tuple[int, ...], shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """``(data.reshape(shape) >> shift) & mask`` for each shift, the shifts on a new axis before the last."""
    shift = torch.tensor(shifts, dtype=torch.uint8, device=data.device).reshape(len(shifts), 1)
    return (data.reshape(shape).unsqueeze(-2) >> shift) & mask


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    sc, mn = _k_scales(blocks[:, 4:16])
    d = (_half(blocks, 0) * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (_half(blocks, 2) * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _shifted(blocks[:, 16:], (n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32).to(torch.float32)
    return (d * q - dm).reshape(n, 256)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    sc, mn = _k_scales(blocks[:, 4:16])
    d = (_half(blocks, 0) * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (_half(blocks, 2) * mn.to(torch.float32)).reshape(n, 8, 1)
    ql = _shifted(blocks[:, 48:], (n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    qh = _shifted(blocks[:, 16:48], (n, 1, 32), tuple(range(8)), 0x01).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, 256)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = (_half(blocks, 208) * scales).reshape(n, 16, 1)
    ql = _shifted(blocks[:, :128], (n, 2, 64), (0, 4), 0x0F).reshape(n, 8, 32)
    qh = _shifted(blocks[:, 128:192], (n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return (d * q).reshape(n, 256)


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return (blocks.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).to(torch.float32)


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


_DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _f32, "F16": _f16, "BF16": _bf16, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
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
