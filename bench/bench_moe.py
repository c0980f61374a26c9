"""MoE layer (torch backend) against a dense FFN with the same active size, on the CPU.

Top-1 routing over 4 experts does the FLOPs of one dense FFN, so the ratio shows the cost of
routing (router matmul, softmax, sort, gather, scatter). Both are measured in the same run,
interleaved, with torch.utils.benchmark; the median of the repeats is reported.

    python bench/bench_moe.py                # 4096 tokens, hidden 512, 4 experts, ffn 2048
    python bench/bench_moe.py --tokens 8192 --hidden 1024
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from diffusers.models.attention import FeedForward
from torch.utils import benchmark

from tagmoe_core.model.moe import MoESpec, TagMoEFeedForward
from tagmoe_core.model.run_state import routing_run


def median_ms(fn, x, repeats: int) -> float:
    timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.5).median * 1e3 if repeats == 0 else \
        sorted(timer.timeit(1).median * 1e3 for _ in range(repeats))[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per variant (median reported)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median of round medians)")
    args = parser.parse_args()
    torch.manual_seed(0)
    ffn = 4 * args.hidden
    dense = FeedForward(args.hidden, dim_out=args.hidden, activation_fn="gelu-approximate").eval()
    variants = {"dense FFN": dense}
    for k in (1, 2):
        layer = TagMoEFeedForward(args.hidden, MoESpec(num_experts=args.experts, top_k=k, ffn_hidden_size=ffn),
                                  backend="torch").eval()
        layer.reset_parameters()
        variants[f"MoE top-{k}"] = layer
    skewed = TagMoEFeedForward(args.hidden, MoESpec(num_experts=args.experts, top_k=1, ffn_hidden_size=ffn),
                               backend="torch").eval()
    skewed.reset_parameters()
    bias = torch.tensor([30.0] + [0.0] * (args.experts - 1))  # every token to expert 0

    def all_to_one(x, layer=skewed):
        with routing_run(logit_bias=bias):
            return layer(x)

    variants["MoE top-1, all tokens to one expert"] = all_to_one
    x = torch.randn(1, args.tokens, args.hidden)

    rounds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, module in variants.items():
                rounds[name].append(median_ms(module, x, args.repeats))
    result = {name: sorted(v)[len(v) // 2] for name, v in rounds.items()}
    base = result["dense FFN"]
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# {args.tokens} tokens, hidden {args.hidden}, ffn {ffn}, {args.experts} experts, fp32, no grad")
    for name, ms in result.items():
        print(f"{name:38s} {ms:9.2f} ms   {ms / base:5.2f}x dense")
    print(json.dumps({"config": vars(args), "median_ms": result}))


if __name__ == "__main__":
    main()
