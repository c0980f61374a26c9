"""Write a ``.safetensors`` file as a stream: the header first, then each tensor's bytes in order.

The format (https://github.com/huggingface/safetensors, "Format"): 8 bytes, the header's length N
as a little-endian u64; N bytes of JSON ``{"__metadata__": {str: str}, name: {"dtype", "shape",
"data_offsets": [begin, end]}, ...}`` padded with spaces (here to a multiple of 8, as the
reference serializer does, so the data starts aligned); then the tensors' bytes, contiguous,
row-major, little-endian, with no holes (offsets are relative to the end of the header).

Every name, dtype and shape is known before any data is read, so the header is written first and
the data follows piece by piece: a tensor may arrive as several row blocks, and nothing is held
beyond the piece being written. The writer checks that each piece has its tensor's dtype and that
the bytes add up exactly.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import torch

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def header_bytes(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length and the padded JSON header for ``entries`` laid out in this order."""
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map strings to strings: {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for entry in entries:
        if entry.name in header:
            raise ValueError(f"tensor name {entry.name!r} appears twice")
        if entry.dtype not in DTYPE_NAMES:
            raise TypeError(f"{entry.name}: dtype {entry.dtype} has no safetensors name")
        header[entry.name] = {"dtype": DTYPE_NAMES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def file_size(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None) -> int:
    return len(header_bytes(entries, metadata)) + sum(e.nbytes for e in entries)


class StreamWriter:
    """Writes ``entries`` to ``file``: :meth:`write` the data of each in order (in one or more row
    pieces), then :meth:`finish`. The header goes out when the writer is made."""

    def __init__(self, file: BinaryIO, entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None = None):
        self.file = file
        self.entries = list(entries)
        self.bytes_written = 0
        self._index = 0
        self._pending = self.entries[0].nbytes if self.entries else 0
        header = header_bytes(self.entries, metadata)
        file.write(header)
        self.bytes_written += len(header)
        self._skip_empty()

    @property
    def current(self) -> TensorEntry | None:
        return self.entries[self._index] if self._index < len(self.entries) else None

    def write(self, piece: torch.Tensor) -> None:
        """Append ``piece`` (rows of the current tensor, in its dtype) to the file."""
        entry = self.current
        if entry is None:
            raise ValueError("all tensors are already written")
        if piece.dtype != entry.dtype:
            raise TypeError(f"{entry.name}: piece is {piece.dtype}, the header says {entry.dtype}")
        nbytes = piece.numel() * piece.element_size()
        if nbytes > self._pending:
            raise ValueError(f"{entry.name}: {nbytes} bytes given, only {self._pending} left in this tensor")
        if nbytes:
            self.file.write(_little_endian_bytes(piece))
        self.bytes_written += nbytes
        self._pending -= nbytes
        if self._pending == 0:
            self._index += 1
            self._pending = self.current.nbytes if self.current is not None else 0
            self._skip_empty()

    def finish(self) -> None:
        if self.current is not None:
            raise ValueError(f"'{self.current.name}' and {len(self.entries) - self._index - 1} later tensor(s) "
                             "were not written")
        self.file.flush()

    def _skip_empty(self) -> None:
        while self.current is not None and self._pending == 0:
            self._index += 1
            self._pending = self.current.nbytes if self.current is not None else 0


def _little_endian_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, row-major little-endian, without a copy when it is already contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    array = flat.view(_SAME_SIZE_INT[flat.element_size()]).numpy()
    if sys.byteorder != "little" and flat.element_size() > 1:
        array = array.byteswap()
    return memoryview(array).cast("B")
