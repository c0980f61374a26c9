"""Load a TAG-MoE transformer (and the rest of the pipeline) with one copy of the weights.

The transformer is built on the meta device from the base model's config, shaped after what
the TAG-MoE checkpoint holds (which blocks are MoE, how many experts, their FFN size), then
every tensor is read from its file (safetensors memory map) and assigned in place on its
target device and dtype. Keys the TAG-MoE checkpoint holds come from it; only the keys it
lacks are read from the base Qwen-Image transformer, whose files are not opened at all when
the TAG-MoE checkpoint is complete.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import (
    MissingKeysError,
    ShapeMismatchError,
    TagMoEError,
    UnexpectedKeysError,
)
from ..runtime.devices import device_for_key
from .checkpoint import DEFAULT_WEIGHT_NAME, CheckpointReader, resolve_weight_files
from .layout import (OPTIONAL_PREFIXES, ROUTER_KEY, infer_moe_layout, read_transformer_config, strip_wrapper_prefix,
                     uses_linear_experts)
from .moe import Backend, MoESpec
from .release_view import ReleaseView
from .transformer import build_tagmoe_transformer

log = logging.getLogger("tagmoe")

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass
class LoadReport:
    """What was loaded from where (shown by the CLI and the loader node)."""

    tagmoe_source: str
    base_source: str | None
    spec: MoESpec
    moe_blocks: list[int]
    keys_from_tagmoe: int
    keys_from_base: int
    dtype: torch.dtype
    devices: str
    ignored_keys: list[str] = field(default_factory=list)
    missing_optional: list[str] = field(default_factory=list)

    def summary(self) -> str:
        blocks = self.moe_blocks
        span = f"{blocks[0]}-{blocks[-1]}" if blocks == list(range(blocks[0], blocks[-1] + 1)) else str(blocks)
        lines = [
            f"TAG-MoE weights: {self.tagmoe_source} ({self.keys_from_tagmoe} tensors)",
            f"base transformer: {self.base_source} ({self.keys_from_base} tensors)" if self.keys_from_base
            else "base transformer weights: not needed (the TAG-MoE checkpoint is complete)",
            f"MoE blocks {span}: {self.spec.num_experts} experts, top-{self.spec.top_k}",
            f"dtype {str(self.dtype).removeprefix('torch.')} on {self.devices}",
        ]
        if self.ignored_keys:
            lines.append(f"ignored {len(self.ignored_keys)} unexpected key(s)")
        if self.missing_optional:
            lines.append("no tag_embedding/router_head in the checkpoint: routing analysis is unavailable")
        return "\n".join(lines)


# -- the transformer ----------------------------------------------------------------------------------
@dataclass
class LoadPlan:
    """Everything decided and checked before any tensor data is read (cheap: file headers and
    a meta-device model). ``execute_load`` then reads the weights."""

    model: nn.Module  # on the meta device
    sources: list[tuple[str, CheckpointReader]]  # key -> the reader it comes from
    tag_reader: CheckpointReader
    base_reader: CheckpointReader | None
    spec: MoESpec
    blocks: list[int]
    dtype: torch.dtype
    tagmoe: str
    base: str | None
    unexpected: list[str] = field(default_factory=list)
    missing_optional: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(reader.nbytes([key]) for key, reader in self.sources)


def plan_tagmoe_load(
    tagmoe: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    weight_name: str | None = DEFAULT_WEIGHT_NAME,
    subfolder: str | None = "transformer",
    revision: str | None = None,
    local_files_only: bool = False,
    spec: MoESpec | None = None,
    top_k: int = 1,
    dtype: torch.dtype = torch.float32,
    backend: Backend = "auto",
    strict: bool = True,
) -> LoadPlan:
    """Resolve the files, shape the model after the checkpoint and check every key and shape.

    Raises the checkpoint errors (dense file, shape mismatch, missing/unexpected keys, missing,
    corrupt or unknown files) before a single weight is read.
    """
    tag_files = resolve_weight_files(tagmoe, weight_name, subfolder, revision, local_files_only)
    tag_reader = CheckpointReader.open(tag_files)
    strip_wrapper_prefix(tag_reader)
    if uses_linear_experts(tag_reader.keys()):  # ComfyUI's saves and .gguf files: experts merged as they are read
        tag_reader = ReleaseView.of(tag_reader)
    config = read_transformer_config(base, tag_files, revision, local_files_only)
    num_layers = int(config.get("num_layers", 60))
    if spec is None:
        spec, blocks = infer_moe_layout(tag_reader, num_layers, top_k)
    else:
        blocks = list(spec.block_indices(num_layers))
        if not any(ROUTER_KEY.match(k) for k in tag_reader.keys()):
            infer_moe_layout(tag_reader, num_layers)  # raises the "dense checkpoint" error
    model = build_tagmoe_transformer(config, spec, backend=backend, moe_blocks=blocks, device="meta", dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}

    unexpected = [k for k in tag_reader.keys() if k not in expected]
    if unexpected and strict:
        raise UnexpectedKeysError(unexpected, tag_reader.describe())
    rest = [k for k in expected if k not in tag_reader]
    base_reader: CheckpointReader | None = None
    missing_optional: list[str] = []
    if rest:
        required = [k for k in rest if not k.startswith(OPTIONAL_PREFIXES)]
        if required:
            if base is None:
                raise MissingKeysError(required, f"{tag_reader.describe()} (and no base model was given to "
                                                 "take them from)")
            base_reader = CheckpointReader.open(resolve_weight_files(base, DEFAULT_WEIGHT_NAME, "transformer",
                                                                     revision, local_files_only))
            strip_wrapper_prefix(base_reader)
            missing = [k for k in required if k not in base_reader]
            if missing:
                raise MissingKeysError(missing, f"{tag_reader.describe()} nor the base {base_reader.describe()}")
        missing_optional = [k for k in rest if k.startswith(OPTIONAL_PREFIXES)
                            and (base_reader is None or k not in base_reader)]
    sources = [(k, tag_reader) for k in expected if k in tag_reader]
    sources += [(k, base_reader) for k in rest if base_reader is not None and k in base_reader]
    check_shapes(sources, expected)
    return LoadPlan(model, sources, tag_reader, base_reader, spec, blocks, dtype, str(tagmoe),
                    str(base) if base is not None else None, unexpected, missing_optional)


def check_shapes(sources: Iterable[tuple[str, CheckpointReader]], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ShapeMismatchError for the first key whose shape in its reader (read from the file's table,
    no tensor loaded) is not the model's."""
    for key, reader in sources:
        found = tuple(reader.infos[key].shape)
        if found != tuple(expected[key]):
            raise ShapeMismatchError(key, tuple(expected[key]), found, reader.describe())


def execute_load(plan: LoadPlan, device: str | torch.device | Mapping[str, int | str | torch.device] = "cpu",
                 progress: Progress | None = None) -> tuple[nn.Module, LoadReport]:
    """Read every planned tensor into place on its device (``device`` may be a device map)."""
    model = plan.model

    def target(key: str) -> torch.device:
        return device_for_key(key, device) if isinstance(device, Mapping) else torch.device(device)

    if plan.missing_optional:
        log.warning("the TAG-MoE checkpoint has no %s; routing analysis will be unavailable",
                    ", ".join(sorted({k.split('.')[0] for k in plan.missing_optional})))
    total, done = plan.nbytes, 0
    for reader in (plan.tag_reader, plan.base_reader):
        if reader is None:
            continue
        keys = [k for k, r in plan.sources if r is reader]
        for key, tensor in reader.tensors(keys):
            _assign(model, key, tensor, target(key), plan.dtype)
            done += reader.nbytes([key])
            if progress is not None:
                progress(done, total)
        reader.close()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    for key in plan.missing_optional:  # keep the model complete; these modules are unused at inference
        _assign(model, key, torch.zeros(shapes[key]), target(key), plan.dtype)
    model.tagmoe_has_tag_modules = not plan.missing_optional
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise MissingKeysError(still_meta, plan.tag_reader.describe())

    devices = (", ".join(sorted({str(target(k)) for k in shapes})) if isinstance(device, Mapping)
               else str(torch.device(device)))
    report = LoadReport(plan.tagmoe, plan.base, plan.spec, plan.blocks,
                        sum(1 for _, r in plan.sources if r is plan.tag_reader),
                        sum(1 for _, r in plan.sources if r is plan.base_reader),
                        plan.dtype, devices, ignored_keys=plan.unexpected, missing_optional=plan.missing_optional)
    return model, report


def load_tagmoe_transformer(
    tagmoe: str | os.PathLike,
    base: str | os.PathLike | None = None,
    *,
    device: str | torch.device | Mapping[str, int | str | torch.device] = "cpu",
    progress: Progress | None = None,
    **plan_kwargs,
) -> tuple[nn.Module, LoadReport]:
    """The TAG-MoE transformer with weights from ``tagmoe`` (and ``base`` for what it lacks).

    ``plan_kwargs`` are :func:`plan_tagmoe_load`'s: ``spec`` None infers the MoE layout from the
    checkpoint (``top_k`` is not stored in the weights; the release uses 1), ``dtype``,
    ``backend``, ``strict`` (unexpected keys are an error), and where to find the files.
    ``device`` is one device or an accelerate-style device map (``{"transformer_blocks.0": 0}``).
    """
    return execute_load(plan_tagmoe_load(tagmoe, base, **plan_kwargs), device, progress)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
    if tensor.device != device or tensor.dtype != target_dtype:
        tensor = tensor.to(device=device, dtype=target_dtype)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        raise TagMoEError(f"internal: '{key}' is neither a parameter nor a buffer")
