"""TAG-MoE as a ComfyUI MODEL from GGUF files vs from the .safetensors they were made from: seconds per
step per quant type side by side in one run, and each type's latent error, on bench_native's random
medium model (its matrices are multiples of 256 wide, so every type, K-quants included, applies).

    COMFYUI_DIR=/path/to/ComfyUI python bench/bench_gguf_native.py [--size 256] [--steps 3] [--rounds 5]
        [--quants Q8_0 Q6_K Q5_0 Q4_0 BF16]

Each round times every variant once, alternating; medians and the median of the per-round ratios to
the safetensors model are reported, with the relative L2 distance of each variant's final latents to
the safetensors model's (same noise, schedule and prompts: TAG-MoE Scheduler, CFG Guider, euler).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(Path(__file__).resolve().parent))
from bench_native import medium_tagmoe, native_text_to_image, use_comfyui_on_the_cpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quants", nargs="+", default=["Q8_0", "Q6_K", "Q5_0", "Q4_0", "BF16"])
    args = parser.parse_args()
    use_comfyui_on_the_cpu(pytorch_attention=True)
    import torch
    from node_harness import load_pack

    from tagmoe_core.model.gguf_convert import convert_to_gguf

    _, checkpoint = medium_tagmoe()
    pack = load_pack(ROOT)
    import importlib

    comfy_model = importlib.import_module(pack.__name__ + ".nodes.comfy_model")
    comfy_sampling = importlib.import_module(pack.__name__ + ".nodes.comfy_sampling")
    variants = {"safetensors": comfy_model.load_tagmoe_model(checkpoint).patcher}
    sizes = {"safetensors": checkpoint.stat().st_size}
    for quant in args.quants:
        path = checkpoint.with_name(f"tagmoe-{quant}.gguf")
        convert_to_gguf(checkpoint, path, quant)
        variants[quant] = comfy_model.load_tagmoe_model(path).patcher
        sizes[quant] = path.stat().st_size

    run, seq = native_text_to_image(comfy_sampling, args.size, args.steps)

    for patcher in variants.values():  # warm-up: loading to the device, first-call costs
        run(patcher)
    times: dict[str, list[float]] = {name: [] for name in variants}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, patcher in variants.items():
            start = time.perf_counter()
            outs[name] = run(patcher)
            times[name].append((time.perf_counter() - start) / args.steps)
    base = outs["safetensors"]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; medium TAG-MoE fp32, {args.size}x{args.size} ({seq} image tokens), true CFG, "
          f"{args.steps} steps, {args.rounds} rounds")
    for name in variants:
        ratios = [t / s for t, s in zip(times[name], times["safetensors"])]
        relative = float((outs[name] - base).norm() / base.norm())
        print(f"{name:12s} {sizes[name] / 2**20:7.1f} MiB  {statistics.median(times[name]):.4f} s/step "
              f"(min {min(times[name]):.4f}, max {max(times[name]):.4f}), x{statistics.median(ratios):.2f} of "
              f"safetensors ({min(ratios):.2f}-{max(ratios):.2f}), latents rel L2 {relative:.2e}")


if __name__ == "__main__":
    main()
