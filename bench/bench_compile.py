"""ComfyUI's TorchCompileModel on the TAG-MoE MODEL vs eager: seconds per step, side by side in one
run, on a random TAG-MoE (bench_native's medium model), sampled by ComfyUI.

    COMFYUI_DIR=/path/to/ComfyUI python bench/bench_compile.py [--size 256] [--steps 4] [--rounds 5]

Three variants, each round timing each once, alternating; medians reported with the largest latent
difference to eager:

* ``eager``: the MODEL as TAG-MoE Load Diffusion Model gives it;
* ``compiled``: after ComfyUI's TorchCompileModel (inductor). Each MoE layer reads its per-expert
  token counts on the host (``counts.tolist()``), which splits the compiled graph there;
* ``compiled-dense``: the same, with the MoE layers computing every expert on every token and
  masking (no host sync, one graph; top-1 means E times the expert FLOPs): what removing the break
  the simple way costs or saves.
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
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--split-attention", action="store_true",
                        help="ComfyUI's CPU default, which reads free memory per block (a graph break per block); "
                             "by default PyTorch's attention, ComfyUI's default on NVIDIA")
    args = parser.parse_args()
    use_comfyui_on_the_cpu(pytorch_attention=not args.split_attention)
    import torch
    import torch._dynamo
    from node_harness import load_pack


    torch._dynamo.config.cache_size_limit = 64  # three variants of one model class: keep every graph
    _, checkpoint = medium_tagmoe()

    pack = load_pack(ROOT)
    import importlib

    comfy_model = importlib.import_module(pack.__name__ + ".nodes.comfy_model")
    comfy_sampling = importlib.import_module(pack.__name__ + ".nodes.comfy_sampling")
    moe_linear = importlib.import_module(pack.__name__ + ".tagmoe_core.model.moe_linear")
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    def compiled(patcher):
        out = TorchCompileModel.execute(patcher, "inductor") if hasattr(TorchCompileModel, "execute") \
            else TorchCompileModel().patch(patcher, "inductor")
        return out[0] if isinstance(out, tuple) else out.result[0]

    eager = comfy_model.load_tagmoe_model(checkpoint).patcher
    dense_patcher = comfy_model.load_tagmoe_model(checkpoint).patcher
    class DenseMoE(moe_linear.LinearExpertsMoE):
        def forward(self, x):
            return _dense_forward(self, moe_linear.route_logits, x)

    for layer in dense_patcher.model.diffusion_model.modules():
        if isinstance(layer, moe_linear.LinearExpertsMoE):
            layer.__class__ = DenseMoE
    variants = {"eager": eager, "compiled": compiled(eager), "compiled-dense": compiled(dense_patcher)}

    run, seq = native_text_to_image(comfy_sampling, args.size, args.steps)

    first: dict[str, float] = {}
    for name, patcher in variants.items():  # warm-up: compilation happens here
        torch._dynamo.utils.counters.clear()
        start = time.perf_counter()
        run(patcher)
        first[name] = time.perf_counter() - start
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        print(f"{name}: first run {first[name]:.1f} s, {graphs} graphs compiled, graph breaks {breaks}")
        for reason, count in torch._dynamo.utils.counters["graph_break"].items():
            print(f"    {count} x {' | '.join(reason.splitlines()[:3])[:400]}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, patcher in variants.items():
            start = time.perf_counter()
            outs[name] = run(patcher)
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["eager"])
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {args.size}x{args.size} ({seq} image tokens), true CFG, {args.steps} steps, "
          f"{args.rounds} rounds")
    for name in variants:
        median = statistics.median(times[name])
        ratios = [t / e for t, e in zip(times[name], times["eager"])]  # per round: robust to the machine's drift
        diff = float((outs[name] - outs["eager"]).abs().max())
        print(f"{name:15s} {median:.4f} s/step (min {min(times[name]):.4f}, max {max(times[name]):.4f}), "
              f"x{median / base:.2f} of eager (per-round median x{statistics.median(ratios):.2f}, "
              f"{min(ratios):.2f}-{max(ratios):.2f}), max latent diff {diff:.2e}")


def _dense_forward(self, route_logits, x):
    """Every expert on every token, masked by the top-1 choice: no host sync (bench only)."""
    import torch

    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    _, weights, experts = route_logits(self.router(x2d), self.top_k, self.layer_index, shape)
    out = torch.zeros_like(x2d)
    for e, expert in enumerate(self.experts):
        gate = (weights * (experts == e)).sum(-1, keepdim=True).to(x2d.dtype)
        out = out + gate * expert(x2d)
    return out.view(shape)


if __name__ == "__main__":
    main()
