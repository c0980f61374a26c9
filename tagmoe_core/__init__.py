"""TAG-MoE (Task-Aware Gating MoE on Qwen-Image) as a library, independent of ComfyUI.

    from tagmoe_core import load_pipeline
    pipe = load_pipeline("Qwen/Qwen-Image", "YUXU915/TAG-MoE", device="0,1")
    result = pipe.edit(Image.open("in.png"), "Change the cloak to red color", seed=0)

Heavy modules (torch, diffusers, transformers) are imported on first use of a name below.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "TagMoEError": "errors", "InputError": "errors", "CheckpointError": "errors", "DeviceError": "errors",
    "Cancelled": "errors",
    "MoESpec": "moe", "TagMoEFeedForward": "moe",
    "build_tagmoe_transformer": "model", "convert_to_tagmoe": "model",
    "load_tagmoe_transformer": "loading", "load_pipeline": "loading", "LoadReport": "loading",
    "TagMoEPipeline": "pipeline", "Conditioning": "pipeline", "SampleOutput": "pipeline", "EditResult": "pipeline",
    "StepInfo": "sampling",
    "resolve_devices": "devices", "parse_device_spec": "devices", "DeviceSpec": "devices",
    "nearest_bucket": "buckets", "PREFERRED_BUCKETS": "buckets",
    "build_tiny_bundle": "tiny", "ensure_tiny_bundle": "tiny",
    "TAG_NAMES": "taxonomy", "TAG_IDS": "taxonomy",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tagmoe_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
