"""Placement modes on the CPU: each mode's edit against the single-device edit on the tiny
model, and the memory each mode is estimated to need for the release at 1024x1024.

    python bench/bench_placement.py

(GPU figures - seconds per step and peak GPU memory per mode at 1024x1024 with CFG - need a
CUDA machine; see BENCHMARKS.md for what was and was not measured.)
"""

from __future__ import annotations

import torch

from tagmoe_core.demo import demo_image
from tagmoe_core.pipeline.builder import load_pipeline
from tagmoe_core.pipeline.placement import Placement, apply_placement, choose_placement, need_for, release_sizes
from tagmoe_core.runtime.devices import GIB, DeviceSpec
from tagmoe_core.tiny import ensure_tiny_bundle

CPU = DeviceSpec("cpu")
MODES = {
    "single": Placement("single", CPU),
    "model-offload": Placement("model-offload", CPU),
    "block-swap (0 resident)": Placement("block-swap", CPU, blocks_on_gpu=0),
    "block-swap (2 resident)": Placement("block-swap", CPU, blocks_on_gpu=2),
    "drop text encoder": Placement("single", CPU, drop_text_encoder=True),
    "fp8 storage": Placement("single", CPU, fp8=True),
    "fp8 + block-swap": Placement("block-swap", CPU, fp8=True, blocks_on_gpu=1),
}


def correctness() -> None:
    bundle = ensure_tiny_bundle()
    image = demo_image()
    reference = None
    print("| mode | max abs diff vs single | relative L2 |\n| --- | ---: | ---: |")
    for name, placement in MODES.items():
        pipe = load_pipeline(bundle.base, bundle.tagmoe, device="cpu")
        apply_placement(pipe, placement, torch.device("cpu"))
        latents = pipe.edit(image, "Change the cloak to red color", width=128, height=96, steps=4, seed=0).latents
        reference = latents if reference is None else reference
        diff = (latents - reference).abs().max().item()
        rel = ((latents - reference).norm() / reference.norm()).item()
        print(f"| {name} | {diff:.3g} | {rel:.3g} |")


def release_estimates() -> None:
    bf16 = release_sizes()
    fp8 = bf16.fp8()
    print(f"\nrelease weights (bf16): transformer {bf16.transformer / GIB:.1f} GiB, text encoder "
          f"{bf16.text_encoder / GIB:.1f} GiB, VAE {bf16.vae / GIB:.2f} GiB; "
          f"fp8 transformer {fp8.transformer / GIB:.1f} GiB")
    one = DeviceSpec("cuda", (0,))
    print("\n| estimate at 1024x1024 edit (bf16) | GPU memory |\n| --- | ---: |")
    for label, mode, sizes, extra in (("single", "single", bf16, {}),
                                      ("single, text encoder dropped", "single", bf16, {"drop_text_encoder": True}),
                                      ("single, fp8", "single", fp8, {}),
                                      ("model-offload", "model-offload", bf16, {}),
                                      ("block-swap, 0 resident", "block-swap", bf16, {"blocks_on_gpu": 0}),
                                      ("block-swap, 30 resident", "block-swap", bf16, {"blocks_on_gpu": 30}),
                                      ("block-swap, 0 resident, text encoder on CPU", "block-swap", bf16,
                                       {"blocks_on_gpu": 0, "text_encoder_on_cpu": True})):
        print(f"| {label} | {need_for(mode, sizes, one, **extra)[0] / GIB:.1f} GiB |")
    two = need_for("multi-gpu", bf16, DeviceSpec("cuda", (0, 1)), budgets={0: 38 * GIB, 1: 38 * GIB})
    print(f"| multi-gpu over 2 x 40 GB | {two[0] / GIB:.1f} + {two[1] / GIB:.1f} GiB |")
    print("\n| GPU free memory | 'auto' chooses |\n| --- | --- |")
    for gib in (80, 48, 24, 16, 12):
        placed = choose_placement("auto", bf16, one, {0: gib * GIB})
        print(f"| {gib} GB | {placed.describe()} |")
    placed = choose_placement("auto", bf16, DeviceSpec("cuda", (0, 1)), {0: 40 * GIB, 1: 40 * GIB})
    print(f"| 2 x 40 GB | {placed.describe()} |")


if __name__ == "__main__":
    correctness()
    release_estimates()
