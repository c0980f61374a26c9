"""GGUF figures: file size per ``--quant`` type at the release's shapes (exact, from the converter's own plan
of the release tensor list: no weights needed), and on the tiny model the file size and the rel L2 of one
model call against the original weights (fp32, core transformer, same inputs). ``--trained N``: the
shipped trained tiny model written as each type, through ``tagmoe edit``'s pipeline: the rel L2 of
4-step edits' latents against the BF16 file's and the original weights' (same inputs and seeds), and
task success on the first N held-out samples as ``scripts/train_tiny.py`` judges them.

    python bench/bench_gguf.py [--trained 140] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RELEASE = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
           "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
           "axes_dims_rope": [16, 56, 56]}
RELEASE_BLOCKS = list(range(50, 60))


def release_sizes() -> list[dict]:
    from tagmoe_core.model.gguf_convert import plan_gguf
    from tagmoe_core.model.gguf_format import QUANT_TYPES
    from tagmoe_core.model.moe import MoESpec
    from tagmoe_core.model.transformer import build_tagmoe_transformer

    spec = MoESpec(num_experts=4, top_k=1, num_moe_blocks=10, ffn_hidden_size=12288)
    model = build_tagmoe_transformer(RELEASE, spec, moe_blocks=RELEASE_BLOCKS, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    params = sum(torch.Size(s).numel() for k, s in shapes.items() if not k.endswith("experts.bias"))
    rows = []
    for quant in QUANT_TYPES:
        plan = plan_gguf(shapes, quant, RELEASE, spec, RELEASE_BLOCKS)
        size = plan.file_size
        rows.append({"model": "release", "quant": quant, "bytes": size, "gib": size / 2**30,
                     "bits_per_weight": 8 * size / params, "tensors": len(plan.entries), "types": plan.type_counts()})
    return rows


def tiny_rows() -> list[dict]:
    from tagmoe_core.model.gguf_convert import convert_to_gguf
    from tagmoe_core.model.gguf_format import QUANT_TYPES
    from tagmoe_core.model.loading import load_tagmoe_transformer
    from tagmoe_core.tiny import ensure_tiny_bundle

    bundle = ensure_tiny_bundle()
    original, _ = load_tagmoe_transformer(bundle.tagmoe, bundle.base)
    reference = _call(original)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for quant in QUANT_TYPES:
            report = convert_to_gguf(bundle.tagmoe, Path(scratch) / f"tiny-{quant}.gguf", quant)
            model, _ = load_tagmoe_transformer(report.output)
            out = _call(model)
            rows.append({"model": "tiny", "quant": quant, "bytes": report.nbytes,
                         "rel_l2_model_call": float((out - reference).norm() / reference.norm())})
    return rows


def trained_rows(samples: int, edits: int = 6, quants: list[str] | None = None) -> list[dict]:
    """Per type, the shipped trained tiny model (``tiny.trained_tiny_bundle``) from a GGUF file of that
    type: ``call_rel_l2_vs_bf16``, of one model call (``_call``'s inputs) against the BF16 file's;
    ``edit_rel_l2_vs_bf16`` / ``_vs_original``, the rel L2 of the final latents of ``edits`` 4-step
    held-out edits (the first of each edit task, seed = index) against the BF16 file's and the original
    weights'; ``success``, of the first ``samples`` held-out samples (20 steps, cfg 1)."""
    from tagmoe_core.model.gguf_convert import convert_to_gguf
    from tagmoe_core.model.gguf_format import QUANT_TYPES
    from tagmoe_core.pipeline.builder import load_pipeline
    from tagmoe_core.tiny import trained_tiny_bundle
    from tagmoe_core.training import synthetic
    from tagmoe_core.training.evaluation import judge_sample

    bundle = trained_tiny_bundle()
    edit_specs = [synthetic.make_sample(synthetic.TASKS.index(task), split="heldout")
                  for task in synthetic.EDITS[:edits]]
    judged_specs = [synthetic.make_sample(i, split="heldout") for i in range(samples)]

    def measure(weights) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        pipe = load_pipeline(bundle.base, weights, device="cpu", dtype=torch.float32, backend="torch",
                             placement="single")
        latents = [pipe.sample(pipe.encode(spec.instruction, ""), spec.input_image(), width=spec.width,
                               height=spec.height, steps=4, cfg=1.0, seed=spec.index, tags=spec.tags).latents.float()
                   for spec in edit_specs]
        ok = sum(judge_sample(pipe, spec, seed=spec.index).ok for spec in judged_specs)
        return _call(pipe.transformer), latents, ok

    def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return float(torch.cat([x.flatten() for x in a]).sub(torch.cat([y.flatten() for y in b])).norm()
                     / torch.cat([y.flatten() for y in b]).norm())

    original_call, original, original_ok = measure(bundle.tagmoe)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for quant in ["BF16"] + [q for q in (quants or QUANT_TYPES) if q != "BF16"]:
            report = convert_to_gguf(bundle.tagmoe, Path(scratch) / f"trained-{quant}.gguf", quant)
            results[quant] = (report.nbytes, report.type_counts, *measure(report.output))
    bf16_call, bf16 = results["BF16"][2], results["BF16"][3]
    rows = [{"model": "trained", "quant": "original (fp16 safetensors)", "bytes": None, "edits": len(edit_specs),
             "call_rel_l2_vs_bf16": rel([original_call], [bf16_call]),
             "edit_rel_l2_vs_bf16": rel(original, bf16), "edit_rel_l2_vs_original": 0.0,
             "success": original_ok, "samples": samples, "types": {}}]
    for quant, (nbytes, types, call, latents, ok) in results.items():
        rows.append({"model": "trained", "quant": quant, "bytes": nbytes, "types": types, "edits": len(edit_specs),
                     "call_rel_l2_vs_bf16": rel([call], [bf16_call]), "edit_rel_l2_vs_bf16": rel(latents, bf16),
                     "edit_rel_l2_vs_original": rel(latents, original),
                     "success": ok, "samples": samples})
    return rows


def dequant_rows(repeats: int = 3) -> list[dict]:
    """Seconds to dequantize one release expert matrix [12288, 3072] per type on this machine's CPU (what a
    quantized Linear adds to each forward, before its matmul), and the matmul of 4096 tokens with it."""
    import time

    import numpy as np

    from tagmoe_core.model.gguf_convert import quantize_rows
    from tagmoe_core.model.gguf_dequant import TYPES, dequantize
    from tagmoe_core.model.gguf_format import QUANT_TYPES

    rows = np.random.default_rng(0).standard_normal((12288, 3072), dtype=np.float32) * 0.02
    x = torch.randn(4096, 3072)
    out = []
    for quant in QUANT_TYPES:
        raw = torch.from_numpy(np.ascontiguousarray(quantize_rows(torch.from_numpy(rows), TYPES[quant])[0])
                               .reshape(-1).view(np.uint8))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            weight = dequantize(raw, quant, (12288, 3072), torch.float32)
            best = min(best, time.perf_counter() - start)
        start = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        out.append({"model": "dequant", "quant": quant, "seconds": best, "matmul_4096_tokens_s":
                    time.perf_counter() - start, "threads": torch.get_num_threads()})
    return out


def _call(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 48, 64, generator=g)
    text = torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([0.5]), encoder_hidden_states=text,
                     img_shapes=[[(1, 6, 8)]], return_dict=False)[0].float()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--release-only", action="store_true", help="skip the tiny model")
    parser.add_argument("--dequant", action="store_true", help="also time dequantizing a release expert matrix")
    parser.add_argument("--trained", type=int, default=0, metavar="N",
                        help="also the shipped trained tiny model per type: 4-step edits' error and success on N "
                             "held-out samples")
    parser.add_argument("--quants", nargs="+", help="the types --trained writes (default: all; BF16 always)")
    args = parser.parse_args(argv)
    rows = release_sizes() + ([] if args.release_only else tiny_rows()) + (dequant_rows() if args.dequant else [])
    rows += trained_rows(args.trained, quants=args.quants) if args.trained else []
    for row in rows:
        if row["model"] == "release":
            print(f"release {row['quant']:5s} {row['bytes']:>15,d} B  {row['gib']:6.2f} GiB  "
                  f"{row['bits_per_weight']:5.2f} bits/weight  {row['types']}")
        elif row["model"] == "dequant":
            print(f"dequant {row['quant']:5s} [12288, 3072] in {row['seconds'] * 1e3:7.1f} ms on {row['threads']} "
                  f"CPU threads (its matmul with 4096 tokens: {row['matmul_4096_tokens_s'] * 1e3:.0f} ms)")
        elif row["model"] == "trained":
            size = "" if row["bytes"] is None else f"{row['bytes']:>12,d} B"
            print(f"trained {row['quant']:5s} {size}  one call: rel L2 vs BF16 {row['call_rel_l2_vs_bf16']:.2e}; "
                  f"{row['edits']} 4-step edits: rel L2 vs BF16 "
                  f"{row['edit_rel_l2_vs_bf16']:.2e}, vs original {row['edit_rel_l2_vs_original']:.2e}; "
                  f"held-out success {row['success']}/{row['samples']}  {row['types']}")
        else:
            print(f"tiny    {row['quant']:5s} {row['bytes']:>15,d} B  rel L2 of one model call "
                  f"{row['rel_l2_model_call']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
