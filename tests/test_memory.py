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


# -- memory left, and runs that do not fit -------------------------------------------------------------------------
def test_available_host_memory_from_meminfo_and_a_cgroup_limit(tmp_path):
    from tagmoe_core.runtime.memory import available_host_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684092 kB\nMemFree:         1000000 kB\nMemAvailable:   22017580 kB\n")
    no_cgroup = str(tmp_path / "none")
    assert available_host_bytes(str(meminfo), no_cgroup, no_cgroup) == 22017580 * 1024
    group = tmp_path / "cgroup" / "box"
    group.mkdir(parents=True)
    (tmp_path / "self_cgroup").write_text("0::/box\n")
    (group / "memory.max").write_text("8589934592\n")  # an 8 GiB container on a 24 GB host
    (group / "memory.current").write_text("3221225472\n")
    (group / "memory.stat").write_text("anon 2147483648\ninactive_file 1073741824\n")
    limited = available_host_bytes(str(meminfo), str(tmp_path / "cgroup"), str(tmp_path / "self_cgroup"))
    assert limited == 8589934592 - 3221225472 + 1073741824
    (group / "memory.max").write_text("max\n")
    assert available_host_bytes(str(meminfo), str(tmp_path / "cgroup"), str(tmp_path / "self_cgroup")) == \
        22017580 * 1024
    # This machine: some memory, never more than it has.
    here = available_host_bytes()
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert here is not None and 0 < here <= total


def test_the_run_estimate_covers_the_tiny_models_measured_run(tiny_pipe, photo):
    """Measured on the tiny model's real classes: every phase's estimate covers its tensor count
    (the shapes differ from the release's, which BENCHMARKS.md measures)."""
    cond = tiny_pipe.encode("Change the cloak to red color")
    text = cond.positive.embeds.shape[1]
    estimate = tiny_pipe.run_estimate()
    for image, share in ((photo, 1.0), (None, 0.0)):
        with torch.inference_mode(), TensorMemoryTracker() as tracker:
            out = tiny_pipe.sample(cond, image, width=256, height=192, steps=1, cfg=1.0, seed=0, num_images=2)
            sampled = tracker.peak
            tracker.reset_peak()
            tiny_pipe.decode(out.latents)
            decoded = tracker.peak - tracker.live
        phases = estimate.phases(256, 192, 2, share, text)
        sampling = max(v for k, v in phases.items() if k != "decoding")
        assert 0.3 * sampling < sampled <= sampling, (sampled, phases)
        assert 0.3 * phases["decoding"] < decoded <= phases["decoding"], (decoded, phases)


def test_a_refused_run_names_a_size_and_a_count_that_fit():
    from tagmoe_core.errors import InputError
    from tagmoe_core.pipeline.placement import ALL_PHASES, RunEstimate, check_run_fits

    estimate = RunEstimate(hidden_size=3072, dtype_bytes=2, vae_dtype_bytes=2, tiled_decode=False)
    everything = ALL_PHASES

    def need(w: int, h: int, n: int) -> int:
        return max(estimate.phases(w, h, n, 1.0, 100).values())

    free = need(1024, 768, 1) + 1
    with pytest.raises(InputError) as info:
        check_run_fits(estimate, 2048, 1536, 3, 1.0, 100, {"cuda:0": everything}, {"cuda:0": free}, "edit")
    message = str(info.value)
    assert message.startswith("a 2048x1536 edit of 3 images needs ~") and "on cuda:0 (decoding)" in message
    size = message.split("available: ")[1].split(" would fit")[0]
    w, h = (int(v) for v in size.split("x"))
    assert w % 16 == 0 and h % 16 == 0 and abs(w / h - 4 / 3) < 0.02
    assert need(w, h, 3) <= free < need(w + 16, round((w + 16) * 0.75 / 16) * 16, 3)
    with pytest.raises(InputError, match="or 1 image at a time would fit") as info:
        check_run_fits(estimate, 1024, 768, 3, 1.0, 100, {"cuda:0": everything}, {"cuda:0": free}, "edit")
    # Within the memory: nothing to say; unknown memory (None): not checked.
    check_run_fits(estimate, 1024, 768, 1, 1.0, 100, {"cuda:0": everything}, {"cuda:0": free})
    check_run_fits(estimate, 8192, 8192, 9, 1.0, 100, {"mps": everything}, {"mps": None})
    # Weights visiting the device for a phase count in that phase only.
    phases = estimate.phases(1024, 768, 1, 1.0, 100)
    room = free - phases["denoising"]
    visiting = dict(everything, denoising=room + 1)
    with pytest.raises(InputError, match=r"1024x768 .* \(denoising\)"):
        check_run_fits(estimate, 1024, 768, 1, 1.0, 100, {"cuda:0": visiting}, {"cuda:0": free})
    check_run_fits(estimate, 1024, 768, 1, 1.0, 100, {"cuda:0": dict(everything, denoising=room)}, {"cuda:0": free})


@pytest.mark.parametrize("kwargs", [{"width": 32768, "height": 32768},
                                    {"width": 1024, "height": 1024, "num_images": 100_000}])
@pytest.mark.parametrize("edit", [True, False], ids=["edit", "text-to-image"])
def test_runs_that_cannot_fit_are_refused_before_any_work(tiny_pipe, photo, kwargs, edit):
    """A 4096x4096 run on the tiny model reached 4.8 GB on its first step with no message;
    these would need terabytes: refused before the VAE or the transformer runs."""
    from tagmoe_core.errors import InputError

    calls = []
    hooks = [tiny_pipe.transformer.register_forward_hook(lambda *a: calls.append("transformer")),
             tiny_pipe.vae.encoder.register_forward_hook(lambda *a: calls.append("vae"))]
    try:
        with pytest.raises(InputError, match=r"needs ~[\d.]+ GiB on cpu .* is available: .*would fit"):
            tiny_pipe.sample(tiny_pipe.encode("a cat"), photo if edit else None, steps=1, seed=0, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []
