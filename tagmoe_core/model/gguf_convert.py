"""``tagmoe convert SRC OUT.gguf --quant TYPE``: any TAG-MoE checkpoint layout -> one GGUF file.

The layout is :mod:`.gguf_format`'s (ComfyUI state-dict keys, experts one Linear each); the type of each
tensor is :func:`tensor_type`'s choice; the values are quantized by gguf-py (``gguf.quants.quantize``,
the llama.cpp project's reference quantizers; Q6_K by :mod:`.gguf_kquants`) and written with its
``GGUFWriter``.

Streamed like the safetensors converter: the source is checked from its headers alone
(:func:`.convert.plan_conversion`: the clear error for a dense, partial or foreign file), every tensor's
name, type and size is known before the first byte is written, so the GGUF header goes first; then each
tensor is read from its source (one at a time), quantized in row blocks and written. Written to
``OUT.part`` and renamed at the end: a failure or Ctrl-C leaves no OUT.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import DEFAULT_WEIGHT_NAME, CheckpointReader
from .convert import (ConvertError, ConvertReport, Progress, _check_destination, open_source, output_path,
                      plan_conversion)
from .expert_layout import Piece, planned_shape, to_linear_experts
from .gguf_dequant import TYPES, GGMLType
from .gguf_kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k
from .gguf_format import (ARCH, FORMAT_VERSION, KEY_CONFIG, KEY_EXPERT_FFN, KEY_EXPERTS, KEY_FORMAT, KEY_MOE_BLOCKS,
                          FLOAT_TYPES, KEY_QUANT, KEY_TOP_K, MAX_NAME, ORIG_SHAPE, QUANT_TYPES, stored_shape)
from .layout import (METADATA_KEY, OPTIONAL_PREFIXES, checkpoint_config, count_layers, infer_moe_layout,
                     strip_wrapper_prefix, uses_linear_experts)
from .moe import MoESpec

CHUNK_BYTES = 64 << 20  # float32 bytes quantized at a time
ALIGNMENT = 32  # GGUF's default
# Kept unquantized, as ComfyUI-GGUF's Qwen-Image files keep them: the input/output projections and embeddings.
KEEP_PREFIXES = ("img_in.", "txt_in.", "time_text_embed.", "proj_out.", "norm_out.")
SMALL = 1024  # tensors of at most this many values stay F32 (ComfyUI-GGUF's QUANTIZATION_THRESHOLD)
_ROUTER = re.compile(r"^transformer_blocks\.\d+\.img_mlp\.router\.weight$")


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> GGMLType:
    """The GGML type of tensor ``name`` in a file converted with ``--quant quant``.

    F32: 1-D and small tensors, the routers (their logits pick the expert) and the tag modules.
    The projections in and out (``KEEP_PREFIXES``) keep ``quant`` if it is a float type, else BF16.
    Everything else is ``quant``; where its rows are not a whole number of ``quant`` blocks, Q8_0 for a
    K-quant (blocks of 256) if they are of Q8_0's 32, else BF16.
    """
    numel = 1
    for d in shape:
        numel *= d
    if len(shape) < 2 or numel <= SMALL or _ROUTER.match(name) or name.startswith(OPTIONAL_PREFIXES):
        return TYPES["F32"]
    if quant in FLOAT_TYPES:
        return TYPES[quant]
    if name.startswith(KEEP_PREFIXES):
        return TYPES["BF16"]
    for kind in (quant, "Q8_0"):
        if shape[-1] % TYPES[kind].block_size == 0:
            return TYPES[kind]
    return TYPES["BF16"]


@dataclass(frozen=True)
class GGUFEntry:
    name: str
    qtype: GGMLType
    shape: tuple[int, ...]  # logical (row-major); written as stored_shape(shape)
    piece: Piece  # where it is read from

    @property
    def nbytes(self) -> int:
        return self.qtype.nbytes(self.shape)


@dataclass
class GGUFPlan:
    entries: list[GGUFEntry]
    metadata: dict[str, Any]  # key -> str | int | list[int]
    quant: str

    @property
    def file_size(self) -> int:
        """The exact size of the file: its header (written to a scratch file and measured) and the data."""
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "header.gguf"
            writer = _header_writer(self)
            try:
                _write_header(writer, path)
            finally:
                writer.close()
            header = path.stat().st_size
        return _pad(header) + sum(_pad(e.nbytes) for e in self.entries)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.entries:
            counts[entry.qtype.name] = counts.get(entry.qtype.name, 0) + 1
        return counts


@dataclass
class GGUFConvertReport(ConvertReport):
    type_counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        types = ", ".join(f"{n} x{c}" for n, c in sorted(self.type_counts.items()))
        return f"{super().summary()}\nGGML types: {types} (experts one Linear each, for ComfyUI's loaders)"


def _pad(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def plan_gguf(shapes: Mapping[str, tuple[int, ...]], quant: str, config: Mapping[str, Any], spec: MoESpec,
              blocks: list[int], order: Mapping[str, int] | None = None) -> GGUFPlan:
    """The GGUF layout of a TAG-MoE transformer whose source tensors have ``shapes`` (either key layout):
    every tensor in the per-expert layout with its type, and the metadata. Needs no data."""
    if quant not in QUANT_TYPES:
        raise ConvertError(f"--quant must be one of {', '.join(QUANT_TYPES)}, got {quant!r}")
    body = {k: v for k, v in shapes.items() if not k.startswith(OPTIONAL_PREFIXES)}
    plan = ({k: Piece(k) for k in body} if uses_linear_experts(body) else to_linear_experts(body, spec.num_experts))
    plan.update({k: Piece(k) for k in shapes if k.startswith(OPTIONAL_PREFIXES)})
    entries = []
    for name, piece in plan.items():
        if len(name) > MAX_NAME:
            raise ConvertError(f"tensor name '{name}' is {len(name)} characters; GGUF holds at most {MAX_NAME}")
        shape = planned_shape(piece, shapes)
        entries.append(GGUFEntry(name, tensor_type(name, shape, quant), shape, piece))
    if order is not None:  # the source's file order, so that it is read front to back
        entries.sort(key=lambda e: (order.get(e.piece.source, 0), e.name))
    stored = {"_class_name": "QwenImageTransformer2DModel", **config}
    stored["axes_dims_rope"] = list(stored["axes_dims_rope"])
    metadata: dict[str, Any] = {
        "general.name": "TAG-MoE",
        "general.description": ("TAG-MoE: Qwen-Image whose image FFNs in the MoE blocks are top-k Mixture-of-Experts "
                                "layers. Load it with TAG-MoE Load Diffusion Model (comfyui-tagmoe) or tagmoe_core; a "
                                "dense Qwen-Image loader would drop the experts."),
        KEY_FORMAT: FORMAT_VERSION,
        KEY_QUANT: quant,
        KEY_CONFIG: json.dumps(stored, sort_keys=True),
        KEY_MOE_BLOCKS: [int(b) for b in blocks],
        KEY_EXPERTS: int(spec.num_experts),
        KEY_TOP_K: int(spec.top_k),
        KEY_EXPERT_FFN: int(spec.ffn_hidden_size or 4 * int(shapes["img_in.weight"][0])),
        f"{ARCH}.block_count": int(stored["num_layers"]),
        f"{ARCH}.embedding_length": int(stored["num_attention_heads"]) * int(stored["attention_head_dim"]),
        f"{ARCH}.attention.head_count": int(stored["num_attention_heads"]),
        f"{ARCH}.attention.key_length": int(stored["attention_head_dim"]),
        f"{ARCH}.joint_attention_dim": int(stored["joint_attention_dim"]),
        f"{ARCH}.in_channels": int(stored["in_channels"]),
        f"{ARCH}.out_channels": int(stored["out_channels"]),
        f"{ARCH}.patch_size": int(stored["patch_size"]),
        f"{ARCH}.rope.axes_dims": [int(a) for a in stored["axes_dims_rope"]],
    }
    for entry in entries:
        if stored_shape(entry.shape) != entry.shape:
            metadata[ORIG_SHAPE + entry.name] = [int(d) for d in entry.shape]
    return GGUFPlan(entries, metadata, quant)


def _header_writer(plan: GGUFPlan):
    import gguf

    writer = gguf.GGUFWriter(None, ARCH)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in plan.metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, int(value))
    for entry in plan.entries:
        writer.add_tensor_info(entry.name, stored_shape(entry.shape), np.dtype(np.float32), entry.nbytes,
                               raw_dtype=gguf.GGMLQuantizationType(entry.qtype.id))
    return writer


def _write_header(writer, path: Path) -> None:
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


K_QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize_rows(data: torch.Tensor, qtype: GGMLType, chunk_bytes: int = CHUNK_BYTES) -> tuple[np.ndarray, int]:
    """``data`` (2-D or more, any float dtype) in GGML type ``qtype`` as the array GGUFWriter writes, quantized
    a row block at a time; and how many values were clamped to float16's range (F16 only)."""
    import gguf

    rows = data.reshape(-1, data.shape[-1]) if data.ndim else data.reshape(1, 1)
    kind = gguf.GGMLQuantizationType(qtype.id)
    if qtype.name == "F32":
        out = np.empty(rows.shape, np.float32)
    elif qtype.name == "F16":
        out = np.empty(rows.shape, np.float16)
    else:
        out = np.empty((rows.shape[0], qtype.row_bytes(rows.shape[1])), np.uint8)
    step = max(1, chunk_bytes // max(4 * rows.shape[1], 1))
    clamped = 0
    for begin in range(0, rows.shape[0], step):
        block = rows[begin:begin + step].to(torch.float32).contiguous()
        if qtype.name == "F16":
            limit = torch.finfo(torch.float16).max
            over = int(torch.count_nonzero(block.abs() > limit))
            if over:
                clamped += over
                block = block.clamp(-limit, limit)
        k_quant = K_QUANTIZERS.get(qtype.name)  # gguf-py has no K-quant quantizer
        out[begin:begin + step] = (k_quant(block.numpy()) if k_quant is not None
                                   else gguf.quants.quantize(block.numpy(), kind))
    return out, clamped


def convert_to_gguf(src: str | os.PathLike, out: str | os.PathLike, quant: str = "Q8_0", *, overwrite: bool = False,
                    progress: Progress | None = None, chunk_bytes: int = CHUNK_BYTES,
                    weight_name: str | None = DEFAULT_WEIGHT_NAME, subfolder: str | None = "transformer",
                    revision: str | None = None, local_files_only: bool = False) -> GGUFConvertReport:
    """Write the TAG-MoE checkpoint ``src`` (any layout the library reads) to the GGUF file ``out``."""
    start = time.perf_counter()
    quant = quant.upper()
    if quant not in QUANT_TYPES:
        raise ConvertError(f"--quant must be one of {', '.join(QUANT_TYPES)}, got {quant!r}")
    out = output_path(out, ".gguf", "tagmoe-Q8_0.gguf", overwrite, "a quantized output is a .gguf file")
    files, reader = open_source(src, out, weight_name, subfolder, revision, local_files_only)
    try:
        strip_wrapper_prefix(reader)
        checked = plan_conversion(reader, torch.float32, checkpoint_config(files))  # the source's errors, headers only
        config = json.loads(checked.metadata[METADATA_KEY])
        spec, blocks = infer_moe_layout(reader, count_layers(reader.keys()))
        shapes = {k: info.shape for k, info in reader.infos.items() if not k.endswith(".experts.bias")}
        order = {k: i for i, k in enumerate(reader.infos)}
        plan = plan_gguf(shapes, quant, config, spec, blocks, order)
        total = plan.file_size
        part = out.with_name(out.name + ".part")
        _check_destination(out, part, total)
        clamped = _write(reader, plan, part, total, progress, chunk_bytes)
        try:
            os.replace(part, out)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise ConvertError(f"cannot put the converted file at '{out}': {exc.strerror or exc}") from exc
    finally:
        reader.close()
    return GGUFConvertReport(files.describe(), out, quant, len(plan.entries), out.stat().st_size, reader.nbytes(),
                             time.perf_counter() - start, clamped=clamped, type_counts=plan.type_counts())


def _write(reader: CheckpointReader, plan: GGUFPlan, part: Path, total: int, progress: Progress | None,
           chunk_bytes: int) -> int:
    clamped = done = 0
    writer = _header_writer(plan)
    try:
        _write_header(writer, part)
        for i, entry in enumerate(plan.entries):
            for _, source in reader.tensors([entry.piece.source]):
                data = entry.piece.take(source)
                del source
                array, over = quantize_rows(data, entry.qtype, chunk_bytes)
                del data
                clamped += over
                writer.write_tensor_data(array.reshape(_array_shape(entry)))
                done += _pad(entry.nbytes)
                del array
            if progress is not None:
                progress(i + 1, len(plan.entries), done, total)
        writer.close()
        if part.stat().st_size != total:
            raise ConvertError(f"internal: wrote {part.stat().st_size} bytes to '{part}', planned {total}")
    except OSError as exc:
        writer.close()
        part.unlink(missing_ok=True)
        raise ConvertError(f"converting to '{part}' failed (removed): {exc.strerror or exc}") from exc
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    return clamped


def _array_shape(entry: GGUFEntry) -> tuple[int, ...]:
    shape = stored_shape(entry.shape) or (1,)
    if entry.qtype.quantized or entry.qtype.name == "BF16":
        return (*shape[:-1], entry.qtype.row_bytes(shape[-1]))
    return shape
