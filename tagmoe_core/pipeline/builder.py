"""Build a :class:`~tagmoe_core.pipeline.pipeline.TagMoEPipeline` from a diffusers Qwen-Image folder
and TAG-MoE weights: the transformer (one copy of the weights, see ``model.loading``), the VAE,
the text encoder, tokenizer and scheduler config, placed on the devices that fit."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, UnknownLayoutError
from ..model.checkpoint import DEFAULT_WEIGHT_NAME, CheckpointReader, looks_like_repo_id, resolve_weight_files
from ..model.loading import Progress, execute_load, plan_tagmoe_load
from ..model.moe import Backend
from ..runtime.devices import RESERVE_BYTES, DeviceSpec, gpu_budgets, plan_transformer_split, resolve_devices
from .pipeline import TagMoEPipeline
from .placement import apply_placement, choose_placement, component_sizes


def _component_path(base: str | os.PathLike, name: str) -> str:
    root = Path(os.path.expanduser(str(base)))
    if root.is_dir() and not (root / name).is_dir():
        raise CheckpointNotFoundError(
            f"the base model folder '{root}' has no '{name}/' subfolder: it must be a diffusers Qwen-Image "
            "folder (model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/)")
    return str(base)


BASE_LAYOUT = ("a diffusers Qwen-Image folder (model_index.json, transformer/, text_encoder/, tokenizer/, vae/, "
               "scheduler/)")
# component folder -> (what to call it, its config file, its weight file names in the order they are looked for)
_COMPONENTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "vae": ("VAE", "config.json", (DEFAULT_WEIGHT_NAME, "diffusion_pytorch_model.bin")),
    "text_encoder": ("text encoder", "config.json", ("model.safetensors", "model.safetensors.index.json",
                                                     "pytorch_model.bin", "pytorch_model.bin.index.json")),
    "scheduler": ("scheduler", "scheduler_config.json", ()),
}


def check_base_folder(base: str | os.PathLike) -> Path | None:
    """The local base folder, or None for a hub repo id (diffusers fetches its parts). A path that
    does not exist is an error here, not a download attempt."""
    root = Path(os.path.expanduser(str(base)))
    if root.is_dir():
        return root
    if root.exists():
        raise CheckpointNotFoundError(f"the base model '{root}' is a file: give {BASE_LAYOUT}")
    if looks_like_repo_id(base):
        return None
    raise CheckpointNotFoundError(f"the base model folder '{root}' does not exist: give {BASE_LAYOUT}, or a hub "
                                  "repo id such as Qwen/Qwen-Image")


def check_base_components(base: str | os.PathLike) -> None:
    """The VAE, text encoder, tokenizer and scheduler of a local base folder: their configs parse
    and their weight files' headers read (no weights are read). Raises naming the component."""
    root = check_base_folder(base)
    if root is None:
        return
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        _component_path(root, name)
    for name, (label, config, weight_names) in _COMPONENTS.items():
        _read_json(root / name / config, label, required=True)
        if weight_names:
            _check_weight_headers(root / name, label, weight_names)
    _check_tokenizer(root / "tokenizer")


def _read_json(path: Path, label: str, required: bool) -> None:
    if not path.is_file():
        if required:
            raise CheckpointNotFoundError(f"the base model's {label} has no '{path}': the download is incomplete; "
                                          f"fetch the base model's {path.parent.name}/ folder again")
        return
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"the base model's {label} file '{path}' is not valid JSON ({exc}); the "
                                     "download may be incomplete - fetch it again") from exc
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"the base model's {label} file '{path}' holds a {type(value).__name__}, "
                                     "not a JSON object - fetch it again")


def _check_weight_headers(folder: Path, label: str, weight_names: tuple[str, ...]) -> None:
    name = next((n for n in weight_names if (folder / n).is_file()), weight_names[0])
    try:
        CheckpointReader.open(resolve_weight_files(folder, name, subfolder=None), floats_only=False).close()
    except CheckpointError as exc:
        kind = type(exc) if type(exc) in (CheckpointNotFoundError, CorruptCheckpointError, UnknownLayoutError) \
            else CheckpointError
        raise kind(f"the base model's {label} ({folder}) cannot be loaded: {exc}") from exc


def _check_tokenizer(folder: Path) -> None:
    if not ((folder / "tokenizer.json").is_file() or
            ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        raise CheckpointNotFoundError(f"the base model's tokenizer folder '{folder}' has no tokenizer files "
                                      "(tokenizer.json, or vocab.json and merges.txt): the download is incomplete; "
                                      "fetch the base model's tokenizer/ folder again")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"):
        _read_json(folder / name, "tokenizer", required=False)


def load_vae(base, dtype: torch.dtype, device: torch.device, local_files_only: bool = False):
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_pretrained(_component_path(base, "vae"), subfolder="vae", torch_dtype=dtype,
                                                 local_files_only=local_files_only)
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(base, dtype: torch.dtype, device: torch.device, local_files_only: bool = False):
    from transformers import Qwen2_5_VLForConditionalGeneration

    encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        _component_path(base, "text_encoder"), subfolder="text_encoder", dtype=dtype,
        device_map=str(device) if device.type != "cpu" else None, local_files_only=local_files_only)
    return encoder.to(device).eval().requires_grad_(False)


def load_tokenizer(base, local_files_only: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_component_path(base, "tokenizer"), subfolder="tokenizer",
                                         local_files_only=local_files_only)


def load_scheduler(base, local_files_only: bool = False):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(_component_path(base, "scheduler"), subfolder="scheduler",
                                                           local_files_only=local_files_only)


def load_vlm_image_processor(base, local_files_only: bool = False):
    """The base's ``processor/`` image-processor settings if it has them (Qwen-Image-Edit
    layouts do), else Qwen2.5-VL's defaults. Always the PIL implementation (no torchvision)."""
    root = Path(os.path.expanduser(str(base)))
    config = root / "processor" / "preprocessor_config.json"
    if config.is_file():
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(str(root), subfolder="processor",
                                                        local_files_only=local_files_only)
    return None


def load_pipeline(
    base: str | os.PathLike,
    tagmoe: str | os.PathLike,
    *,
    device: str | int | None = "auto",
    dtype: torch.dtype | None = None,
    backend: Backend = "auto",
    placement: str = "auto",
    fp8: bool = False,
    drop_text_encoder: bool = False,
    blocks_on_gpu: int | None = None,
    gpu_memory_caps: Mapping[int, int] | None = None,
    weight_name: str | None = DEFAULT_WEIGHT_NAME,
    subfolder: str | None = "transformer",
    revision: str | None = None,
    local_files_only: bool = False,
    top_k: int = 1,
    strict: bool = True,
    progress: Progress | None = None,
    before_load: Callable[[], None] | None = None,
    reclaimable_bytes: Mapping[int, int] | None = None,
):
    """A ready :class:`~tagmoe_core.pipeline.TagMoEPipeline` on the given devices.

    ``placement`` is one of :data:`~tagmoe_core.placement.MODES`: 'auto' picks the first that
    fits the GPUs' free memory (minus 2 GiB, capped by ``gpu_memory_caps``) in the order single,
    multi-gpu, model-offload, block-swap, then with fp8 storage, then with the text encoder on
    the CPU; a mode that does not fit is refused with one that would. Several GPUs (``"0,1"``)
    with 'multi-gpu': the transformer split at whole blocks, the text encoder on the last GPU and
    the VAE on the first, like the reference. Every check that needs no weights runs first;
    ``before_load`` is called once they passed, just before the first weight is read;
    ``reclaimable_bytes`` (GPU id -> bytes) is memory it will free, counted as free when choosing.
    """
    devices: DeviceSpec = resolve_devices(device)
    dtype = dtype or devices.default_dtype
    check_base_folder(base)
    plan = plan_tagmoe_load(tagmoe, base, weight_name=weight_name, subfolder=subfolder, revision=revision,
                            local_files_only=local_files_only, top_k=top_k, dtype=dtype, backend=backend,
                            strict=strict)
    check_base_components(base)  # the VAE, text encoder, tokenizer and scheduler, from configs and headers
    free = None
    if devices.kind == "cuda":
        free = {i: torch.cuda.mem_get_info(i)[0] + (reclaimable_bytes or {}).get(i, 0) for i in devices.ids}
        if gpu_memory_caps:
            free = {i: min(free[i], gpu_memory_caps.get(i, free[i]) + RESERVE_BYTES) for i in free}
    chosen = choose_placement(placement, component_sizes(plan.model, base, dtype), devices, free, fp8=fp8,
                              drop_text_encoder=drop_text_encoder, blocks_on_gpu=blocks_on_gpu)
    target: Any = devices.primary
    if chosen.mode == "multi-gpu":
        target = plan_transformer_split(plan.model, gpu_budgets(devices.ids, free, caps=gpu_memory_caps), dtype)
    elif chosen.mode != "single" or chosen.fp8:
        target = torch.device("cpu")  # streamed or cast to fp8 from host memory
    text_device = devices.last if chosen.mode in ("single", "multi-gpu") and not chosen.drop_text_encoder \
        else torch.device("cpu")
    if before_load is not None:
        before_load()
    transformer, report = execute_load(plan, target, progress)
    if chosen.mode == "multi-gpu":
        from accelerate import dispatch_model

        transformer = dispatch_model(transformer, device_map=target)
    pipe = TagMoEPipeline(
        transformer,
        load_vae(base, dtype, devices.primary, local_files_only),
        load_text_encoder(base, dtype, text_device, local_files_only),
        load_tokenizer(base, local_files_only),
        load_scheduler(base, local_files_only),
        vlm_image_processor=load_vlm_image_processor(base, local_files_only),
        execution_device=devices.primary, dtype=dtype,
    )
    apply_placement(pipe, chosen, devices.primary)
    pipe.load_report = report
    return pipe
