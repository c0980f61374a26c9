"""Activation memory of a release-width transformer pass and of a full-size VAE decode, to
calibrate the placement estimates (``ACTIVATION_FACTOR``, ``VAE_ELEMENTS_PER_PIXEL``).

The transformer is a slice of the release: Qwen-Image's block shapes (inner dim 3072, 24 heads
of 128, MLP 12288, text dim 3584, RoPE axes 16/56/56) with two blocks, the second a 4-expert
top-1 MoE block; activations do not add up over blocks (each block's are freed before the
next), so two blocks peak like sixty. The VAE is Qwen-Image's at full size. Weights are random.
Peaks are counted with ``tagmoe_core.runtime.memory.TensorMemoryTracker`` (every tensor an operator
allocates, until freed); on CUDA also with ``torch.cuda.max_memory_allocated``.

    python bench/bench_memory.py                          # CPU: fp32 (this CPU has no fast bf16)
    python bench/bench_memory.py --sizes 512 1024 2048    # CUDA: bf16

The factor printed is the estimate's unit: peak / (tokens x inner dim x dtype bytes), tokens
counting the target, the condition image (edits) and 256 text tokens; for the VAE, peak / (pixels
x dtype bytes).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from tagmoe_core.model import moe
from tagmoe_core.model.moe import MoESpec
from tagmoe_core.model.transformer import build_tagmoe_transformer
from tagmoe_core.pipeline.placement import RELEASE_TRANSFORMER, TEXT_TOKENS
from tagmoe_core.runtime.memory import TensorMemoryTracker

MIB = 2**20


def measure(fn, device: torch.device) -> dict[str, int]:
    """Peak bytes allocated by ``fn()`` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), TensorMemoryTracker() as tracker:
        fn()
    result = {"tracked": tracker.peak}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["cuda_allocated"] = torch.cuda.max_memory_allocated(device) - base
    return result


def transformer_rows(device: torch.device, dtype: torch.dtype, sizes: list[int], blocks: int,
                     heads: int = RELEASE_TRANSFORMER["num_attention_heads"]) -> list[dict]:
    torch.manual_seed(0)
    config = dict(RELEASE_TRANSFORMER, num_layers=blocks, num_attention_heads=heads)
    model = build_tagmoe_transformer(config, MoESpec(num_experts=4, top_k=1, num_moe_blocks=1), device=device,
                                     dtype=dtype)
    hidden, text_dim = model.inner_dim, config["joint_attention_dim"]
    text = torch.randn(1, TEXT_TOKENS, text_dim, device=device, dtype=dtype)
    rows = []
    grouped_ok = moe._grouped_mm_ok
    for size in sizes:
        side = size // 16
        for edit in (True, False):
            images = 2 if edit else 1
            latents = torch.randn(1, images * side * side, 64, device=device, dtype=dtype)
            shapes = [[(1, side, side)] * images]
            t = torch.full((1,), 0.5, device=device, dtype=dtype)
            paths = ("expert loop", "grouped_mm") if device.type == "cpu" else ("auto",)
            for path in paths:
                # The CUDA path sorts every token into one grouped GEMM; on the CPU it is forced
                # here to count its intermediates (it is not the CPU's default: slower there).
                moe._grouped_mm_ok = (lambda a, b: True) if path == "grouped_mm" else grouped_ok
                try:
                    peak = measure(lambda: model(hidden_states=latents, timestep=t, encoder_hidden_states=text,
                                                 img_shapes=shapes, return_dict=False), device)
                finally:
                    moe._grouped_mm_ok = grouped_ok
                tokens = latents.shape[1] + TEXT_TOKENS
                rows.append({"part": "transformer pass", "size": size, "edit": edit, "moe_path": path,
                             "tokens": tokens, **peak,
                             "factor": round(peak["tracked"] / (tokens * hidden * dtype.itemsize), 2)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def vae_rows(device: torch.device, dtype: torch.dtype, sizes: list[int]) -> list[dict]:
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage().to(device, dtype).eval()  # the defaults are Qwen-Image's VAE
    rows = []
    for size in sizes:
        z = torch.randn(1, 16, 1, size // 8, size // 8, device=device, dtype=dtype)
        peak = measure(lambda: vae.decode(z, return_dict=False), device)
        rows.append({"part": "VAE decode", "size": size, **peak,
                     "elements_per_pixel": round(peak["tracked"] / size**2 / dtype.itemsize, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 768], help="square sides, pixels")
    parser.add_argument("--vae-sizes", type=int, nargs="+", default=[128, 256, 384])
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (the last one MoE)")
    parser.add_argument("--heads", type=int, default=RELEASE_TRANSFORMER["num_attention_heads"],
                        help="attention heads of 128 (fewer: a narrower slice, for bf16 on a slow CPU)")
    parser.add_argument("--skip-vae", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda"
                                                                           else "fp32")]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {device}, {dtype}, "
          f"inner dim {args.heads * 128}")
    rows = transformer_rows(device, dtype, args.sizes, args.blocks, args.heads) if args.sizes else []
    if not args.skip_vae:
        rows += vae_rows(device, dtype, args.vae_sizes)
    print("\n| part | size | tokens | MoE path | peak | factor / elements per pixel |"
          "\n| --- | ---: | ---: | --- | ---: | ---: |")
    for row in rows:
        if row["part"] == "VAE decode":
            print(f"| VAE decode | {row['size']}² | | | {row['tracked'] / MIB:.0f} MiB | "
                  f"{row['elements_per_pixel']} per pixel |")
        else:
            kind = "edit" if row["edit"] else "text-to-image"
            print(f"| transformer pass, {kind} | {row['size']}² | {row['tokens']} | {row['moe_path']} | "
                  f"{row['tracked'] / MIB:.0f} MiB | {row['factor']} |")


if __name__ == "__main__":
    main()
