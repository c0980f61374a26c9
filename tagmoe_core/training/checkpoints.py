"""Training checkpoints: the release's layout, plus what resuming needs.

``OUTPUT/checkpoint-000100/`` holds

* ``transformer/diffusion_pytorch_model*.safetensors`` (+ ``config.json``): the whole TAG-MoE
  transformer in the release's key layout (MegaBlocks ``dMoE`` keys, ``tag_embedding``,
  ``router_head``; LoRA folded in), sharded as diffusers shards, so that ``load_pipeline(base,
  checkpoint)``, ``tagmoe edit --transformer_model_path``, ``tagmoe convert`` and the loader nodes read it;
* ``lora.safetensors`` (LoRA runs): the adapters, unmerged;
* ``training_state.pt``: step, optimizer state, loss history and the run's settings (with
  ``ema_decay``: the live trained weights and their moving average, ``transformer/`` holding the average);
* ``COMPLETE``: written last (a checkpoint is built in a hidden folder and renamed into place).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpointError

PREFIX = "checkpoint-"
STATE_FILE = "training_state.pt"
LORA_FILE = "lora.safetensors"
COMPLETE = "COMPLETE"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_dir(output: Path, step: int) -> Path:
    return Path(output) / f"{PREFIX}{step:06d}"


def checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output``, by step."""
    found = []
    if Path(output).is_dir():
        for path in Path(output).iterdir():
            match = _NAME.match(path.name)
            if match and (path / COMPLETE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output: Path) -> Path | None:
    found = checkpoints(output)
    return found[-1][1] if found else None


def save_checkpoint(output: Path, step: int, weights: Mapping[str, torch.Tensor], transformer_config: Mapping,
                    state: Mapping[str, Any], lora: Mapping[str, torch.Tensor] | None = None) -> Path:
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    target = checkpoint_dir(output, step)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=output))
    try:
        folder = staging / "transformer"
        folder.mkdir()
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
        save_torch_state_dict(tensors, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
        (folder / "config.json").write_text(json.dumps(dict(transformer_config), indent=2))
        if lora is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(staging / LORA_FILE))
        torch.save(dict(state), staging / STATE_FILE)
        (staging / COMPLETE).write_text(str(step))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise CorruptCheckpointError(f"'{path}' cannot be read as a training state ({' '.join(str(exc).split())[:200]})"
                                     ) from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CorruptCheckpointError(f"'{path}' is not a training state (no step saved in it)")
    return state


def load_lora(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / LORA_FILE
    if not path.is_file():
        raise CorruptCheckpointError(f"'{folder}' is a LoRA run's checkpoint without its {LORA_FILE}")
    return load_file(str(path))
