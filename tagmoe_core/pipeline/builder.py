"""Build a :class:`~tagmoe_core.pipeline.pipeline.TagMoEPipeline` from a diffusers Qwen-Image folder
and TAG-MoE weights: the transformer (one copy of the weights, see ``model.loading``), the VAE,
the text encoder, tokenizer and scheduler config, placed on the devices that fit."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..model.checkpoint import DEFAULT_WEIGHT_NAME
from ..model.loading import Progress, execute_load, plan_tagmoe_load
from ..model.moe import Backend
from ..runtime.devices import RESERVE_BYTES, DeviceSpec, gpu_budgets, plan_transformer_split, resolve_devices
from .components import (check_base_components, check_base_folder, load_scheduler, load_text_encoder,
                         load_tokenizer, load_vae, load_vlm_image_processor)
from .pipeline import TagMoEPipeline
from .placement import apply_placement, choose_placement, component_sizes


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
