"""``tagmoe convert``: any TAG-MoE checkpoint layout -> one ``.safetensors`` file in the release key layout.

The result is what ComfyUI's ``models/diffusion_models`` holds: one file, the release's MegaBlocks
keys (``router.layer.weight``, ``experts.mlp.w1/w2``, ``experts.bias``; the per-expert layout that
ComfyUI saves is merged back with :func:`expert_layout.to_release`), the transformer config as
JSON under ``__metadata__["tagmoe_config"]``, in bf16, fp16, fp32 or float8 (e4m3fn). Both loaders
read it: :func:`loading.load_tagmoe_transformer` and the native ComfyUI one.

Streamed: the plan (every name, dtype, shape and offset) comes from the source headers, the output
header is written first, then each tensor's bytes in order, one source tensor read at a time and
cast in row blocks of ``chunk_bytes``; a merged release tensor is written expert by expert. The
file is written to ``OUT.part`` and renamed at the end, so a failure or Ctrl-C leaves no OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ShapeMismatchError, TagMoEError
from .checkpoint import DEFAULT_WEIGHT_NAME, CheckpointReader, resolve_weight_files
from .layout import METADATA_KEY, checkpoint_config
from .expert_layout import Piece, planned_shape, to_release
from .layout import (OPTIONAL_PREFIXES, ROUTER_KEY, count_layers, infer_moe_layout, strip_wrapper_prefix,
                     transformer_dims, uses_linear_experts)
from .safetensors_stream import StreamWriter, TensorEntry, file_size

OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8_e4m3fn": torch.float8_e4m3fn,
}
FP8 = torch.float8_e4m3fn
# Narrow types: values beyond their largest finite one (448, 65504) are clamped to it, and counted, rather than
# becoming NaN (float8 e4m3fn has no infinity) or inf.
SATURATED = (FP8, torch.float16)
CHUNK_BYTES = 64 << 20
_DIMS_KEYS = ("img_in.weight", "proj_out.weight", "txt_norm.weight", "transformer_blocks.0.attn.norm_q.weight")
_PARTIAL = ("convert writes complete checkpoints only (a file holding only some layers loads as it is, the rest "
            "taken from the base model)")
Progress = Callable[[int, int, int, int], None]  # (tensors done, tensors total, bytes done, bytes total)


class ConvertError(TagMoEError):
    """A conversion that cannot be done as asked (destination, options, incomplete source)."""


@dataclass(frozen=True)
class OutputTensor:
    entry: TensorEntry
    pieces: tuple[Piece, ...]  # concatenated row-wise; none: zeros (an experts.bias the source lacks)


@dataclass
class ConversionPlan:
    """What the output file will hold, in write order, decided from the source headers alone."""

    reader: CheckpointReader
    tensors: list[OutputTensor]
    metadata: dict[str, str]
    merged_experts: bool
    zero_filled: list[str]

    @property
    def file_size(self) -> int:
        return file_size([t.entry for t in self.tensors], self.metadata)


@dataclass
class ConvertReport:
    source: str
    output: Path
    dtype: str
    tensors: int
    nbytes: int  # the output file's size
    source_nbytes: int
    seconds: float
    merged_experts: bool = False
    zero_filled: list[str] = field(default_factory=list)
    fp8_tensors: int = 0
    clamped: int = 0  # values beyond the output dtype's range, saturated to its largest finite value

    def summary(self) -> str:
        lines = [f"converted {self.source} -> '{self.output}'",
                 f"{self.tensors} tensors, {_size(self.nbytes)} {self.dtype} "
                 f"({self.nbytes / max(self.source_nbytes, 1):.0%} of the source's {_size(self.source_nbytes)}) "
                 f"in {self.seconds:.1f}s"]
        if self.merged_experts:
            lines.append("per-expert layout merged back into the release layout")
        if self.zero_filled:
            lines.append(f"{len(self.zero_filled)} experts.bias written as zeros (not in the source; never used)")
        if self.fp8_tensors:
            lines.append(f"{self.fp8_tensors} matrices in float8 e4m3fn, the rest in bf16; "
                         f"{self.clamped} value(s) clamped to +-{torch.finfo(FP8).max:g}")
        elif self.clamped:
            lines.append(f"{self.clamped} value(s) clamped to the {self.dtype} range")
        return "\n".join(lines)


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _listed(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def output_dtype(name: str, source: torch.dtype, ndim: int, dtype: torch.dtype) -> torch.dtype:
    """float8 only for the big matrices; vectors, the routers (their logits pick the expert) and the
    tiny tag modules stay bf16. Non-float tensors keep their type."""
    if not source.is_floating_point:
        return source
    if dtype != FP8:
        return dtype
    keep = ndim < 2 or name.startswith(OPTIONAL_PREFIXES) or ROUTER_KEY.match(name) is not None
    return torch.bfloat16 if keep else FP8


def plan_conversion(reader: CheckpointReader, dtype: torch.dtype, config: dict[str, Any] | None) -> ConversionPlan:
    """Check that ``reader`` holds a complete TAG-MoE transformer and lay out the output file."""
    spec, blocks = infer_moe_layout(reader, count_layers(reader.keys()))  # the clear error for a dense file
    absent = [k for k in _DIMS_KEYS if k not in reader]
    if absent:
        raise ConvertError(f"{reader.describe()} holds MoE layers but not the rest of the transformer (no "
                           f"{', '.join(absent)}): {_PARTIAL}")
    dims = transformer_dims(reader, config)
    shapes = {k: info.shape for k, info in reader.infos.items()}
    merged = uses_linear_experts(shapes)
    plan = to_release(shapes) if merged else {k: [Piece(k)] for k in shapes}
    out_shapes = {key: planned_shape(pieces, shapes) for key, pieces in plan.items()}
    zero_filled = []
    for block in blocks:
        bias = f"transformer_blocks.{block}.img_mlp.experts.bias"
        if bias not in plan:
            hidden = out_shapes[f"transformer_blocks.{block}.img_mlp.router.layer.weight"][1]
            plan[bias], out_shapes[bias] = [], (hidden,)
            zero_filled.append(bias)
    stored = {"_class_name": "QwenImageTransformer2DModel", **(config or {}), **dims}
    stored["axes_dims_rope"] = list(dims["axes_dims_rope"])
    _check_complete(out_shapes, stored, spec, blocks, reader.describe())

    order = {key: i for i, key in enumerate(reader.infos)}

    def position(key: str) -> int:
        pieces = plan[key]
        if pieces:
            return order[pieces[0].source]
        return order[plan[key.replace("experts.bias", "router.layer.weight")][0].source]

    tensors = []
    for key, pieces in plan.items():
        source = reader.infos[pieces[0].source].dtype if pieces else torch.float32
        entry = TensorEntry(key, output_dtype(key, source, len(out_shapes[key]), dtype), out_shapes[key])
        tensors.append(OutputTensor(entry, tuple(pieces)))
    # Widest types first (as safetensors' own serializer does: every tensor starts aligned), then in the
    # source's file order, so that the sources are read front to back.
    tensors.sort(key=lambda t: (-t.entry.dtype.itemsize, position(t.entry.name), t.entry.name))
    metadata = {"format": "pt", METADATA_KEY: json.dumps(stored, sort_keys=True)}
    return ConversionPlan(reader, tensors, metadata, merged, zero_filled)


def _check_complete(shapes: dict[str, tuple[int, ...]], config: dict[str, Any], spec, blocks: list[int],
                    source: str) -> None:
    """Every key the TAG-MoE transformer has, with its shape, and nothing else (the tag modules may be
    absent: both loaders run without them), checked on a meta-device model before a byte is written."""
    from .transformer import build_tagmoe_transformer

    model = build_tagmoe_transformer(config, spec, moe_blocks=blocks, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    missing = [k for k in expected if k not in shapes and not k.startswith(OPTIONAL_PREFIXES)]
    if missing:
        raise ConvertError(f"{source} lacks {len(missing)} weight(s) of the TAG-MoE transformer "
                           f"({_listed(missing)}): {_PARTIAL}")
    unexpected = [k for k in shapes if k not in expected]
    if unexpected:
        raise ConvertError(f"{source} holds {len(unexpected)} weight(s) that are not part of the TAG-MoE transformer "
                           f"({_listed(unexpected)})")
    for key, shape in shapes.items():
        if tuple(expected[key]) != tuple(shape):
            raise ShapeMismatchError(key, expected[key], shape, source)


def output_path(out: str | os.PathLike, suffix: str, example: str, overwrite: bool, wrong_suffix: str) -> Path:
    """The file a conversion writes, refused in one line before any work: wrong kind, a folder, or existing."""
    out = Path(os.path.expanduser(str(out)))
    if out.suffix != suffix:
        raise ConvertError(f"{wrong_suffix}, got '{out}'")
    if out.is_dir():
        raise ConvertError(f"'{out}' is a folder; give the file to write, e.g. '{out / example}'")
    if out.exists() and not overwrite:
        raise ConvertError(f"'{out}' already exists (pass --overwrite to replace it)")
    return out


def open_source(src, out: Path, weight_name, subfolder, revision, local_files_only):
    """``(files, reader)`` of a conversion's source, which must not be ``out`` itself."""
    files = resolve_weight_files(src, weight_name, subfolder, revision, local_files_only)
    if out.resolve() in {f.resolve() for f in files.files}:
        raise ConvertError(f"'{out}' is the source itself; write the converted file elsewhere")
    return files, CheckpointReader.open(files)


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "bf16", *,
                       overwrite: bool = False, progress: Progress | None = None, chunk_bytes: int = CHUNK_BYTES,
                       weight_name: str | None = DEFAULT_WEIGHT_NAME, subfolder: str | None = "transformer",
                       revision: str | None = None, local_files_only: bool = False) -> ConvertReport:
    """Write the TAG-MoE checkpoint ``src`` (any layout the library reads) to the single file ``out``."""
    start = time.perf_counter()
    if dtype not in OUTPUT_DTYPES:
        raise ConvertError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    out = output_path(out, ".safetensors", "tagmoe.safetensors", overwrite,
                      "the output must be a .safetensors file (or a .gguf, written by gguf_convert)")
    files, reader = open_source(src, out, weight_name, subfolder, revision, local_files_only)
    try:
        strip_wrapper_prefix(reader)
        plan = plan_conversion(reader, OUTPUT_DTYPES[dtype], checkpoint_config(files))
        total = plan.file_size
        part = out.with_name(out.name + ".part")
        _check_destination(out, part, total)
        clamped = _write(plan, part, total, progress, chunk_bytes)
        try:
            os.replace(part, out)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise ConvertError(f"cannot put the converted file at '{out}': {exc.strerror or exc}") from exc
    finally:
        reader.close()
    return ConvertReport(files.describe(), out, dtype, len(plan.tensors), total, reader.nbytes(),
                         time.perf_counter() - start, plan.merged_experts, plan.zero_filled,
                         sum(t.entry.dtype == FP8 for t in plan.tensors), clamped)


def _check_destination(out: Path, part: Path, size: int) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free + (part.stat().st_size if part.is_file() else 0)
    except OSError as exc:
        raise ConvertError(f"cannot write to '{out.parent}': {exc.strerror or exc}") from exc
    if free < size:
        raise ConvertError(f"'{out.parent}' has {free / 2**30:.2f} GiB free, the converted file needs "
                           f"{size / 2**30:.2f} GiB")


def _write(plan: ConversionPlan, part: Path, total: int, progress: Progress | None, chunk_bytes: int) -> int:
    """Write the file to ``part``; on any failure (Ctrl-C included) remove it. Returns the clamp count."""
    clamped = done_tensors = 0
    try:
        with open(part, "wb") as handle:
            writer = StreamWriter(handle, [t.entry for t in plan.tensors], plan.metadata)
            for tensor in plan.tensors:
                for block in _blocks(plan.reader, tensor, chunk_bytes):
                    clamped += _write_block(writer, block)
                    if progress is not None:
                        progress(done_tensors, len(plan.tensors), writer.bytes_written, total)
                done_tensors += 1
            writer.finish()
            if progress is not None:
                progress(done_tensors, len(plan.tensors), writer.bytes_written, total)
            os.fsync(handle.fileno())
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise ConvertError(f"converting to '{part}' failed (removed): {exc.strerror or exc}") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return clamped


def _blocks(reader: CheckpointReader, tensor: OutputTensor, chunk_bytes: int) -> Iterator[tuple[torch.Tensor,
                                                                                                torch.dtype]]:
    """``(rows of a source tensor, output dtype)`` for one output tensor, in order; one source at a time."""
    entry = tensor.entry
    if not tensor.pieces:
        yield torch.zeros(entry.shape, dtype=entry.dtype), entry.dtype
        return
    for piece in tensor.pieces:
        for _, source in reader.tensors([piece.source]):
            data = piece.take(source)
            del source
            if data.ndim == 0:
                yield data, entry.dtype
                continue
            row = max(data[0].numel(), 1) * max(data.element_size(), entry.dtype.itemsize)
            step = max(1, chunk_bytes // row)
            for begin in range(0, data.shape[0], step):
                yield data[begin:begin + step], entry.dtype
            del data


def _write_block(writer: StreamWriter, block: tuple[torch.Tensor, torch.dtype]) -> int:
    """Cast one row block to its output dtype (saturating what is out of range) and write it."""
    data, dtype = block
    clamped = 0
    if dtype in SATURATED and data.dtype != dtype and data.is_floating_point():
        limit = torch.finfo(dtype).max
        if torch.finfo(data.dtype).max > limit:
            clamped = int(torch.count_nonzero(data.abs() > limit))
            if clamped:
                data = data.clamp(-limit, limit)
    if data.dtype != dtype:
        data = torch.empty(data.shape, dtype=dtype).copy_(data)  # one copy, contiguous, however data is strided
    writer.write(data)
    return clamped
