"""The GPU benchmark script, run at toy shapes on the CPU so it cannot rot before a GPU runs it
(its figures mean nothing here; every path it takes on a GPU runs)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_runs_every_mode_on_toy_shapes(tmp_path, capsys):
    bench = load("bench_gpu")
    rows = bench.main(["--tiny", "--device", "cpu", "--in-process", "--steps", "2",
                       "--modes", "single", "single-fp8", "block-swap-0", "model-offload", "multi-gpu",
                       "--json", str(tmp_path / "rows.json")])
    by_mode = {row["mode"]: row for row in rows}
    assert by_mode["multi-gpu"]["skipped"] == "needs two GPUs or more"
    for name in ("single", "single-fp8", "block-swap-0", "model-offload"):
        row = by_mode[name]
        assert row["s_per_step"] > 0 and row["estimate_gib"]["0"] > 0 and row["size"] == 64
    assert "block-swap; 0 blocks on GPU" in capsys.readouterr().out
    assert (tmp_path / "rows.json").read_text().count('"mode"') == 5


def test_bench_gpu_compares_moe_with_dense_pass_by_pass():
    bench = load("bench_gpu")
    rows = bench.main(["--tiny", "--device", "cpu", "--passes", "--rounds", "1", "--repeats", "1"])
    timed = {row["transformer"]: row for row in rows if "skipped" not in row}
    assert set(timed) == {"TAG-MoE, torch MoE backend", "dense Qwen-Image"}
    assert timed["dense Qwen-Image"]["vs_dense"] == 1.0
    assert math.isfinite(timed["TAG-MoE, torch MoE backend"]["vs_dense"])
    assert any("megablocks" in row["transformer"] and "skipped" in row for row in rows)


def test_bench_gguf_sizes_at_release_shapes():
    rows = {row["quant"]: row for row in load("bench_gguf").main(["--release-only"])}
    sizes = [rows[q]["bytes"] for q in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q8_0", "BF16", "F32")]
    assert sizes == sorted(sizes) and rows["BF16"]["bytes"] == rows["F16"]["bytes"]
    assert 42 < rows["BF16"]["gib"] < 42.5 and 8.5 < rows["Q8_0"]["bits_per_weight"] < 8.6  # 22.7B weights
    assert rows["Q4_0"]["types"]["Q4_0"] == 900  # 50 dense blocks x 14 matrices + 10 MoE blocks x (12 + 4 x 2)


def test_bench_gguf_measures_the_trained_tiny_model_per_type():
    rows = load("bench_gguf").main(["--release-only", "--trained", "2", "--quants", "Q8_0"])
    trained = {row["quant"]: row for row in rows if row["model"] == "trained"}
    assert set(trained) == {"original (fp16 safetensors)", "BF16", "Q8_0"}
    assert trained["BF16"]["edit_rel_l2_vs_bf16"] == 0.0 and trained["BF16"]["types"]["BF16"] > 0
    # fp16 weights read as bf16 lose a few bits; Q8_0 a few more, still far below a changed picture's error
    assert 0 < trained["original (fp16 safetensors)"]["edit_rel_l2_vs_bf16"] < 1e-2
    assert 0 < trained["Q8_0"]["edit_rel_l2_vs_original"] < 2e-2 and trained["Q8_0"]["types"]["Q8_0"] > 0
    assert trained["BF16"]["call_rel_l2_vs_bf16"] == 0.0 and 0 < trained["Q8_0"]["call_rel_l2_vs_bf16"] < 5e-2
    assert all(0 <= row["success"] <= 2 and row["samples"] == 2 for row in trained.values())


def test_bench_native_refuses_arguments_it_would_ignore_before_importing_comfyui(monkeypatch, capsys):
    """--gguf and --dense measure the release shapes, one at a time, and the type is one the converter
    writes; each was ignored or ended in a bare KeyError deep in a run (no ComfyUI needed to get this far)."""
    import pytest

    bench = load("bench_native")
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    for argv, message in ((["--gguf", "Q4_0"], "add --config release"),
                          (["--config", "release", "--gguf", "Q4_0", "--dense"], "two runs"),
                          (["--config", "release", "--gguf", "q4_0"], "--gguf q4_0: one of Q8_0, "),
                          (["--config", "release", "--gguf", "Q4_0", "--weight-dtype", "fp8_e4m3fn"],
                           "leave --weight-dtype default")):
        monkeypatch.setattr("sys.argv", ["bench_native.py", *argv])
        with pytest.raises(SystemExit) as exited:
            bench.main()
        assert exited.value.code == 2 and message in capsys.readouterr().err
