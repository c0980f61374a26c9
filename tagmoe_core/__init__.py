"""TAG-MoE (Task-Aware Gating MoE on Qwen-Image) as a library, independent of ComfyUI.

    from tagmoe_core import load_pipeline, open_image
    pipe = load_pipeline("Qwen/Qwen-Image", "YUXU915/TAG-MoE", device="0,1")
    result = pipe.edit(open_image("in.png"), "Change the cloak to red color", seed=0)

Heavy modules (torch, diffusers, transformers) are imported on first use of a name below.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "TagMoEError": "errors", "InputError": "errors", "CheckpointError": "errors", "DeviceError": "errors",
    "Cancelled": "errors",
    "MoESpec": "model.moe", "TagMoEFeedForward": "model.moe",
    "build_tagmoe_transformer": "model.transformer", "convert_to_tagmoe": "model.transformer",
    "load_tagmoe_transformer": "model.loading", "load_pipeline": "pipeline.builder", "LoadReport": "model.loading",
    "TagMoEPipeline": "pipeline.pipeline", "Conditioning": "pipeline.pipeline", "SampleOutput": "pipeline.pipeline",
    "EditResult": "pipeline.pipeline",
    "StepInfo": "pipeline.sampling",
    "resolve_devices": "runtime.devices", "parse_device_spec": "runtime.devices", "DeviceSpec": "runtime.devices",
    "nearest_bucket": "pipeline.buckets", "PREFERRED_BUCKETS": "pipeline.buckets",
    "open_image": "images", "to_rgb": "images",
    "build_tiny_bundle": "tiny", "ensure_tiny_bundle": "tiny", "trained_tiny_bundle": "tiny",
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
