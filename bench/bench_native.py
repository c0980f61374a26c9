"""Native (TAG-MoE as a ComfyUI MODEL, sampled by ComfyUI) vs tagmoe_core: seconds per step on the
CPU, side by side in one run, on a medium-size random TAG-MoE (same weights in both).

    COMFYUI_DIR=/path/to/ComfyUI python bench/bench_native.py [--size 512] [--steps 4] [--rounds 5]

Run it with a Python that has ComfyUI's requirements and this package. Both sides denoise the
same text-to-image run with true CFG (two transformer passes per step): the core with its
diffusers transformer and scheduler, ComfyUI with SamplerCustomAdvanced's euler, TAG-MoE Scheduler,
CFG Guider and Noise. Each round times both once, alternating; the medians are reported, with
the largest difference of their latents.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEDIUM = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 8, "attention_head_dim": 64,
          "num_attention_heads": 8, "joint_attention_dim": 512, "guidance_embeds": False,
          "axes_dims_rope": [8, 28, 28]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        sys.exit("set COMFYUI_DIR to a ComfyUI checkout")
    sys.path.insert(0, comfy_dir)  # ComfyUI's top-level modules (its "nodes") first
    sys.path.append(str(ROOT / "tests"))
    sys.path.append(str(ROOT))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.samplers
    import torch
    from node_harness import load_pack
    from safetensors.torch import save_file

    from tagmoe_core.model.moe import MoESpec
    from tagmoe_core.model.transformer import build_tagmoe_transformer
    from tagmoe_core.pipeline.sampling import DenoiseInputs, denoise, make_schedule
    from tagmoe_core.pipeline.latents import pack as pack_tokens
    from tagmoe_core.pipeline.schedule import QWEN_IMAGE_SCHEDULER, image_seq_len, reference_sigmas
    from tagmoe_core.pipeline.text_encoding import PromptEmbeds

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = MoESpec(num_experts=4, top_k=1, num_moe_blocks=2)
    core_model = build_tagmoe_transformer(MEDIUM, spec, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in core_model.parameters():
            p.normal_(0, 0.02)
    folder = Path(tempfile.mkdtemp(prefix="tagmoe-bench-"))
    save_file({k: v.contiguous() for k, v in core_model.state_dict().items()}, folder / "tagmoe.safetensors")
    (folder / "config.json").write_text(json.dumps(MEDIUM))

    pack = load_pack(ROOT)
    import importlib

    comfy_model = importlib.import_module(pack.__name__ + ".nodes.comfy_model")
    comfy_sampling = importlib.import_module(pack.__name__ + ".nodes.comfy_sampling")
    native = comfy_model.load_tagmoe_model(folder / "tagmoe.safetensors").patcher

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
          f"{args.rounds} rounds")
    print("| path | s/step (median) | min | max |\n| --- | ---: | ---: | ---: |")
    for name, label in (("core", "tagmoe_core (diffusers transformer)"), ("native", "native ComfyUI MODEL")):
        print(f"| {label} | {statistics.median(times[name]):.3f} | {min(times[name]):.3f} | {max(times[name]):.3f} |")
    print(f"native / core: {native_s / core_s:.2f}x; max |latent difference| {diff:.2g}")


if __name__ == "__main__":
    main()
