"""Open a TAG-MoE ``.gguf`` and hand out its tensors, quantized ones kept quantized.

:meth:`GGUFFile.open` parses the header with gguf-py's ``GGUFReader`` (a read-only memory map: no tensor
data is read) and checks, before anything is loaded, that the file is whole, that it is TAG-MoE (not a
dense Qwen-Image GGUF, not another model) and that every tensor's GGML type is one
:mod:`.gguf_dequant` reads; each problem is one line naming the file. A :class:`GGUFTensor` is the raw
bytes (a ``torch.uint8`` view of the map, copy-on-write), the GGML type and the logical (row-major) shape;
:meth:`GGUFTensor.to_torch` gives the values (float tensors as views, quantized ones dequantized).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpointError, NotATagMoECheckpointError, UnsupportedQuantizationError
from .gguf_dequant import BY_ID, GGMLType, dequantize
from .gguf_format import (ARCH, FORMAT_VERSION, KEY_CONFIG, KEY_FORMAT, ORIG_SHAPE, QWEN_IMAGE_ARCH, READABLE)

log = logging.getLogger("tagmoe")
_CONVERT_HINT = (f"this loader reads {', '.join(READABLE)}: write the file with 'tagmoe convert SRC OUT.gguf --quant "
                 "Q8_0' (or Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, BF16)")

TORCH_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ROUTER_SUFFIXES = (".img_mlp.router.weight", ".img_mlp.router.layer.weight")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: GGMLType
    shape: tuple[int, ...]  # logical, row-major (GGUF's dimensions reversed, or its orig_shape)
    data: torch.Tensor  # the raw bytes, uint8, 1-D (a view of the file's memory map on the CPU)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype :meth:`to_torch` gives: the stored float type, float32 for quantized types."""
        return TORCH_FLOATS.get(self.qtype.name, torch.float32)

    def to_torch(self) -> torch.Tensor:
        if self.qtype.name in TORCH_FLOATS:  # a view of the map: no copy until it is cast or moved
            return self.data.view(TORCH_FLOATS[self.qtype.name]).view(self.shape)
        return dequantize(self.data, self.qtype, self.shape)


def as_quantized(tensor: GGUFTensor) -> torch.Tensor:
    """The raw bytes of ``tensor`` as a uint8 tensor that carries it along (:func:`quantized_of`): what a
    state dict hands to a Linear that keeps GGML weights (nodes/comfy_gguf.py)."""
    raw = tensor.data.view(-1)  # a fresh tensor object: the attribute is this one's alone
    raw.tagmoe_gguf = tensor
    return raw


def quantized_of(value: object) -> GGUFTensor | None:
    """The GGML tensor a raw uint8 tensor from :func:`as_quantized` stands for (None for any other value)."""
    return getattr(value, "tagmoe_gguf", None)


@dataclass
class GGUFFile:
    path: Path
    arch: str
    tensors: dict[str, GGUFTensor]
    metadata: dict[str, Any] = field(default_factory=dict)  # scalar and string fields (not tensor shapes)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GGUFFile":
        import gguf

        path = Path(path)
        try:
            reader = gguf.GGUFReader(path, "c")  # copy-on-write: a weight written in place never reaches the file
        except ValueError as exc:
            if "magic" in str(exc).lower():
                raise CorruptCheckpointError(f"'{path}' is not a GGUF file (its first bytes are not 'GGUF')") from exc
            unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(exc))
            if unknown:  # gguf-py stops at a type id it has no name for, before any tensor is listed
                raise UnsupportedQuantizationError(
                    f"'{path}' holds tensors in GGML type {unknown[1]}, which the installed gguf package does not "
                    f"know; {_CONVERT_HINT}") from exc
            raise CorruptCheckpointError(f"'{path}' is not a readable GGUF file: truncated or damaged ({exc}); the "
                                         "download or conversion may be incomplete - fetch or convert it "
                                         "again") from exc
        except (OSError, IndexError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(f"'{path}' is not a readable GGUF file ({type(exc).__name__}: {exc}); the "
                                         "download or conversion may be incomplete - fetch or convert it "
                                         "again") from exc
        metadata = _scalars(reader)
        arch = metadata.get("general.architecture")
        names = [t.name for t in reader.tensors]
        _check_arch(path, arch, names)
        version = metadata.get(KEY_FORMAT, FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise NotATagMoECheckpointError(f"'{path}' is TAG-MoE GGUF format {version}; this version of the library "
                                            f"reads format {FORMAT_VERSION}: update comfyui-tagmoe")
        size = path.stat().st_size
        unsupported: dict[str, list[str]] = {}
        tensors: dict[str, GGUFTensor] = {}
        for t in reader.tensors:
            kind = BY_ID.get(int(t.tensor_type))
            if kind is None:
                unsupported.setdefault(getattr(t.tensor_type, "name", str(t.tensor_type)), []).append(t.name)
                continue
            if t.data_offset + t.n_bytes > size:
                raise CorruptCheckpointError(f"'{path}' is truncated: '{t.name}' ends at byte "
                                             f"{t.data_offset + t.n_bytes} but the file has {size}; fetch or "
                                             "convert it again")
            data = torch.from_numpy(reader.data[t.data_offset:t.data_offset + t.n_bytes])
            shape = _orig_shape(reader, t.name) or tuple(int(d) for d in reversed(t.shape.tolist()))
            tensors[t.name] = GGUFTensor(t.name, kind, shape, data)
        if unsupported:
            kinds = ", ".join(f"{n} ({len(v)} tensors, e.g. '{v[0]}')" for n, v in sorted(unsupported.items()))
            raise UnsupportedQuantizationError(
                f"'{path}' holds tensors in GGML types this loader does not read: {kinds}; {_CONVERT_HINT}")
        return cls(path, str(arch), tensors, metadata)

    def config(self) -> dict[str, Any] | None:
        """The transformer config the converter recorded (diffusers names), if any."""
        text = self.metadata.get(KEY_CONFIG)
        if not isinstance(text, str):
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise CorruptCheckpointError(f"'{self.path}': its {KEY_CONFIG} metadata is not valid JSON ({exc})") from exc

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        return counts


def tagmoe_architecture(path: str | os.PathLike) -> str | None:
    """The ``general.architecture`` of a GGUF file that holds TAG-MoE: ``tagmoe_qwen_image``, or
    ``qwen_image`` with MoE routers (what a converter that labels files by their keys, such as
    ComfyUI-GGUF's, would write), or ``"no general.architecture"`` for an unlabelled file with MoE routers.
    None for any other model and for a file that is not a readable GGUF (left to the caller's own loader
    to report). Reads the header only (the tensor data stays on disk)."""
    try:
        import gguf

        reader = gguf.GGUFReader(path, "r")
        entry = reader.fields.get("general.architecture")
        arch = None if entry is None else str(entry.contents())
        names = [t.name for t in reader.tensors]
    except Exception:  # noqa: BLE001 - an unreadable file (or an old gguf-py) is not this function's to report
        return None
    if not _holds_tagmoe(arch, names):
        return None
    return arch if arch is not None else "no general.architecture"


def _holds_tagmoe(arch: object, names: list[str]) -> bool:
    """TAG-MoE's label, or dense Qwen-Image's (or none) over MoE routers."""
    return arch == ARCH or (arch in (QWEN_IMAGE_ARCH, None) and any(n.endswith(_ROUTER_SUFFIXES) for n in names))


def _check_arch(path: Path, arch: object, names: list[str]) -> None:
    if arch == ARCH:
        return
    if _holds_tagmoe(arch, names):
        said = "has no general.architecture" if arch is None else f"says general.architecture '{arch}'"
        log.warning("'%s' %s but holds MoE routers: reading it as TAG-MoE", path, said)
        return
    if arch == QWEN_IMAGE_ARCH:
        raise NotATagMoECheckpointError(
            f"'{path}' is a dense Qwen-Image GGUF (general.architecture '{arch}', no MoE experts), not TAG-MoE: give "
            "the TAG-MoE weights (the release folder, or a .gguf written by 'tagmoe convert SRC OUT.gguf --quant "
            "Q8_0')")
    what = f"general.architecture '{arch}'" if isinstance(arch, str) else "no general.architecture"
    raise NotATagMoECheckpointError(f"'{path}' is a GGUF with {what}, not TAG-MoE ('{ARCH}'): it holds another "
                                    "model; give TAG-MoE weights (a .gguf written by 'tagmoe convert')")


def _scalars(reader) -> dict[str, Any]:
    """String and number fields of the header (arrays left out, apart from orig_shape, read on demand)."""
    import gguf

    out: dict[str, Any] = {}
    for name, f in reader.fields.items():
        if f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
            try:
                out[name] = f.contents()
            except (ValueError, UnicodeDecodeError, IndexError):
                continue
    return out


def _orig_shape(reader, name: str) -> tuple[int, ...] | None:
    f = reader.get_field(ORIG_SHAPE + name)
    if f is None:
        return None
    return tuple(int(v) for v in f.contents())
