"""Seconds per step and peak GPU memory of every placement mode, and the cost of the MoE, on the
release's full-size architecture with random weights (nothing to download).

The components are the real classes at the release's shapes: the 60-block TAG-MoE transformer
(22.7B parameters, the last 10 image FFNs 4-expert top-1 MoE), Qwen2.5-VL-7B as text encoder
and Qwen-Image's VAE. They are built on the meta device and materialised with random weights on
the GPU, so a run needs no files. Each mode runs in a fresh process (hooks and allocator state do
not carry over): a 1024x1024 edit with CFG (two transformer passes a step), timed per step after
a warm-up step, with the peak allocated memory of each phase (encode, denoise, decode) against
the placement estimate for that mode.

    python bench/bench_gpu.py                                 # every mode that fits this machine
    python bench/bench_gpu.py --modes single block-swap-0 --steps 6
    python bench/bench_gpu.py --passes                        # MoE vs dense Qwen-Image; torch vs MegaBlocks
    python bench/bench_gpu.py --tiny --device cpu --in-process --steps 2   # smoke run (the tests do this)

On the CPU the figures mean nothing (the moves are no-ops and there is no allocator to ask);
the smoke run only proves that the script still runs every path.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from tagmoe_core.model.loading import _assign
from tagmoe_core.model.moe import MoESpec, megablocks_available, set_backend
from tagmoe_core.model.transformer import build_tagmoe_transformer
from tagmoe_core.pipeline.placement import (
    RELEASE_TEXT_ENCODER,
    RELEASE_TRANSFORMER,
    ComponentSizes,
    Placement,
    _param_bytes,
    apply_placement,
    need_for,
)
from tagmoe_core.runtime.devices import GIB, DeviceSpec, gpu_budgets, plan_transformer_split
from tagmoe_core.tiny import TRANSFORMER_CONFIG as TINY_TRANSFORMER_CONFIG

MODES: dict[str, dict[str, Any]] = {
    "single": {"mode": "single"},
    "single-drop-te": {"mode": "single", "drop_text_encoder": True},
    "single-fp8": {"mode": "single", "fp8": True},
    "model-offload": {"mode": "model-offload"},
    "block-swap-30": {"mode": "block-swap", "blocks_on_gpu": 30},
    "block-swap-0": {"mode": "block-swap", "blocks_on_gpu": 0},
    "block-swap-0-fp8": {"mode": "block-swap", "blocks_on_gpu": 0, "fp8": True},
    "block-swap-0-te-cpu": {"mode": "block-swap", "blocks_on_gpu": 0, "text_encoder_on_cpu": True},
    "multi-gpu": {"mode": "multi-gpu"},
}
PROMPT = "Change the cloak to red color"
TINY_TEXT_ENCODER = {"text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "num_key_value_heads": 1},
                     "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                       "out_hidden_size": 32}}
TINY_VAE = {"base_dim": 8, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}


# -- random full-size components ------------------------------------------------------------------------------------
def _randomise(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Give every meta parameter a random value on ``device`` (norm scales 1, biases 0, the rest
    N(0, 0.02)), one tensor at a time, so the model is never held twice."""
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in list(model.named_parameters()):
        if param.device.type != "meta":
            continue
        value = torch.empty(param.shape, device=device, dtype=dtype)
        if param.ndim == 1:
            value.fill_(1.0 if "norm" in name else 0.0)
        else:
            value.normal_(0.0, 0.02, generator=generator)
        _assign(model, name, value, device, dtype)
    return model


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, dense: bool = False):
    if dense:  # Qwen-Image itself: every block dense (the same active size as TAG-MoE top-1)
        from accelerate import init_empty_weights
        from diffusers import QwenImageTransformer2DModel

        with init_empty_weights():
            model = QwenImageTransformer2DModel.from_config(dict(config))
        model = torch.nn.Module.to(model, dtype=dtype).eval().requires_grad_(False)
    else:
        spec = MoESpec(num_moe_blocks=min(10, config["num_layers"] // 2))
        model = build_tagmoe_transformer(config, spec, device="meta", dtype=dtype)
    return _randomise(model, device, dtype)


def build_pipeline(tiny: bool, device: torch.device, dtype: torch.dtype, text_device: torch.device | None = None):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tagmoe_core.pipeline.pipeline import TagMoEPipeline
    from tagmoe_core.tiny import SCHEDULER_CONFIG, SPECIAL_TOKENS, train_tokenizer

    tokenizer = train_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    te = TINY_TEXT_ENCODER if tiny else RELEASE_TEXT_ENCODER
    config = Qwen2_5_VLConfig(
        text_config={**te["text_config"], "vocab_size": te["text_config"].get("vocab_size", len(tokenizer)),
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [2, 3, 3] if tiny else [16, 24, 24]},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config=te["vision_config"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])
    with torch.device(text_device or device):  # initialised where it will run (a 7B model in seconds)
        text_encoder = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
        vae = AutoencoderKLQwenImage(**(TINY_VAE if tiny else {})).to(dtype).eval()
    transformer = build_transformer(TINY_TRANSFORMER_CONFIG if tiny else RELEASE_TRANSFORMER, device, dtype)
    return TagMoEPipeline(transformer, vae, text_encoder, tokenizer,
                          FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), execution_device=device, dtype=dtype)


def sizes_of(pipe) -> ComponentSizes:
    def nbytes(module) -> int:
        return _param_bytes(module, pipe.dtype)

    blocks = [nbytes(b) for b in pipe.transformer.transformer_blocks]
    return ComponentSizes(blocks, nbytes(pipe.transformer) - sum(blocks), nbytes(pipe.text_encoder),
                          nbytes(pipe.vae), pipe.transformer.inner_dim, pipe.dtype.itemsize)


# -- one mode -------------------------------------------------------------------------------------------------------
class Phase:
    """Wall time, and peak allocated and reserved memory on each GPU of ``ids``, of a ``with`` block
    (reserved adds the caching allocator's slack and fragmentation: what runs out first)."""

    def __init__(self, ids: tuple[int, ...]) -> None:
        self.ids, self.seconds = ids, 0.0
        self.allocated: dict[int, int] = {}
        self.reserved: dict[int, int] = {}

    def __enter__(self) -> "Phase":
        for i in self.ids:
            torch.cuda.synchronize(i)
            torch.cuda.reset_peak_memory_stats(i)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        for i in self.ids:
            torch.cuda.synchronize(i)
            self.allocated[i] = torch.cuda.max_memory_allocated(i)
            self.reserved[i] = torch.cuda.max_memory_reserved(i)
        self.seconds = time.perf_counter() - self.start


def run_mode(name: str, args) -> dict[str, Any]:
    from tagmoe_core.demo import demo_image

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    options = dict(MODES[name])
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    if options["mode"] == "multi-gpu" and gpus < 2:
        return {"mode": name, "skipped": "needs two GPUs or more"}
    cuda = device.type == "cuda"
    devices = DeviceSpec("cuda", tuple(range(gpus)) if options["mode"] == "multi-gpu" else (device.index or 0,))
    ids = devices.ids if cuda else ()  # measured GPUs (none on the CPU; estimates are still for a GPU)
    text_device = devices.last if options["mode"] == "multi-gpu" else device
    pipe = build_pipeline(args.tiny, device, dtype, text_device)
    if options.get("blocks_on_gpu"):
        options["blocks_on_gpu"] = min(options["blocks_on_gpu"], len(pipe.transformer.transformer_blocks))
    sizes = sizes_of(pipe)
    placement = Placement(devices=devices, **options)
    budgets = None
    if options["mode"] == "multi-gpu":  # as the loader splits: whole blocks, in order, within free memory
        from accelerate import dispatch_model

        free = {i: torch.cuda.mem_get_info(i)[0] for i in devices.ids}  # the text encoder is already in place
        free[devices.ids[0]] += sizes.transformer  # materialised on the first GPU, about to be split
        if args.gpu_cap_gib:
            free = {i: min(f, int(args.gpu_cap_gib * GIB)) for i, f in free.items()}
        budgets = gpu_budgets(devices.ids, free)
        pipe.transformer = dispatch_model(pipe.transformer, plan_transformer_split(pipe.transformer, budgets, dtype))
    with Phase(ids) as place:
        apply_placement(pipe, placement, device)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()  # what moved off the GPU must not count as reserved below
    estimate = need_for(options["mode"], sizes.fp8() if options.get("fp8") else sizes, devices,
                        width=args.size, height=args.size, drop_text_encoder=options.get("drop_text_encoder", False),
                        blocks_on_gpu=options.get("blocks_on_gpu"), budgets=budgets,
                        text_encoder_on_cpu=options.get("text_encoder_on_cpu", False))
    image = demo_image(args.size, args.size)
    with Phase(ids) as encode:
        conditioning = pipe.encode(PROMPT, "")
    step_ends: list[float] = []

    def on_step(info) -> None:
        if cuda:
            torch.cuda.synchronize(device)
        step_ends.append(time.perf_counter())

    with Phase(ids) as sample:
        out = pipe.sample(conditioning, image, width=args.size, height=args.size, steps=args.steps, cfg=4.0,
                          seed=0, callback=on_step)
    with Phase(ids) as decode:
        pipe.decode(out.latents, tiled=False)  # the whole decode the estimate budgets (an OOM shows as a failure)
    steps = [b - a for a, b in zip([sample.start] + step_ends, step_ends)][1:]  # the first one warms up
    phases = {"encode": encode, "denoise": sample, "decode": decode}
    row: dict[str, Any] = {
        "mode": name, "placement": placement.describe(), "size": args.size, "steps": args.steps,
        "device": torch.cuda.get_device_name(device) if cuda else platform.machine(),
        "s_per_step": statistics.median(steps) if steps else sample.seconds,
        "placement_s": place.seconds, "encode_s": encode.seconds, "decode_s": decode.seconds,
        "estimate_gib": {str(i): round(b / GIB, 2) for i, b in estimate.items()},  # str keys: JSON
    }
    for i in ids:
        allocated = {k: p.allocated[i] for k, p in phases.items()}
        reserved = max(p.reserved[i] for p in phases.values())
        row[f"cuda:{i}"] = {"allocated_gib": {k: round(v / GIB, 2) for k, v in allocated.items()},
                            "reserved_gib": round(reserved / GIB, 2),
                            "allocated_over_estimate": round(max(allocated.values()) / estimate[i], 3),
                            "reserved_over_estimate": round(reserved / estimate[i], 3)}
    return row


# -- transformer passes: MoE vs dense, torch vs MegaBlocks ---------------------------------------------------------
def pass_inputs(config: dict, size: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    side = size // 16
    return {"hidden_states": torch.randn(1, 2 * side * side, 64, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(1, 256, config["joint_attention_dim"], device=device, dtype=dtype),
            "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
            "img_shapes": [[(1, side, side), (1, side, side)]], "return_dict": False}


@torch.inference_mode()
def seconds_per_pass(transformer, inputs: dict, repeats: int, device: torch.device) -> float:
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        transformer(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first pass warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_passes(args) -> list[dict[str, Any]]:
    """Per-pass time of TAG-MoE (torch backend, and MegaBlocks where it runs) and of the dense
    Qwen-Image transformer, at the same size; per step with CFG is twice a pass."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = TINY_TRANSFORMER_CONFIG if args.tiny else RELEASE_TRANSFORMER
    inputs = pass_inputs(config, args.size, device, dtype)
    rows = []
    moe = build_transformer(config, device, dtype)
    backends = ["torch"] + (["megablocks"] if device.type == "cuda" and dtype == torch.bfloat16
                            and megablocks_available() else [])
    timings: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(args.rounds):  # interleaved rounds
        for backend in backends:
            set_backend(moe, backend)
            timings[backend].append(seconds_per_pass(moe, inputs, args.repeats, device))
    del moe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dense = build_transformer(config, device, dtype, dense=True)
    timings["dense"] = [seconds_per_pass(dense, inputs, args.repeats, device) for _ in range(args.rounds)]
    base = statistics.median(timings["dense"])
    for name, values in timings.items():
        rows.append({"transformer": "dense Qwen-Image" if name == "dense" else f"TAG-MoE, {name} MoE backend",
                     "s_per_pass": statistics.median(values), "vs_dense": statistics.median(values) / base})
    if "megablocks" not in backends:
        rows.append({"transformer": "TAG-MoE, megablocks MoE backend",
                     "skipped": "needs CUDA, bf16 and an importable megablocks"})
    return rows


# -- driver ---------------------------------------------------------------------------------------------------------
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--size", type=int, help="square side in pixels (default 1024; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per mode (the first warms up)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--passes", action="store_true", help="compare transformers pass by pass instead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per round (median)")
    parser.add_argument("--tiny", action="store_true", help="toy shapes: a smoke run of the script")
    parser.add_argument("--in-process", action="store_true", help="run the modes in this process")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per mode")
    parser.add_argument("--gpu-cap-gib", type=float, help="multi-gpu: cap each GPU's budget to force a split")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.size = args.size or (64 if args.tiny else 1024)
    return args


def mode_rows(args, argv: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in args.modes:
        if args.in_process:
            rows.append(run_mode(name, args))
            gc.collect()
            continue
        child = [a for a in argv if a != "--in-process"]
        try:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), *child, "--one", name],
                                  capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rows.append({"mode": name, "failed": f"no result within {args.timeout} s"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        rows.append(json.loads(lines[-1]) if done.returncode == 0 and lines else
                    {"mode": name, "failed": f"exit status {done.returncode}: {last}"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def print_tables(rows: list[dict[str, Any]]) -> None:
    print("\n| mode | s/step | GPU | peak allocated encode / denoise / decode (GiB) | peak reserved (GiB) | "
          "estimate (GiB) | allocated / estimate | reserved / estimate |"
          "\n| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        if "s_per_step" not in row:
            print(f"| {row['mode']} | {row.get('skipped') or 'failed: ' + row.get('failed', '')} | | | | | | |")
            continue
        gpus = [k for k in row if k.startswith("cuda:")] or [None]
        for gpu in gpus:
            m = row.get(gpu) or {}
            peaks = " / ".join(f"{v:.1f}" for v in m["allocated_gib"].values()) if m else "n/a"
            index = gpu.split(":")[1] if gpu else next(iter(row["estimate_gib"]))
            print(f"| {row['placement']} | {row['s_per_step']:.2f} | {gpu or 'none'} | {peaks} | "
                  f"{m.get('reserved_gib', 'n/a')} | {row['estimate_gib'][index]} | "
                  f"{m.get('allocated_over_estimate', 'n/a')} | {m.get('reserved_over_estimate', 'n/a')} |")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_mode(args.one, args)))
        return []
    # The device's name comes with each row: asking CUDA here would hold a context on the GPU.
    print(f"# torch {torch.__version__}, {args.device}, {args.dtype}, {args.size}x{args.size} edit, CFG 4, "
          f"{'tiny' if args.tiny else 'release'} shapes")
    if args.passes:
        rows = compare_passes(args)
        print("\n| transformer | s/pass | vs dense |\n| --- | ---: | ---: |")
        for row in rows:
            print(f"| {row['transformer']} | " + (f"{row['skipped']} | |" if "skipped" in row else
                                                   f"{row['s_per_pass']:.3f} | {row['vs_dense']:.3f}x |"))
    else:
        rows = mode_rows(args, argv)
        print_tables(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
