"""The streaming safetensors writer against the ``safetensors`` library: same bytes, readable back."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from tagmoe_core.model.safetensors_stream import StreamWriter, TensorEntry, file_size, header_bytes


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(5, 3, generator=g),
        "w.bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(2, 3, 2, generator=g).to(torch.float16),
        "w.fp8": (torch.randn(7, 3, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),
        "v.odd": torch.randn(3, generator=g).to(torch.bfloat16),
        "ids": torch.arange(5, dtype=torch.int64) - 2,
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def stream(tensors: dict[str, torch.Tensor], order: list[str], metadata: dict[str, str] | None,
           rows_per_piece: int = 2) -> bytes:
    entries = [TensorEntry(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in order]
    buffer = io.BytesIO()
    writer = StreamWriter(buffer, entries, metadata)
    for key in order:
        value = tensors[key]
        if value.ndim == 0:
            writer.write(value)
            continue
        for begin in range(0, max(value.shape[0], 1), rows_per_piece):
            writer.write(value[begin:begin + rows_per_piece])
    writer.finish()
    assert writer.bytes_written == len(buffer.getvalue()) == file_size(entries, metadata)
    return buffer.getvalue()


def test_same_bytes_as_the_safetensors_library():
    tensors = sample_tensors()
    # One metadata key: the library keeps metadata in a hash map, so the order of several varies by run.
    metadata = {"tagmoe_config": json.dumps({"num_layers": 4})}
    expected = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", expected[:8])
    header = json.loads(expected[8:8 + n])
    # Laid out in the library's order (its header's offsets say which), the bytes must be the same.
    order = sorted(tensors, key=lambda k: header[k]["data_offsets"])
    assert stream(tensors, order, metadata) == expected


def test_any_order_reads_back_with_safe_open(tmp_path):
    tensors = sample_tensors()
    order = list(reversed(tensors))  # 1-byte tensors before wider ones: still a valid file
    path = tmp_path / "out.safetensors"
    metadata = {"format": "pt", "tagmoe_config": json.dumps({"axes_dims_rope": [4, 6, 6]})}
    path.write_bytes(stream(tensors, order, metadata, rows_per_piece=3))
    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == sorted(tensors) and handle.metadata() == metadata
        for key, value in tensors.items():
            got = handle.get_tensor(key)
            assert got.dtype == value.dtype and got.shape == value.shape, key
            assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                               value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value), key


def test_header_is_padded_to_eight_bytes_and_strided_pieces_are_written_row_major():
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    entries = [TensorEntry("t", torch.float32, (4, 3))]
    buffer = io.BytesIO()
    writer = StreamWriter(buffer, entries, {"a": "b"})
    writer.write(source.T[:1])  # a transposed (non-contiguous) view, one row at a time
    writer.write(source.T[1:])
    writer.finish()
    data = buffer.getvalue()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0 and data[8:8 + n].rstrip(b" ").endswith(b"}")
    assert len(data) == len(header_bytes(entries, {"a": "b"})) + 48
    assert torch.equal(torch.frombuffer(bytearray(data[8 + n:]), dtype=torch.float32).reshape(4, 3), source.T)


def test_wrong_pieces_are_refused():
    entries = [TensorEntry("a", torch.float32, (2, 2)), TensorEntry("b", torch.bfloat16, (2,))]
    writer = StreamWriter(io.BytesIO(), entries)
    with pytest.raises(TypeError, match="a: piece is torch.bfloat16"):
        writer.write(torch.zeros(2, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="32 bytes given, only 16 left"):
        writer.write(torch.zeros(4, 2))
    writer.write(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="'b' and 0 later tensor"):
        writer.finish()
    writer.write(torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="already written"):
        writer.write(torch.zeros(1, dtype=torch.bfloat16))
    writer.finish()


def test_bad_headers_are_refused():
    with pytest.raises(ValueError, match="twice"):
        header_bytes([TensorEntry("a", torch.float32, (1,))] * 2)
    with pytest.raises(TypeError, match="strings to strings"):
        header_bytes([], {"config": {"num_layers": 4}})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="no safetensors name"):
        header_bytes([TensorEntry("c", torch.complex64, (1,))])
