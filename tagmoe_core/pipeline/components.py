"""The parts of a diffusers Qwen-Image folder besides the transformer: checked (configs, weight
headers, tokenizer files) before anything heavy is read, then loaded. diffusers and transformers are
imported only by the loaders that need them, so the checks and the text encoder stay usable from the
ComfyUI path without importing diffusers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, UnknownLayoutError
from ..model.checkpoint import DEFAULT_WEIGHT_NAME, CheckpointReader, looks_like_repo_id, resolve_weight_files


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
