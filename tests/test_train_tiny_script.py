"""scripts/train_tiny.py end to end at a toy size: every stage runs, the report has each part, and the
trained VAE is also written as a ComfyUI file (Wan 2.1 keys at the shape ComfyUI builds) that
decodes as the diffusers VAE does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny.py"


@pytest.mark.slow
def test_train_tiny_runs_every_stage_and_writes_a_comfyui_vae(tmp_path):
    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import load_file

    from tagmoe_core.model.vae_keys import diffusers_qwen_vae_to_comfy
    from tagmoe_core.model.vae_widen import widen

    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "run"
    assert script.main([str(out), "--count", "14", "--heldout-count", "7", "--vae-steps", "3", "--vae-crop", "32",
                        "--steps", "3", "--warmup", "2", "--eval-steps", "2", "--eval-limit", "7",
                        "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["vae"]["steps"] == 3 and report["transformer"]["steps"] == 3
    assert report["eval"]["n"] == 7 and set(report["vae"]["heldout_target_ceiling"]) == set(report["eval"]["tasks"])
    comfy = Path(report["vae"]["comfyui_file"])
    assert comfy == out / "qwen_image_vae_tiny.safetensors"
    state = load_file(comfy)
    vae = AutoencoderKLQwenImage.from_pretrained(out / "vae")
    expected = diffusers_qwen_vae_to_comfy(widen(vae).state_dict())
    assert set(state) == set(expected) and "decoder.middle.0.residual.0.gamma" in state
    for key, tensor in expected.items():
        torch.testing.assert_close(state[key].float(), tensor.to(torch.bfloat16).float())
