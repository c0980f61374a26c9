"""Peak host memory of loading a TAG-MoE transformer: ours against the reference's way.

A synthetic TAG-MoE checkpoint (~1.1 GB in bf16, sharded, the whole transformer as the release
ships it) and its dense base are written once. Each method then runs in a fresh process that
loads the transformer in bf16 on the CPU and reads every weight once (so that memory-mapped
weights count as resident too); the process reports its peak resident set size above what it
held after imports. Methods alternate, and medians over the runs are reported.

* ``ours``: ``tagmoe_core.model.loading.load_tagmoe_transformer`` (meta device, tensors from the
  safetensors memory map straight into place; the base weights are not read at all);
* ``ours-fp32``: ours again, cast to float32 while loading (the CPU default): the peak is
  then relative to the fp32 model, twice the file;
* ``reference``: as the release does it: ``from_pretrained`` of the base transformer, MoE
  layers swapped in (allocated and initialised), then every TAG-MoE shard loaded with
  ``safetensors.torch.load_file`` and assigned with ``load_state_dict(strict=False, assign=True)``.

    python bench/bench_loading.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = {"_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": 64, "out_channels": 16,
          "num_layers": 16, "attention_head_dim": 128, "num_attention_heads": 8, "joint_attention_dim": 1024,
          "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]}
MOE_BLOCKS = 4


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across
    # fork + exec, so a child would report the parent's peak.
    return _status("VmHWM")


def make(workdir: Path) -> None:
    import torch
    from huggingface_hub import save_torch_state_dict

    from tagmoe_core.model.moe import MoESpec
    from tagmoe_core.model.transformer import build_tagmoe_transformer

    if (workdir / "DONE").is_file():
        return
    spec = MoESpec(num_moe_blocks=MOE_BLOCKS)
    generator = torch.Generator().manual_seed(0)

    def random_state(model) -> dict:
        return {k: torch.randn(v.shape, generator=generator).mul_(0.02).to(torch.bfloat16)
                for k, v in model.state_dict(keep_vars=True).items()}

    for name, blocks in (("base", 0), ("tagmoe", MOE_BLOCKS)):
        folder = workdir / name / "transformer"
        folder.mkdir(parents=True, exist_ok=True)
        meta = build_tagmoe_transformer(CONFIG, MoESpec(num_moe_blocks=blocks) if blocks else spec, device="meta")
        state = random_state(meta)
        if name == "base":  # a dense Qwen-Image transformer: no tag modules
            state = {k: v for k, v in state.items() if not k.startswith(("tag_", "router_head"))}
        save_torch_state_dict(state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                              max_shard_size="400MB")
        (folder / "config.json").write_text(json.dumps(CONFIG))
        del state
    (workdir / "DONE").write_text("ok")


def load_ours(workdir: Path, dtype: str = "bfloat16"):
    import torch

    from tagmoe_core.model.loading import load_tagmoe_transformer

    model, _ = load_tagmoe_transformer(workdir / "tagmoe", workdir / "base", dtype=getattr(torch, dtype),
                                       device="cpu", backend="torch")
    return model


def load_reference(workdir: Path):
    import torch
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import load_file

    from tagmoe_core.model.moe import MoESpec
    from tagmoe_core.model.transformer import convert_to_tagmoe

    model = QwenImageTransformer2DModel.from_pretrained(workdir / "base" / "transformer", torch_dtype=torch.bfloat16)
    convert_to_tagmoe(model, MoESpec(num_moe_blocks=MOE_BLOCKS), backend="torch")  # allocated + initialised
    for shard in sorted((workdir / "tagmoe" / "transformer").glob("*.safetensors")):
        weights = load_file(shard)
        model.load_state_dict(weights, strict=False, assign=True)
        del weights
    return model


def measure(method: str, workdir: Path) -> dict:
    import diffusers  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch

    from tagmoe_core.model.loading import load_tagmoe_transformer  # noqa: F401 - imports before the baseline

    before = rss_bytes()
    start = time.perf_counter()
    model = {"ours": load_ours, "reference": load_reference,
             "ours-fp32": lambda w: load_ours(w, "float32")}[method](workdir)
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        for param in model.parameters():  # read every weight once
            param.sum()
    peak = peak_rss_bytes()
    return {"method": method, "seconds": seconds, "peak_above_imports": peak - before,
            "rss_after": rss_bytes() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/tagmoe-bench-loading")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=["ours", "reference", "ours-fp32"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if args.child:
        print(json.dumps(measure(args.child, workdir)))
        return
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"import bench_loading; bench_loading.make(__import__('pathlib').Path({str(workdir)!r}))"],
                   check=True)  # in a child, so that this process stays small
    ckpt = sum(p.stat().st_size for p in (workdir / "tagmoe" / "transformer").glob("*.safetensors"))
    results: dict[str, list[dict]] = {"ours": [], "reference": [], "ours-fp32": []}
    for _ in range(args.runs):
        for method in results:
            out = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--child", method],
                                 capture_output=True, text=True, check=True)
            results[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"# TAG-MoE checkpoint: {ckpt / 2**30:.2f} GiB bf16 in "
          f"{len(list((workdir / 'tagmoe' / 'transformer').glob('*.safetensors')))} shards; "
          f"{args.runs} runs per method, medians")
    summary = {}
    for method, runs in results.items():
        peak = statistics.median(r["peak_above_imports"] for r in runs)
        secs = statistics.median(r["seconds"] for r in runs)
        model_bytes = ckpt * (2 if method.endswith("fp32") else 1)  # an fp32 model is twice the bf16 file
        summary[method] = {"peak_gib": peak / 2**30, "peak_x_model": peak / model_bytes, "load_s": secs}
        print(f"{method:10s} peak {peak / 2**30:5.2f} GiB = {peak / model_bytes:4.2f}x the loaded model   "
              f"load {secs:5.2f} s")
    print(f"ours / reference peak: {summary['ours']['peak_gib'] / summary['reference']['peak_gib']:.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
