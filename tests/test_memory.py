"""The tensor-memory tracker, and the placement estimates against what it measures on the real
classes (a release-shaped transformer slice, Qwen-Image's full-size VAE)."""

from __future__ import annotations

import pytest
import torch

from tagmoe_core.model import moe
from tagmoe_core.model.moe import MoESpec
from tagmoe_core.model.transformer import build_tagmoe_transformer
from tagmoe_core.pipeline.placement import (
    RELEASE_TRANSFORMER,
    TEXT_TOKENS,
    ComponentSizes,
    activation_bytes,
    vae_work_bytes,
)
from tagmoe_core.runtime.memory import TensorMemoryTracker

MB4 = 1000 * 1000 * 4  # a 1000 x 1000 fp32 tensor


def test_tracker_counts_new_storages_until_freed():
    w = torch.randn(1000, 1000)
    with torch.inference_mode(), TensorMemoryTracker() as tracker:
        y = w @ w
        z = torch.relu(y)
        assert tracker.live == 2 * MB4
        del y
        assert tracker.live == MB4
        u = z * 2
        assert tracker.live == tracker.peak == 2 * MB4
        del z, u
    assert tracker.live == 0 and tracker.peak == 2 * MB4


def test_tracker_ignores_views_and_in_place_results():
    """A view or an in-place op allocates nothing, and a view of a tensor made before the block
    (a weight) must not count as an allocation (it did, at first: 1.2 GB for an MoE layer)."""
    w = torch.randn(1000, 1000)
    with torch.inference_mode(), TensorMemoryTracker() as tracker:
        views = [w.view(-1), w.t(), w[:10], w.reshape(1000, 1000)]
        w.mul_(2)
        y = w + 1
        y.relu_()
        part = y[:3]
        assert tracker.peak == MB4
        tracker.reset_peak()
        del views, y, part
        assert tracker.live == 0 and tracker.peak == MB4


@pytest.fixture(scope="module")
def release_slice():
    """Two release-shaped blocks (heads of 128, MLP 4x, text dim 3584, RoPE 16/56/56), the second
    a 4-expert MoE block; two heads wide so it runs in a second on the CPU."""
    torch.manual_seed(0)
    config = dict(RELEASE_TRANSFORMER, num_layers=2, num_attention_heads=2)
    return build_tagmoe_transformer(config, MoESpec(num_moe_blocks=1), device="cpu")


@pytest.mark.parametrize("grouped", [False, True], ids=["expert-loop", "grouped-mm-on-cpu"])
def test_activation_estimate_covers_a_measured_pass(release_slice, monkeypatch, grouped):
    if grouped:
        monkeypatch.setattr(moe, "_grouped_mm_ok", lambda a, b: True)
    side = 512 // 16
    latents, text = torch.randn(1, 2 * side * side, 64), torch.randn(1, TEXT_TOKENS, 3584)
    with torch.inference_mode(), TensorMemoryTracker() as tracker:
        release_slice(hidden_states=latents, timestep=torch.full((1,), 0.5), encoder_hidden_states=text,
                      img_shapes=[[(1, side, side)] * 2], return_dict=False)
    sizes = ComponentSizes([], 0, 0, 0, release_slice.inner_dim, 4)
    estimate = activation_bytes(sizes, 512, 512, edit=True)
    # Covered, with the headroom for the CUDA allocator, and not by an arbitrary margin.
    assert 0.5 * estimate < tracker.peak < 0.8 * estimate


def test_vae_estimate_covers_a_measured_decode():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage().eval()  # Qwen-Image's VAE at full size, random weights
    z = torch.randn(1, 16, 1, 8, 8)
    with torch.inference_mode(), TensorMemoryTracker() as tracker:
        image = vae.decode(z, return_dict=False)[0]
    assert image.shape[-2:] == (64, 64)
    estimate = vae_work_bytes(64, 64, dtype_bytes=4)
    assert 0.5 * estimate < tracker.peak < 0.9 * estimate
