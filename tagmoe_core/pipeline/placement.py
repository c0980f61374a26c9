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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import InputError, TagMoEError
from ..runtime.devices import GIB, RESERVE_BYTES, DeviceSpec

MODES = ("auto", "single", "multi-gpu", "model-offload", "block-swap")
FP8 = torch.float8_e4m3fn
# Activation memory of one transformer pass, per token, in units of inner dim x dtype bytes.
# Measured with bench/bench_memory.py (every tensor the operators allocate, release block shapes):
# 15.1 with the CPU's expert loop and 16.0 with the CUDA path's grouped GEMMs in fp32, and 6% more
# in bf16 (the RoPE and RMSNorm steps compute in fp32), so ~17 on a GPU. 24 leaves ~40% for the
# CUDA caching allocator's rounding and fragmentation and for kernel workspaces, which a tensor
# count does not see; a GPU measurement (bench/bench_gpu.py) is still to confirm it.
ACTIVATION_FACTOR = 24
TEXT_TOKENS = 256  # a long prompt with the template
# The VAE decoder's working set, in elements per output pixel. Measured: 1731 (Qwen-Image's VAE,
# 128x128 to 512x512, linear in pixels: the causal 3D convolutions pad and cache whole feature
# maps). 2304 adds a third for convolution workspaces; ComfyUI budgets 7000 for this VAE.
VAE_ELEMENTS_PER_PIXEL = 2304
QWEN_VAE_BASE_DIM = 96  # the channel width those were measured at (Qwen-Image's VAE)
DECODED_BYTES_PER_PIXEL = 4 * 3 * 4  # the decoded picture's float32 copies (cast, scale, clamp, to the host)


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


    def fp8(self) -> "ComponentSizes":
        """The same with the transformer blocks stored in float8 (one byte per weight)."""
        return replace(self, transformer_blocks=[b // self.dtype_bytes for b in self.transformer_blocks])


def _param_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in module.parameters()) * dtype.itemsize


def component_sizes(transformer_meta: torch.nn.Module, base: str | os.PathLike, dtype: torch.dtype) -> ComponentSizes:
    """Sizes from a meta-device transformer and the base model's text-encoder and VAE configs."""
    root = Path(os.path.expanduser(str(base)))

    def config(component: str) -> dict | None:  # None: a hub id not downloaded yet (the estimate then
        path = root / component / "config.json"  # covers the transformer only)
        return json.loads(path.read_text()) if path.is_file() else None

    return _sizes(transformer_meta, config("text_encoder"), config("vae"), dtype)


def _sizes(transformer_meta, text_encoder_config: dict | None, vae_config: dict | None,
           dtype: torch.dtype) -> ComponentSizes:
    from accelerate import init_empty_weights

    blocks = [_param_bytes(b, dtype) for b in transformer_meta.transformer_blocks]
    text_encoder = vae = 0
    with init_empty_weights():
        if text_encoder_config is not None:
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            config = Qwen2_5_VLConfig(**{k: v for k, v in text_encoder_config.items() if not k.startswith("_")})
            text_encoder = _param_bytes(Qwen2_5_VLForConditionalGeneration._from_config(config), dtype)
        if vae_config is not None:
            from diffusers import AutoencoderKLQwenImage

            vae = _param_bytes(AutoencoderKLQwenImage.from_config(vae_config), dtype)
    return ComponentSizes(blocks, _param_bytes(transformer_meta, dtype) - sum(blocks), text_encoder, vae,
                          transformer_meta.inner_dim, dtype.itemsize)


# The release's shapes: Qwen-Image's transformer (+ TAG-MoE), Qwen2.5-VL-7B-Instruct, Qwen-Image's VAE.
RELEASE_TRANSFORMER = {"attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "in_channels": 64,
                       "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60, "out_channels": 16,
                       "patch_size": 2}
RELEASE_TEXT_ENCODER = {
    "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                    "num_key_value_heads": 4, "vocab_size": 152064},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584},
}


def release_sizes(dtype: torch.dtype = torch.bfloat16) -> ComponentSizes:
    """Component sizes of the TAG-MoE release (for estimates without the files at hand)."""
    from ..model.moe import MoESpec
    from ..model.transformer import build_tagmoe_transformer

    meta = build_tagmoe_transformer(RELEASE_TRANSFORMER, MoESpec(), device="meta", dtype=dtype)
    return _sizes(meta, RELEASE_TEXT_ENCODER, {}, dtype)


def pass_activation_bytes(tokens: int, hidden_size: int, dtype_bytes: int) -> int:
    """One transformer pass over ``tokens`` tokens (image and text, all samples of the batch)."""
    return tokens * hidden_size * dtype_bytes * ACTIVATION_FACTOR


def activation_bytes(sizes: ComponentSizes, width: int, height: int, edit: bool = True) -> int:
    """One transformer pass at ``width`` x ``height`` (target + condition tokens when editing)."""
    tokens = (width // 16) * (height // 16) * (2 if edit else 1) + TEXT_TOKENS
    return pass_activation_bytes(tokens, sizes.hidden_size, sizes.dtype_bytes)


def vae_work_bytes(width: int, height: int, dtype_bytes: int = 2, base_dim: int = QWEN_VAE_BASE_DIM) -> int:
    """One VAE decode at ``width`` x ``height`` in a dtype of ``dtype_bytes``. The working set
    scales with the VAE's channel width (``base_dim``; measured at Qwen-Image's 96; on the tiny
    VAE's 8: 108 values per pixel measured, 192 estimated). An encode needs less (62% of a decode
    on the tiny VAE), so this bounds both."""
    return width * height * VAE_ELEMENTS_PER_PIXEL * base_dim // QWEN_VAE_BASE_DIM * dtype_bytes


def vae_tiled_decode_bytes(width: int, height: int, dtype_bytes: int = 2, base_dim: int = QWEN_VAE_BASE_DIM,
                           tile: int = 256, stride: int = 192) -> int:
    """One VAE decode in ``tile`` px tiles every ``stride`` px (diffusers' defaults): one tile's
    working set, plus the decoded tiles held until they are blended and the blended image."""
    held = 3 * width * height * dtype_bytes * ((tile / stride) ** 2 + 1)
    return vae_work_bytes(min(tile, width), min(tile, height), dtype_bytes, base_dim) + int(held)


@dataclass(frozen=True)
class RunEstimate:
    """Memory one run allocates beyond the loaded weights, from the model's shapes.

    Phases, one after the other: encoding the condition image (the VAE, once), denoising (one
    transformer pass over every sample's tokens; true CFG's two passes run one after the other),
    decoding (the whole batch at once, or in tiles where ``tiled_decode``: a GPU decode falls back
    to tiles when whole does not fit). Each covers what the tensor counts of BENCHMARKS.md measured
    with the same headroom as the placement estimates.
    """

    hidden_size: int
    dtype_bytes: int
    vae_base_dim: int = QWEN_VAE_BASE_DIM
    vae_dtype_bytes: int = 2
    tiled_decode: bool = False

    def phases(self, width: int, height: int, num_images: int = 1, condition_share: float = 1.0,
               text_tokens: int = TEXT_TOKENS) -> dict[str, int]:
        """Bytes of each phase; ``condition_share`` = condition tokens / target tokens (0 for
        text-to-image, 1 for an edit, less for a region edit)."""
        target = (width // 16) * (height // 16)
        condition = int(round(target * condition_share))
        state = num_images * (target + condition) * 64 * self.dtype_bytes * 4  # latents, noise, prediction
        decode = (vae_tiled_decode_bytes if self.tiled_decode else vae_work_bytes)(
            width, height, self.vae_dtype_bytes, self.vae_base_dim)
        out = {
            "denoising": state + pass_activation_bytes(num_images * (target + condition + text_tokens),
                                                       self.hidden_size, self.dtype_bytes),
            "decoding": state + num_images * (decode + width * height * DECODED_BYTES_PER_PIXEL),
        }
        if condition:
            out["encoding the image"] = vae_work_bytes(width, height, self.vae_dtype_bytes, self.vae_base_dim)
        return out


def _amount(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.0f} MiB"


ALL_PHASES = {"denoising": 0, "encoding the image": 0, "decoding": 0}


def check_run_fits(estimate: RunEstimate, width: int, height: int, num_images: int, condition_share: float,
                   text_tokens: int, devices: Mapping[str, Mapping[str, int]], available: Mapping[str, int | None],
                   what: str = "run") -> None:
    """Refuse a run that does not fit, naming a size (and a number of images) that would.

    ``devices``: for each device, the phases that allocate there, each with the bytes it needs
    there on top (weights that visit the device for that phase: model-offload's transformer);
    ``available``: what each can still allocate (None: unknown, not checked). Set
    ``TAGMOE_NO_MEMORY_CHECK=1`` to skip the check.
    """
    if os.environ.get("TAGMOE_NO_MEMORY_CHECK", "") not in ("", "0"):
        return

    def shortfall(w: int, h: int, n: int) -> tuple[str, int, int, str] | None:
        phases = estimate.phases(w, h, n, condition_share, text_tokens)
        for device, extras in devices.items():
            free = available.get(device)
            here = {k: v + extras[k] for k, v in phases.items() if k in extras}
            if free is None or not here:
                continue
            phase = max(here, key=here.get)
            if here[phase] > free:
                return device, here[phase], free, phase
        return None

    short = shortfall(width, height, num_images)
    if short is None:
        return
    device, need, free, phase = short
    fits = None
    for cols in range(width // 16 - 1, 0, -1):  # the largest size of the same shape that fits
        w = cols * 16
        h = max(16, int(round(height * w / width / 16)) * 16)
        if shortfall(w, h, num_images) is None:
            fits = f"{w}x{h} would fit"
            break
    fewer, low, high = None, 1, num_images - 1  # the most images at a time that fit: binary search
    while low <= high:
        middle = (low + high) // 2
        if shortfall(width, height, middle) is None:
            fewer, low = middle, middle + 1
        else:
            high = middle - 1
    if fewer is not None:
        alternative = f"{fewer} image{'s' if fewer > 1 else ''} at a time would fit"
        fits = f"{fits}, or {alternative}" if fits else alternative
    images = f"{num_images} images" if num_images > 1 else "one image"
    raise InputError(f"a {width}x{height} {what} of {images} needs ~{_amount(need)} on {device} ({phase}) but "
                     f"~{_amount(free)} is available: {fits or 'free memory first: even 16x16 would not fit'} "
                     "(TAGMOE_NO_MEMORY_CHECK=1 runs it anyway)")


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
    """Peak bytes each GPU needs in ``mode`` (None: the mode does not apply, e.g. one GPU for
    multi-gpu), over the three phases of a run: text encoding, denoising, decoding.

    The VAE (small) always stays on the GPU. A text encoder that visits the GPU (dropped, or in
    the offload modes) pushes the transformer's resident part out while it is there, so its
    phase needs only the encoder and the VAE.
    """
    act = activation_bytes(sizes, width, height, edit)
    decode = vae_work_bytes(width, height, sizes.dtype_bytes)
    visiting_text = 0 if text_encoder_on_cpu else \
        sizes.text_encoder + activation_bytes(replace(sizes, hidden_size=3584), 0, 0, False)
    first, last = devices.ids[0], devices.ids[-1]
    if mode == "single":
        if text_encoder_on_cpu or drop_text_encoder:
            return {first: sizes.vae + max(visiting_text, sizes.transformer + max(act, decode))}
        return {first: sizes.total + max(act, decode)}
    if mode == "model-offload":
        return {first: sizes.vae + max(visiting_text, sizes.transformer + act, decode)}
    if mode == "block-swap":
        resident = sizes.transformer_rest + sum(sizes.transformer_blocks[:blocks_on_gpu or 0])
        streaming = resident + 2 * max(sizes.transformer_blocks) + act
        return {first: sizes.vae + max(visiting_text, streaming, resident + decode)}
    if mode == "multi-gpu":
        if len(devices.ids) < 2:
            return None
        # Whole blocks in order, moving on to the next GPU when one is full (as accelerate does);
        # without budgets, an even split by count. The text encoder stays on the last GPU.
        need = {i: act for i in devices.ids}
        need[first] += sizes.transformer_rest + sizes.vae + decode
        if not text_encoder_on_cpu:
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
                     reserve: int = RESERVE_BYTES) -> Placement:
    """Check ``mode`` against each GPU's free memory (minus ``reserve``), or pick one for 'auto'.

    ``sizes`` are in the run dtype. 'auto' prefers, in order: multi-gpu when several GPUs are
    given; single; single with the text encoder leaving the GPU between prompts; model-offload;
    block-swap with as many resident blocks as fit (or ``blocks_on_gpu``); the same with fp8
    storage; then with the text encoder on the CPU. Raises :class:`PlacementError` naming a
    placement that would fit when the asked one does not.
    """
    if mode not in MODES:
        raise PlacementError(f"unknown placement mode {mode!r}; choose from {', '.join(MODES)}")
    if devices.kind != "cuda":
        if mode not in ("auto", "single"):
            raise PlacementError(f"'{mode}' moves weights between host and GPU; on '{devices}' everything "
                                 "already lives in one memory: use 'single' (or 'auto')")
        return Placement("single", devices, fp8, drop_text_encoder, reason=f"{devices}: one memory for everything")
    if mode == "multi-gpu" and (fp8 or drop_text_encoder):
        raise PlacementError("multi-gpu keeps the text encoder on the last GPU and is not combined with fp8 weights "
                             "or drop_text_encoder; use those with single, model-offload or block-swap")
    if free_bytes is None:
        free_bytes = {i: torch.cuda.mem_get_info(i)[0] for i in devices.ids}
    budgets = {i: max(0, free_bytes[i] - reserve) for i in devices.ids}

    def need(name, s: ComponentSizes, n: int | None, te_cpu: bool, drop: bool) -> dict[int, int] | None:
        return need_for(name, s, devices, width=width, height=height, edit=edit, drop_text_encoder=drop,
                        blocks_on_gpu=n, budgets=budgets, text_encoder_on_cpu=te_cpu)

    def resident(s: ComponentSizes, te_cpu: bool) -> int | None:
        if blocks_on_gpu is not None:
            return blocks_on_gpu if _fits(need("block-swap", s, blocks_on_gpu, te_cpu, True), budgets) else None
        return next((n for n in range(len(s.transformer_blocks), -1, -1)
                     if _fits(need("block-swap", s, n, te_cpu, True), budgets)), None)

    def candidates():
        """(mode, blocks_on_gpu, fp8, text encoder on CPU, drop text encoder), most preferred first."""
        if len(devices.ids) > 1:
            yield "multi-gpu", None, fp8, False, False
        for s_fp8 in ((fp8,) if fp8 else (False, True)):
            s = sizes.fp8() if s_fp8 else sizes
            for te_cpu in (False, True):
                for name, drop in (("single", drop_text_encoder), ("single", True), ("model-offload", True)):
                    yield name, None, s_fp8, te_cpu, drop or te_cpu  # repeats are skipped below
                yield "block-swap", resident(s, te_cpu), s_fp8, te_cpu, True

    def fitting():
        seen = set()
        for name, n, use_fp8, te_cpu, drop in candidates():
            if (name, n, use_fp8, te_cpu, drop) in seen or (name == "block-swap" and n is None):
                continue
            seen.add((name, n, use_fp8, te_cpu, drop))
            if name == "multi-gpu" and use_fp8:
                continue
            required = need(name, sizes.fp8() if use_fp8 else sizes, n, te_cpu, drop)
            if _fits(required, budgets):
                yield Placement(name, devices, use_fp8, drop, n, required,
                                _why(name, required, budgets, use_fp8 and not fp8, te_cpu, drop), te_cpu)

    if mode == "auto":
        for placement in fitting():
            return placement
        raise PlacementError(
            f"TAG-MoE does not fit on {devices}: even streaming every transformer block needs more than the "
            f"{max(budgets.values()) / GIB:.1f} GiB usable ({reserve / GIB:.0f} GiB kept free). Free GPU memory, "
            "use 'cpu', or add GPUs.")
    chosen = sizes.fp8() if fp8 else sizes
    n = (blocks_on_gpu if blocks_on_gpu is not None else resident(chosen, False)) if mode == "block-swap" else None
    required = need(mode, chosen, n, False, drop_text_encoder or mode != "single")
    if required is None:
        raise PlacementError(f"'{mode}' needs at least two GPUs (device '0,1', ...); got {devices}")
    if _fits(required, budgets):
        return Placement(mode, devices, fp8, drop_text_encoder or mode in ("model-offload", "block-swap"), n,
                         required, reason="as asked")
    short = ", ".join(f"cuda:{i} needs ~{required[i] / GIB:.1f} GiB but {budgets[i] / GIB:.1f} GiB is usable"
                      for i in required if required[i] > budgets[i])
    for other in fitting():
        if other.mode == mode and other.fp8 == fp8 and not other.text_encoder_on_cpu and \
                other.drop_text_encoder == drop_text_encoder:
            continue
        extra = (f" with blocks_on_gpu={other.blocks_on_gpu}" if other.mode == "block-swap" else "") + \
            (" and fp8 weights" if other.fp8 and not fp8 else "") + \
            (" and the text encoder on the CPU" if other.text_encoder_on_cpu else "") + \
            (" with drop_text_encoder" if other.drop_text_encoder and other.mode == "single"
             and not other.text_encoder_on_cpu and not drop_text_encoder else "")
        raise PlacementError(f"'{mode}' does not fit ({short}); '{other.mode}'{extra} would "
                             f"(~{max(other.need.values()) / GIB:.1f} GiB)")
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

    from ..model.moe import TagMoEFeedForward, moe_layers

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
    (modes are plain moves and hooks, so they also run, trivially, with ``device`` = cpu).
    Multi-gpu components are placed by the loader (accelerate's dispatch)."""
    mode = placement.mode
    if placement.fp8:
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
    elif mode != "multi-gpu" and (placement.drop_text_encoder or mode != "single"):
        pipe.text_encoder.to("cpu")
        pipe.offloaded.add("text_encoder")
        if mode == "single":
            pipe.evict_for_text_encoder = [pipe.transformer]
        elif mode == "block-swap":
            pipe.evict_for_text_encoder = list(pipe.transformer.transformer_blocks[:placement.blocks_on_gpu or 0])
    pipe.vae.to(device)
    pipe._execution_device = device
    pipe.placement = placement
