"""bench/bench_native.py's release-architecture runs (what a GPU session measures at 1024x1024: TAG-MoE in
bf16, fp8 and as GGUF, against ComfyUI's own dense Qwen-Image) on two blocks at 64x64 on the CPU, in a
real ComfyUI, so the script cannot rot before a GPU runs it (its figures mean nothing here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_server import COMFYUI_DIR

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")]

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_native.py"


@pytest.mark.parametrize("variant, expected", [
    ([], "TAG-MoE, weights torch.float32"),  # bf16 on a GPU; ComfyUI computes in fp32 on the CPU
    (["--weight-dtype", "fp8_e4m3fn"], "TAG-MoE, weights torch.float8_e4m3fn"),
    (["--gguf", "Q4_K"], "TAG-MoE, weights Q4_K"),
    (["--dense"], "dense Qwen-Image (ComfyUI's), weights torch.float32"),
])
def test_release_architecture_runs_on_two_blocks(variant, expected):
    done = subprocess.run([sys.executable, str(BENCH), "--config", "release", "--layers", "2", "--size", "64",
                           "--steps", "1", "--rounds", "1", "--device", "cpu", *variant],
                          env={**os.environ, "COMFYUI_DIR": COMFYUI_DIR}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    print(done.stdout)
    assert f"release architecture (2 blocks): {expected}" in done.stdout
    assert "s/step: median" in done.stdout
