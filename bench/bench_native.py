"""Native (TAG-MoE as a ComfyUI MODEL, sampled by ComfyUI) vs tagmoe_core: seconds per step, side
by side in one run, on a random TAG-MoE (same weights in both).

    COMFYUI_DIR=/path/to/ComfyUI python bench/bench_native.py [--size 512] [--steps 4] [--rounds 5]
    # on a GPU: the release's architecture under a 24 GB budget, ComfyUI's partial loading doing the rest
    COMFYUI_DIR=... python bench/bench_native.py --config release --device cuda --size 1024 --vram-budget-gib 24
    # (the core's counterpart at that budget: python bench/bench_gpu.py --modes block-swap-0)
    # the same in fp8, as GGUF (random weights quantized as 'tagmoe convert --quant' types them, kept
    # quantized, dequantized at each forward) and ComfyUI's own dense Qwen-Image, the baseline:
    COMFYUI_DIR=... python bench/bench_native.py --config release --device cuda --size 1024 --weight-dtype fp8_e4m3fn
    COMFYUI_DIR=... python bench/bench_native.py --config release --device cuda --size 1024 --gguf Q4_0
    COMFYUI_DIR=... python bench/bench_native.py --config release --device cuda --size 1024 --dense

Run it with a Python that has ComfyUI's requirements and this package. Both sides denoise the
same text-to-image run with true CFG (two transformer passes per step): the core with its
diffusers transformer and scheduler, ComfyUI with SamplerCustomAdvanced's euler, TAG-MoE Scheduler,
CFG Guider and Noise. Each round times both once, alternating; the medians are reported, with
the largest difference of their latents. ``--config release`` times the native side only (the
release does not fit a GPU whole; the core's offloading runs are bench_gpu.py's), with its peak
GPU memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
MEDIUM = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 8, "attention_head_dim": 64,
          "num_attention_heads": 8, "joint_attention_dim": 512, "guidance_embeds": False,
          "axes_dims_rope": [8, 28, 28]}


def medium_tagmoe():
    """The benchmarks' random medium TAG-MoE: ``(the core's transformer, its .safetensors in a temporary
    folder beside its config.json)``. Needs the repository on sys.path."""
    import torch
    from safetensors.torch import save_file

    from tagmoe_core.model.moe import MoESpec
    from tagmoe_core.model.transformer import build_tagmoe_transformer

    torch.manual_seed(0)
    spec = MoESpec(num_experts=4, top_k=1, num_moe_blocks=2)
    core_model = build_tagmoe_transformer(MEDIUM, spec, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in core_model.parameters():
            p.normal_(0, 0.02)
    folder = Path(tempfile.mkdtemp(prefix="tagmoe-bench-"))
    save_file({k: v.contiguous() for k, v in core_model.state_dict().items()}, folder / "tagmoe.safetensors")
    (folder / "config.json").write_text(json.dumps(MEDIUM))
    return core_model, folder / "tagmoe.safetensors"


def use_comfyui_on_the_cpu(pytorch_attention: bool = True) -> None:
    """Put ``$COMFYUI_DIR`` (first: its ``nodes``), the tests' helpers and this repository on sys.path and
    set ComfyUI's flags for a CPU run, before any ComfyUI module that reads them is imported."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        sys.exit("set COMFYUI_DIR to a ComfyUI checkout")
    sys.path.insert(0, comfy_dir)
    sys.path.append(str(ROOT / "tests"))
    sys.path.append(str(ROOT))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = pytorch_attention


def native_text_to_image(comfy_sampling, size: int, steps: int):
    """``(run, image tokens)``: ``run(patcher)`` samples one fixed text-to-image run of the medium model in
    ComfyUI (TAG-MoE CFG Guider at 4, TAG-MoE sigmas, euler; fixed noise and prompts) and returns its latents."""
    import comfy.samplers
    import torch

    from tagmoe_core.pipeline.schedule import image_seq_len, reference_sigmas

    h = w = size // 8
    gen = torch.Generator().manual_seed(1)
    text = {name: torch.randn(1, length, MEDIUM["joint_attention_dim"], generator=gen)
            for name, length in (("pos", 24), ("neg", 6))}
    noise = torch.randn(1, 16, 1, h, w, generator=torch.Generator().manual_seed(7))
    latent = torch.zeros(1, 16, 1, h, w)
    seq = image_seq_len(size, size)

    def run(patcher) -> torch.Tensor:
        guider = comfy_sampling.ReferenceCFGGuider(patcher)
        guider.set_conds([[text["pos"], {}]], [[text["neg"], {}]])
        guider.set_cfg(4.0)
        with torch.inference_mode():
            return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"),
                                 reference_sigmas(steps, seq), disable_pbar=True, seed=7)

    return run, seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--config", choices=("medium", "release"), default="medium")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--vram-budget-gib", type=float, help="CUDA: leave ComfyUI this much (as --reserve-vram)")
    parser.add_argument("--weight-dtype", default="default", help="as TAG-MoE Load Diffusion Model's weight_dtype")
    parser.add_argument("--pytorch-attention", action="store_true",
                        help="ComfyUI with --use-pytorch-cross-attention (its default on NVIDIA; on the CPU it splits)")
    parser.add_argument("--gguf", metavar="TYPE", help="release: the weights quantized as 'tagmoe convert --quant "
                                                        "TYPE' would write them (Q8_0, Q4_0, Q4_K, ...), kept "
                                                        "quantized and dequantized at each forward")
    parser.add_argument("--dense", action="store_true",
                        help="release: ComfyUI's own dense Qwen-Image of the same blocks instead (the baseline)")
    parser.add_argument("--layers", type=int, default=60, help="release: fewer blocks for a smoke run (MoE: the "
                                                                 "last min(10, layers - 1))")
    args = parser.parse_args()
    if (args.gguf or args.dense) and args.config != "release":
        parser.error("--gguf and --dense measure the release shapes: add --config release")
    if args.gguf and args.dense:
        parser.error("--gguf and --dense are two runs: the TAG-MoE GGUF model, or ComfyUI's dense Qwen-Image")
    if args.gguf and args.weight_dtype != "default":
        parser.error("--gguf keeps its own quantization: leave --weight-dtype default")
    if args.gguf:
        sys.path.append(str(ROOT))
        from tagmoe_core.model.gguf_format import QUANT_TYPES

        if args.gguf not in QUANT_TYPES:
            parser.error(f"--gguf {args.gguf}: one of {', '.join(QUANT_TYPES)}")
    sys.argv = sys.argv[:1]  # the hiddenswitch fork's comfy.cli_args parses the process's arguments on import
    if args.config == "release":
        return release_run(args)
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        sys.exit("set COMFYUI_DIR to a ComfyUI checkout")
    sys.path.insert(0, comfy_dir)  # ComfyUI's top-level modules (its "nodes") first
    sys.path.append(str(ROOT / "tests"))
    sys.path.append(str(ROOT))
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.device == "cpu"
    comfy.cli_args.args.use_pytorch_cross_attention = args.pytorch_attention
    import comfy.samplers
    import torch
    from node_harness import load_pack

    from tagmoe_core.pipeline.sampling import DenoiseInputs, denoise, make_schedule
    from tagmoe_core.pipeline.latents import pack as pack_tokens
    from tagmoe_core.pipeline.schedule import QWEN_IMAGE_SCHEDULER, image_seq_len, reference_sigmas
    from tagmoe_core.pipeline.text_encoding import PromptEmbeds

    if args.threads:
        torch.set_num_threads(args.threads)
    core_model, checkpoint = medium_tagmoe()

    pack = load_pack(ROOT)
    import importlib

    comfy_model = importlib.import_module(pack.__name__ + ".nodes.comfy_model")
    comfy_sampling = importlib.import_module(pack.__name__ + ".nodes.comfy_sampling")
    native = comfy_model.load_tagmoe_model(checkpoint, args.weight_dtype).patcher

    h = w = args.size // 8
    gen = torch.Generator().manual_seed(1)
    text = {name: torch.randn(1, length, MEDIUM["joint_attention_dim"], generator=gen)
            for name, length in (("pos", 24), ("neg", 6))}
    noise = torch.randn(1, 1, 16, h, w, generator=torch.Generator().manual_seed(7)).reshape(1, 16, 1, h, w)
    latent = torch.zeros(1, 16, 1, h, w)
    seq = image_seq_len(args.size, args.size)

    def run_core() -> torch.Tensor:
        scheduler, timesteps = make_schedule(QWEN_IMAGE_SCHEDULER, args.steps, seq, "cpu")
        ones = {k: torch.ones(v.shape[:2], dtype=torch.long) for k, v in text.items()}
        inputs = DenoiseInputs(pack_tokens(noise), [(1, h // 2, w // 2)], PromptEmbeds(text["pos"], ones["pos"]),
                               PromptEmbeds(text["neg"], ones["neg"]))
        with torch.inference_mode():
            return denoise(core_model, scheduler, timesteps, inputs, 4.0, args.size, args.size, None)

    def run_native() -> torch.Tensor:
        guider = comfy_sampling.ReferenceCFGGuider(native)
        guider.set_conds([[text["pos"], {}]], [[text["neg"], {}]])
        guider.set_cfg(4.0)
        sigmas = reference_sigmas(args.steps, seq)
        with torch.inference_mode():
            out = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True,
                                seed=7)
        return native.model.process_latent_in(out)  # model space, like the core's tokens

    run_core(), run_native()  # warm-up: first-call costs (allocator, ComfyUI's model load)
    times: dict[str, list[float]] = {"core": [], "native": []}
    for _ in range(args.rounds):
        for name, fn in (("core", run_core), ("native", run_native)):
            start = time.perf_counter()
            out = fn()
            times[name].append((time.perf_counter() - start) / args.steps)
            if name == "core":
                core_out = out
            else:
                native_out = out
    from tagmoe_core.pipeline.latents import unpack

    diff = float((unpack(core_out, args.size, args.size) - native_out).abs().max())
    core_s, native_s = statistics.median(times["core"]), statistics.median(times["native"])
    params = sum(p.numel() for p in core_model.parameters()) / 1e6
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}")
    print(f"model: {params:.1f}M parameters ({MEDIUM['num_layers']} blocks, inner dim "
          f"{MEDIUM['num_attention_heads'] * MEDIUM['attention_head_dim']}, last 2 blocks 4-expert MoE), fp32, "
          f"{args.size}x{args.size} ({seq} image tokens), true CFG (2 passes per step), {args.steps} steps, "
          f"{args.rounds} rounds; ComfyUI attention: {'pytorch' if args.pytorch_attention else 'its default'}")
    print("| path | s/step (median) | min | max |\n| --- | ---: | ---: | ---: |")
    for name, label in (("core", "tagmoe_core (diffusers transformer)"), ("native", "native ComfyUI MODEL")):
        print(f"| {label} | {statistics.median(times[name]):.3f} | {min(times[name]):.3f} | {max(times[name]):.3f} |")
    ratios = [n / c for n, c in zip(times["native"], times["core"])]  # pair by pair: robust to drift
    print(f"native / core: median of the per-round ratios {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, "
          f"max {max(ratios):.2f}; ratio of the medians {native_s / core_s:.2f}x); max |latent difference| {diff:.2g}")


RELEASE = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
           "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
           "axes_dims_rope": [16, 56, 56]}


def dense_qwen_image(comfy_model, layers: int, weight_dtype: str, gen: torch.Generator):
    """ComfyUI's own Qwen-Image (the dense model TAG-MoE extends) with ``layers`` blocks and random bf16
    weights, loaded by ComfyUI's own ``load_diffusion_model_state_dict`` as Load Diffusion Model does
    (``weight_dtype`` as its widget): ``(patcher, label, GiB of weights handed over)``."""
    import comfy.ldm.qwen_image.model as qwen_image
    import comfy.sd
    import torch

    with torch.device("meta"):  # a twin for the keys and shapes only
        twin = qwen_image.QwenImageTransformer2DModel(num_layers=layers, device=torch.device("meta"),
                                                      operations=comfy_model.MetaTwinOps)
    state = {k: torch.randn(v.shape, generator=gen, dtype=torch.bfloat16) * 0.02 for k, v in twin.state_dict().items()}
    weight_gib = sum(t.numel() * t.element_size() for t in state.values()) / 2**30
    dtype, fast = comfy_model.WEIGHT_DTYPES[weight_dtype]
    options = {"dtype": dtype} if dtype else {}  # as ComfyUI's UNETLoader sets them
    if fast:
        options["fp8_optimizations"] = True
    patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options=options)
    label = f"dense Qwen-Image (ComfyUI's), weights {patcher.model.get_dtype()}"
    return patcher, label, weight_gib


def random_gguf_state(expected: dict, quant: str, gen: torch.Generator) -> dict:
    """Random weights for ``expected`` (key -> (shape, dtype)) typed as ``tagmoe convert --quant quant``
    types them (``gguf_convert.tensor_type``): float ones as tensors, quantized ones as raw GGML bytes the
    way the loader hands them over (``gguf_reader.as_quantized``). A quantized matrix is 64 random rows
    quantized once and tiled: valid blocks of the type at any size, in seconds, with the dequantization
    and memory traffic of a real file."""
    import torch

    from tagmoe_core.model.gguf_convert import quantize_rows, tensor_type
    from tagmoe_core.model.gguf_reader import TORCH_FLOATS, GGUFTensor, as_quantized

    blocks: dict[tuple[str, int], torch.Tensor] = {}
    state = {}
    for key, (shape, _) in expected.items():
        qtype = tensor_type(key, tuple(shape), quant)
        if not qtype.quantized:
            state[key] = (torch.randn(shape, generator=gen) * 0.02).to(TORCH_FLOATS[qtype.name])
            continue
        rows, width = math.prod(shape[:-1]), shape[-1]
        if (qtype.name, width) not in blocks:
            sample = torch.randn(64, width, generator=gen) * 0.02
            blocks[qtype.name, width] = torch.from_numpy(quantize_rows(sample, qtype)[0].copy())
        block = blocks[qtype.name, width]
        raw = block.repeat(-(-rows // 64), 1)[:rows].reshape(-1)
        state[key] = as_quantized(GGUFTensor(key, qtype, tuple(shape), raw))
    return state


def release_run(args) -> None:
    """The release's architecture with random weights, native only: s/step and peak GPU memory."""
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    sys.path.append(str(ROOT / "tests"))
    sys.path.append(str(ROOT))
    import comfy.cli_args

    comfy.cli_args.args.cpu = args.device == "cpu"
    import comfy.model_management as mm
    import comfy.samplers
    import torch
    from node_harness import load_pack

    from tagmoe_core.model.moe import MoESpec
    from tagmoe_core.pipeline.schedule import image_seq_len, reference_sigmas

    pack = load_pack(ROOT)
    import importlib

    import comfy.ops

    comfy_model = importlib.import_module(pack.__name__ + ".nodes.comfy_model")
    comfy_sampling = importlib.import_module(pack.__name__ + ".nodes.comfy_sampling")
    operations = None
    if args.gguf:
        operations = importlib.import_module(pack.__name__ + ".nodes.comfy_gguf").operations(comfy.ops.manual_cast)
    if args.device == "cuda" and args.vram_budget_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        mm.EXTRA_RESERVED_VRAM = max(0, int(total - args.vram_budget_gib * 2**30))  # what --reserve-vram sets
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    if args.dense:
        patcher, label, weight_gib = dense_qwen_image(comfy_model, args.layers, args.weight_dtype, gen)
        guider_class = comfy.samplers.CFGGuider
    else:
        moe_blocks = min(10, args.layers - 1)
        spec = MoESpec(num_experts=4, top_k=1, num_moe_blocks=moe_blocks, ffn_hidden_size=4 * 3072)
        blocks = list(range(args.layers - moe_blocks, args.layers))
        model, storage, compute = comfy_model.new_tagmoe_model({**RELEASE, "num_layers": args.layers}, spec, blocks,
                                                              args.weight_dtype, num_parameters=22_700_000_000,
                                                              file_dtype=None if args.gguf else torch.bfloat16,
                                                              custom_operations=operations)
        expected = comfy_model.expected_state(model.model_config)
        if args.gguf:
            state = random_gguf_state(expected, args.gguf, gen)
        else:
            # random weights in bf16 (the release file's dtype), loaded as the loader loads a file: with dynamic
            # VRAM's lazy Linears there are no parameters to fill in place
            state = {key: torch.randn(shape, generator=gen, dtype=torch.bfloat16) * 0.02
                     for key, (shape, _) in expected.items()}
        weight_gib = sum(t.numel() * t.element_size() for t in state.values()) / 2**30
        patcher = comfy_model.manage(model, state, gguf=bool(args.gguf))
        del state
        label = f"TAG-MoE, weights {args.gguf or storage}, compute {compute}"
        guider_class = comfy_sampling.ReferenceCFGGuider
    build_s = time.perf_counter() - start
    h = w = args.size // 8
    gen = torch.Generator().manual_seed(1)
    text = {name: torch.randn(1, length, 3584, generator=gen) for name, length in (("pos", 40), ("neg", 6))}
    noise = torch.randn(1, 16, 1, h, w, generator=gen)
    latent = torch.zeros(1, 16, 1, h, w)
    sigmas = reference_sigmas(args.steps, image_seq_len(args.size, args.size))
    times, peaks = [], []
    for _ in range(args.rounds):
        guider = guider_class(patcher)
        guider.set_conds([[text["pos"], {}]], [[text["neg"], {}]])
        guider.set_cfg(4.0)
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.inference_mode():
            guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=7)
        if args.device == "cuda":
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30))
        times.append((time.perf_counter() - start) / args.steps)
    print(f"release architecture ({args.layers} blocks): {label}; random weights {weight_gib:.2f} GiB "
          f"({build_s:.0f} s to build), "
          f"{args.size}x{args.size}, true CFG, {args.steps} steps x {args.rounds} rounds, device {args.device}, "
          f"budget {args.vram_budget_gib or 'all'} GiB")
    print(f"s/step: median {statistics.median(times):.2f} (min {min(times):.2f}, max {max(times):.2f}); "
          f"the first round includes moving the weights in")
    if peaks:
        allocated, reserved = max(p[0] for p in peaks), max(p[1] for p in peaks)
        print(f"peak GPU memory: allocated {allocated:.1f} GiB, reserved {reserved:.1f} GiB")


if __name__ == "__main__":
    main()
