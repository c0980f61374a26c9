"""Where the model lives: placement modes, their memory estimates, and the choice for ``auto``.

Modes (``fp8`` storage and dropping the text encoder combine with any of them):

* ``single``: everything on one device.
* ``multi-gpu``: the transformer split at whole blocks over several GPUs, the text encoder on the
  last GPU, the VAE on the first (the reference's layout).
* ``model-offload``: every component lives in host memory and visits the GPU only while it runs.
* ``block-swap``: transformer blocks stream between host and GPU (diffusers group offloading,
  prefetched on a side stream), ``blocks_on_gpu`` of them staying resident; text encoder and VAE
  as in model-offload.

Estimates are computed from the configs (parameter bytes are exact, from meta-device models;
activations are a formula, see :func:`activation_bytes`) and compared with each GPU's free
memory before anything is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .devices import GIB, RESERVE_BYTES, DeviceSpec
from .errors import TagMoEError

MODES = ("auto", "single", "multi-gpu", "model-offload", "block-swap")
FP8 = torch.float8_e4m3fn
# Activation memory of one transformer pass, per token, in units of hidden_size x dtype bytes:
# the attention and MLP intermediates of the widest block (QKV, attention output, the 4x MLP
# hidden and its activation, the MoE's gathered copies) with headroom. Not calibrated on a GPU yet.
ACTIVATION_FACTOR = 24
TEXT_TOKENS = 256  # a long prompt with the template
VAE_BYTES_PER_PIXEL = 640  # decoder working set at full resolution (bf16), conservative


class PlacementError(TagMoEError):
    """A placement that cannot work on the devices at hand; the message names one that would."""


@dataclass
class ComponentSizes:
    """Bytes of each component's weights in the run dtype (fp8 storage applied when asked)."""

    transformer_blocks: list[int]
    transformer_rest: int
    text_encoder: int
    vae: int
    hidden_size: int
    dtype_bytes: int

    @property
    def transformer(self) -> int:
        return sum(self.transformer_blocks) + self.transformer_rest

    @property
    def total(self) -> int:
        return self.transformer + self.text_encoder + self.vae


def _param_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in module.parameters()) * dtype.itemsize


def component_sizes(transformer_meta: torch.nn.Module, base: str | os.PathLike, dtype: torch.dtype,
                    fp8: bool = False) -> ComponentSizes:
    """Sizes from a meta-device transformer and the base model's text-encoder and VAE configs."""
    storage = FP8 if fp8 else dtype
    blocks = [_param_bytes(b, storage) for b in transformer_meta.transformer_blocks]
    rest = _param_bytes(transformer_meta, dtype) - sum(_param_bytes(b, dtype) for b in transformer_meta.transformer_blocks)
    return ComponentSizes(blocks, rest, _config_model_bytes(base, "text_encoder", dtype),
                          _config_model_bytes(base, "vae", dtype), transformer_meta.inner_dim, dtype.itemsize)


def _config_model_bytes(base, component: str, dtype: torch.dtype) -> int:
    """Parameter bytes of a component, from its config alone (a meta-device model)."""
    config_path = Path(os.path.expanduser(str(base))) / component / "config.json"
    if not config_path.is_file():
        return 0  # a hub id not downloaded yet: the estimate then covers the transformer only
    from accelerate import init_empty_weights

    config = json.loads(config_path.read_text())
    with init_empty_weights():
        if component == "vae":
            from diffusers import AutoencoderKLQwenImage

            model = AutoencoderKLQwenImage.from_config(config)
        else:
            from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

            model = Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(config_path.parent))
    return _param_bytes(model, dtype)


def activation_bytes(sizes: ComponentSizes, width: int, height: int, edit: bool = True) -> int:
    """One transformer pass at ``width`` x ``height`` (target + condition tokens when editing)."""
    tokens = (width // 16) * (height // 16) * (2 if edit else 1) + TEXT_TOKENS
    return tokens * sizes.hidden_size * sizes.dtype_bytes * ACTIVATION_FACTOR


def vae_work_bytes(width: int, height: int) -> int:
    return width * height * VAE_BYTES_PER_PIXEL


@dataclass
class Placement:
    """A chosen placement: the mode, its options, and what it needs on each GPU."""

    mode: str
    devices: DeviceSpec
    fp8: bool = False
    drop_text_encoder: bool = False
    blocks_on_gpu: int | None = None
    need: dict[int, int] = field(default_factory=dict)  # GPU id -> bytes
    reason: str = ""
    text_encoder_on_cpu: bool = False

    def describe(self) -> str:
        parts = [self.mode]
        if self.mode == "block-swap":
            parts.append(f"{self.blocks_on_gpu} blocks on GPU")
        if self.fp8:
            parts.append("fp8 weights")
        if self.text_encoder_on_cpu:
            parts.append("text encoder on the CPU")
        elif self.drop_text_encoder:
            parts.append("text encoder off the GPU between prompts")
        need = ", ".join(f"cuda:{i} ~{b / GIB:.1f} GiB" for i, b in self.need.items())
        return "; ".join(parts) + (f" (needs {need})" if need else "")


def need_for(mode: str, sizes: ComponentSizes, devices: DeviceSpec, *, width: int = 1024, height: int = 1024,
             edit: bool = True, drop_text_encoder: bool = False, blocks_on_gpu: int | None = None,
             budgets: dict[int, int] | None = None, text_encoder_on_cpu: bool = False) -> dict[int, int] | None:
    """Bytes each GPU needs in ``mode`` (None: the mode does not apply, e.g. one GPU for multi-gpu)."""
    act = activation_bytes(sizes, width, height, edit)
    vae = sizes.vae + vae_work_bytes(width, height)
    text = sizes.text_encoder + activation_bytes(replace(sizes, hidden_size=3584), 0, 0, False)
    if text_encoder_on_cpu:
        sizes, text, drop_text_encoder = replace(sizes, text_encoder=0), 0, True
    first, last = devices.ids[0], devices.ids[-1]
    if mode == "single":
        if drop_text_encoder:
            return {first: max(text, sizes.transformer + sizes.vae + max(act, vae_work_bytes(width, height)))}
        return {first: sizes.total + max(act, vae_work_bytes(width, height))}
    # In the offload modes the VAE (small) stays on the GPU; the rest visits it in turn.
    if mode == "model-offload":
        return {first: sizes.vae + max(text, sizes.transformer + act, vae_work_bytes(width, height))}
    if mode == "block-swap":
        resident = blocks_on_gpu or 0
        largest = max(sizes.transformer_blocks)
        streaming = sizes.transformer_rest + sum(sizes.transformer_blocks[:resident]) + 2 * largest + act
        return {first: sizes.vae + max(text, streaming, vae_work_bytes(width, height))}
    if mode == "multi-gpu":
        if len(devices.ids) < 2:
            return None
        # Whole blocks in order, moving on to the next GPU when one is full (as accelerate does);
        # without budgets, an even split by count.
        need = {i: act for i in devices.ids}
        need[first] += sizes.transformer_rest + vae
        if not drop_text_encoder:
            need[last] += sizes.text_encoder
        gpu, count = 0, len(sizes.transformer_blocks)
        for index, block in enumerate(sizes.transformer_blocks):
            if budgets is None:
                gpu = index * len(devices.ids) // count
            else:
                while gpu < len(devices.ids) - 1 and need[devices.ids[gpu]] + block > budgets[devices.ids[gpu]]:
                    gpu += 1
            need[devices.ids[gpu]] += block
        return need
    raise PlacementError(f"unknown placement mode {mode!r}; choose from {', '.join(MODES)}")


def _fits(need: dict[int, int] | None, budgets: dict[int, int]) -> bool:
    return need is not None and all(need[i] <= budgets[i] for i in need)


def choose_placement(mode: str, sizes: ComponentSizes, devices: DeviceSpec, free_bytes: dict[int, int] | None = None,
                     *, fp8: bool = False, drop_text_encoder: bool = False, blocks_on_gpu: int | None = None,
                     width: int = 1024, height: int = 1024, edit: bool = True,
                     reserve: int = RESERVE_BYTES, fp8_sizes: ComponentSizes | None = None) -> Placement:
    """Check ``mode`` against each GPU's free memory (minus ``reserve``), or pick one for 'auto'.

    ``sizes`` are in the run dtype (fp8 storage when ``fp8``). ``fp8_sizes``, when given and
    ``fp8`` is off, lets 'auto' fall back to fp8 storage and lets refusals suggest it. Raises
    :class:`PlacementError` naming a placement that would fit when the asked one does not.
    """
    if mode not in MODES:
        raise PlacementError(f"unknown placement mode {mode!r}; choose from {', '.join(MODES)}")
    if devices.kind != "cuda":
        if mode not in ("auto", "single"):
            raise PlacementError(f"'{mode}' moves weights between host and GPU; on '{devices}' everything "
                                 "already lives in one memory: use 'single' (or 'auto')")
        return Placement("single", devices, fp8, drop_text_encoder, reason=f"{devices}: one memory for everything")
    if free_bytes is None:
        free_bytes = {i: torch.cuda.mem_get_info(i)[0] for i in devices.ids}
    budgets = {i: max(0, free_bytes[i] - reserve) for i in devices.ids}
    kw = {"width": width, "height": height, "edit": edit, "drop_text_encoder": drop_text_encoder, "budgets": budgets}

    def need(name: str, s: ComponentSizes, n: int | None, te_cpu: bool = False,
             drop: bool = drop_text_encoder) -> dict[int, int] | None:
        return need_for(name, s, devices, blocks_on_gpu=n or 0, text_encoder_on_cpu=te_cpu,
                        **(kw | {"drop_text_encoder": drop}))

    def most_resident(s: ComponentSizes, te_cpu: bool) -> int | None:
        return next((n for n in range(len(s.transformer_blocks), -1, -1)
                     if _fits(need("block-swap", s, n, te_cpu), budgets)), None)

    def fitting_options():
        """(mode, blocks_on_gpu, fp8, text encoder on CPU, drop text encoder, need) that fit, most
        preferred first: least data movement (the text encoder leaving the GPU between prompts
        before anything else), then fp8 storage, then the text encoder on the CPU."""
        variants = [(sizes, fp8)] + ([(fp8_sizes, True)] if fp8_sizes is not None and not fp8 else [])
        drops = (drop_text_encoder,) if drop_text_encoder else (False, True)
        for te_cpu in (False, True):
            for s, use_fp8 in variants:
                for name, drop in [("single", d) for d in drops] + [("multi-gpu", d) for d in drops] + \
                        [("model-offload", True), ("block-swap", True)]:
                    n = most_resident(s, te_cpu) if name == "block-swap" else None
                    if name == "block-swap" and n is None:
                        continue
                    required = need(name, s, n, te_cpu, drop)
                    if _fits(required, budgets):
                        yield name, n, use_fp8, te_cpu, drop, required

    if mode == "auto":
        for name, n, use_fp8, te_cpu, drop, required in fitting_options():
            return Placement(name, devices, use_fp8, drop or te_cpu, n, required,
                             _why(name, required, budgets, use_fp8 and not fp8, te_cpu, drop), te_cpu)
        raise PlacementError(
            f"TAG-MoE does not fit on {devices}: even streaming every transformer block needs more than the "
            f"{max(budgets.values()) / GIB:.1f} GiB usable ({reserve / GIB:.0f} GiB kept free). Free GPU memory, "
            "use 'cpu', or add GPUs.")
    n = blocks_on_gpu if mode != "block-swap" or blocks_on_gpu is not None else most_resident(sizes, False)
    required = need(mode, sizes, n)
    if required is None:
        raise PlacementError(f"'{mode}' needs at least two GPUs (device '0,1', ...); got {devices}")
    if _fits(required, budgets):
        return Placement(mode, devices, fp8, drop_text_encoder, n, required, reason="as asked")
    short = ", ".join(f"cuda:{i} needs ~{required[i] / GIB:.1f} GiB but {budgets[i] / GIB:.1f} GiB is usable"
                      for i in required if required[i] > budgets[i])
    for name, alt_n, use_fp8, te_cpu, drop, other in fitting_options():
        if (name, use_fp8, te_cpu, drop) == (mode, fp8, False, drop_text_encoder):
            continue
        extra = (f" with blocks_on_gpu={alt_n}" if name == "block-swap" else "") + \
            (" and fp8 weights" if use_fp8 and not fp8 else "") + \
            (" and the text encoder on the CPU" if te_cpu else "") + \
            (" with drop_text_encoder" if drop and not drop_text_encoder and name in ("single", "multi-gpu") else "")
        raise PlacementError(f"'{mode}' does not fit ({short}); '{name}'{extra} would "
                             f"(~{max(other.values()) / GIB:.1f} GiB)")
    raise PlacementError(f"'{mode}' does not fit ({short}), and no other placement would either")


def _why(mode: str, need: dict[int, int], budgets: dict[int, int], fp8_added: bool, te_cpu: bool = False,
         drop: bool = False) -> str:
    used = ", ".join(f"cuda:{i} {need[i] / GIB:.1f} of {budgets[i] / GIB:.1f} GiB" for i in need)
    earlier = {"single": "", "multi-gpu": "one GPU is not enough; ",
               "model-offload": "the whole model does not fit at once; ",
               "block-swap": "no component fits whole beside the others; "}[mode]
    extra = (" with fp8 weights" if fp8_added else "") + (" and the text encoder on the CPU" if te_cpu else "")
    if drop and not te_cpu and mode in ("single", "multi-gpu"):
        extra += " with the text encoder off the GPU between prompts"
    return f"{earlier}{mode}{extra} fits ({used})"


# -- applying a placement to loaded components -------------------------------------------------------------------
def enable_fp8_storage(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Weights stored in float8 (e4m3), each layer cast to ``compute_dtype`` while it runs
    (diffusers' layerwise casting); MoE layers are cast as a whole, experts included."""
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN, apply_layerwise_casting_hook

    from .moe import TagMoEFeedForward, moe_layers

    apply_layerwise_casting(transformer, storage_dtype=FP8, compute_dtype=compute_dtype,
                            skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN + ("tag_embedding", "router_head"),
                            skip_modules_classes=(TagMoEFeedForward,))
    for layer in moe_layers(transformer):
        apply_layerwise_casting_hook(layer, FP8, compute_dtype, non_blocking=False)


def enable_block_swap(transformer: torch.nn.Module, device: torch.device, blocks_on_gpu: int,
                      low_cpu_mem_usage: bool = True) -> None:
    """Stream transformer blocks from host memory (diffusers group offloading, one block per
    group, prefetched on a side stream on CUDA), keeping the first ``blocks_on_gpu`` resident."""
    from diffusers.hooks import HookRegistry, apply_group_offloading
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    stream = device.type == "cuda"
    apply_group_offloading(transformer, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=stream,
                           non_blocking=stream, low_cpu_mem_usage=low_cpu_mem_usage)
    for block in transformer.transformer_blocks[:blocks_on_gpu]:
        HookRegistry.check_if_exists_or_initialize(block).remove_hook(_GROUP_OFFLOADING, recurse=True)
        block.to(device)


def apply_placement(pipe, placement: Placement, device: torch.device) -> None:
    """Put loaded components where ``placement`` says, ``device`` being the execution device
    (modes are plain moves and hooks, so they also run, trivially, with ``device`` = cpu)."""
    mode = placement.mode
    if placement.fp8:
        if mode != "multi-gpu":
            pipe.transformer.to("cpu")  # cast in host memory: the GPU never holds the full-width copy
        enable_fp8_storage(pipe.transformer, pipe.dtype)
    if mode == "single":
        pipe.transformer.to(device)
    elif mode == "model-offload":
        pipe.transformer.to("cpu")
        pipe.offloaded.add("transformer")
    elif mode == "block-swap":
        pipe.transformer.to("cpu")
        enable_block_swap(pipe.transformer, device, placement.blocks_on_gpu or 0)
    if placement.text_encoder_on_cpu:
        pipe.text_encoder.to("cpu")
    elif mode in ("model-offload", "block-swap") or placement.drop_text_encoder:
        pipe.text_encoder.to("cpu")
        pipe.offloaded.add("text_encoder")
    pipe.vae.to(device)
    pipe._execution_device = device
    pipe.placement = placement
