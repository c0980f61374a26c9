"""Placement modes: size estimates, the choice for 'auto', refusals, and every mode's result on
the tiny model (on the CPU the moves are trivial, but every hook and code path runs)."""

from __future__ import annotations

import pytest
import torch

from tagmoe_core.model.moe import moe_layers
from tagmoe_core.pipeline.builder import load_pipeline
from tagmoe_core.pipeline.placement import (
    FP8,
    Placement,
    PlacementError,
    apply_placement,
    choose_placement,
    component_sizes,
    need_for,
    release_sizes,
)
from tagmoe_core.runtime.devices import GIB, DeviceSpec

PROMPT = "Change the cloak to red color"
ONE, TWO = DeviceSpec("cuda", (0,)), DeviceSpec("cuda", (0, 1))


@pytest.fixture(scope="module")
def release():
    """Component sizes of the real release (60 blocks, Qwen2.5-VL-7B, Qwen-Image VAE), from configs."""
    return release_sizes()


def test_release_sizes(release):
    bf16, fp8 = release, release.fp8()
    assert 42.0 < bf16.transformer / GIB < 42.6 and 15.2 < bf16.text_encoder / GIB < 15.6  # 22.7B and 8.3B
    assert 0.2 < bf16.vae / GIB < 0.3
    assert bf16.transformer_blocks[59] > 1.6 * bf16.transformer_blocks[0]  # MoE blocks hold 4 experts
    assert fp8.transformer < 0.51 * bf16.transformer


@pytest.mark.parametrize("gpus, free_gib, mode, detail", [
    ((0,), 80, "single", None),
    ((0,), 52, "single", "text encoder off the GPU"),
    # 48 GB: the transformer (42.3 GiB) and a 1024x1024 decode (4.5 GiB) do not fit together.
    ((0,), 48, "model-offload", "text encoder off the GPU"),
    ((0,), 24, "block-swap", "27 blocks on GPU"),
    ((0,), 16, "block-swap", "text encoder on the CPU"),
    ((0, 1), 40, "multi-gpu", None),
    ((0, 1), 48, "multi-gpu", None),  # several GPUs given: split, even where one would do with offloading
])
def test_auto_choice(release, gpus, free_gib, mode, detail):
    placed = choose_placement("auto", release, DeviceSpec("cuda", gpus), {i: free_gib * GIB for i in gpus})
    assert placed.mode == mode and placed.reason and all(v <= (free_gib - 2) * GIB for v in placed.need.values())
    if detail:
        assert detail in placed.describe()


def test_estimates_cover_what_is_on_the_gpu_in_every_phase(release):
    """The peak is at least the resident part plus whatever visits: the text encoder pushes the
    resident transformer out while it visits, so encode needs encoder + VAE, and denoising needs
    the resident part + streamed blocks + activations (the review found the text phase missing)."""
    s = release
    vae, te = s.vae, s.text_encoder
    single_drop = need_for("single", s, ONE, drop_text_encoder=True)[0]
    assert single_drop >= vae + s.transformer and single_drop >= vae + te
    assert need_for("single", s, ONE)[0] >= s.total
    for n in (0, 30, 60):
        swap = need_for("block-swap", s, ONE, blocks_on_gpu=n)[0]
        resident = s.transformer_rest + sum(s.transformer_blocks[:n])
        assert swap >= vae + te and swap >= vae + resident + 2 * max(s.transformer_blocks)
    offload = need_for("model-offload", s, ONE)[0]
    assert offload >= vae + te and offload >= vae + s.transformer


def test_auto_prefers_more_resident_blocks_with_more_memory(release):
    resident = [choose_placement("auto", release, ONE, {0: gib * GIB}).blocks_on_gpu for gib in (22, 24, 28, 32)]
    assert resident == sorted(resident) and resident[0] < resident[-1]
    needs = [need_for("block-swap", release, ONE, blocks_on_gpu=n)[0] for n in (0, 10, 30, 60)]
    assert needs == sorted(needs)
    assert choose_placement("auto", release, ONE, {0: 32 * GIB}, blocks_on_gpu=5).blocks_on_gpu == 5


def test_refusals_name_a_mode_that_fits(release):
    with pytest.raises(PlacementError, match=r"'single' does not fit \(cuda:0 needs ~62.\d GiB but 22.0 GiB is "
                                             r"usable\); 'block-swap' with blocks_on_gpu=\d+ would"):
        choose_placement("single", release, ONE, {0: 24 * GIB})
    with pytest.raises(PlacementError, match="'model-offload' does not fit .* would"):
        choose_placement("model-offload", release, ONE, {0: 24 * GIB})
    with pytest.raises(PlacementError, match="needs at least two GPUs"):
        choose_placement("multi-gpu", release, ONE, {0: 80 * GIB})
    with pytest.raises(PlacementError, match="not combined with fp8"):
        choose_placement("multi-gpu", release, TWO, {0: 80 * GIB, 1: 80 * GIB}, fp8=True)
    with pytest.raises(PlacementError, match="does not fit on cuda:0"):
        choose_placement("auto", release, ONE, {0: 4 * GIB})
    with pytest.raises(PlacementError, match="use 'single'"):
        choose_placement("block-swap", release, DeviceSpec("cpu"))
    with pytest.raises(PlacementError, match="unknown placement mode"):
        choose_placement("half", release, ONE, {0: 80 * GIB})
    assert choose_placement("single", release, ONE, {0: 80 * GIB}).reason == "as asked"
    assert choose_placement("single", release, ONE, {0: 48 * GIB}, fp8=True).need[0] < 46 * GIB


def test_estimates_match_the_loaded_tiny_model(tiny_bundle, tiny_pipe):
    from tagmoe_core.model.loading import plan_tagmoe_load

    plan = plan_tagmoe_load(tiny_bundle.tagmoe, tiny_bundle.base)
    sizes = component_sizes(plan.model, tiny_bundle.base, torch.float32)
    assert sizes.fp8().transformer_blocks == [b // 4 for b in sizes.transformer_blocks]

    def measured(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    assert sizes.transformer == measured(tiny_pipe.transformer)
    assert sizes.text_encoder == measured(tiny_pipe.text_encoder) and sizes.vae == measured(tiny_pipe.vae)
    assert sizes.transformer_blocks == [measured(b) for b in tiny_pipe.transformer.transformer_blocks]


# -- every mode on the tiny model ---------------------------------------------------------------------------
def _placed(bundle, placement: Placement):
    pipe = load_pipeline(bundle.base, bundle.tagmoe, device="cpu")
    apply_placement(pipe, placement, torch.device("cpu"))
    return pipe


CPU = DeviceSpec("cpu")


@pytest.mark.parametrize("placement", [
    Placement("model-offload", CPU),
    Placement("block-swap", CPU, blocks_on_gpu=0),
    Placement("block-swap", CPU, blocks_on_gpu=2),
    Placement("single", CPU, drop_text_encoder=True),
    Placement("single", CPU, text_encoder_on_cpu=True),
], ids=["model-offload", "block-swap-0", "block-swap-2", "drop-text-encoder", "text-encoder-on-cpu"])
def test_every_mode_gives_the_single_device_image(tiny_bundle, tiny_pipe, photo, placement):
    want = tiny_pipe.edit(photo, PROMPT, width=64, height=48, steps=2, seed=3).latents
    pipe = _placed(tiny_bundle, placement)
    visits = []
    original = type(pipe.text_encoder).to

    def spy(module, *args, **kwargs):
        visits.append((type(module).__name__, str(args[0]) if args else str(kwargs.get("device"))))
        return original(module, *args, **kwargs)

    type(pipe.text_encoder).to = spy
    try:
        got = pipe.edit(photo, PROMPT, width=64, height=48, steps=2, seed=3).latents
    finally:
        type(pipe.text_encoder).to = original
    assert torch.equal(got, want)
    expected = {"model-offload": {"text_encoder", "transformer"}, "block-swap": {"text_encoder"},
                "single": {"text_encoder"} if placement.drop_text_encoder and not placement.text_encoder_on_cpu
                else set()}[placement.mode]
    assert pipe.offloaded == expected
    if "text_encoder" in expected:  # one visit for both prompts: in, then out
        assert visits == [("Qwen2_5_VLForConditionalGeneration", "cpu"),
                          ("Qwen2_5_VLForConditionalGeneration", "cpu")]
    if placement.mode == "single" and placement.drop_text_encoder and not placement.text_encoder_on_cpu:
        assert pipe.evict_for_text_encoder == [pipe.transformer]
    if placement.mode == "block-swap":
        from diffusers.hooks import HookRegistry

        hooked = [hasattr(b, "_diffusers_hook") and HookRegistry.check_if_exists_or_initialize(b).hooks
                  for b in pipe.transformer.transformer_blocks]
        assert [bool(h) for h in hooked] == [i >= placement.blocks_on_gpu for i in range(4)]


def test_fp8_storage_includes_the_experts_and_stays_close(tiny_bundle, tiny_pipe, photo):
    want = tiny_pipe.edit(photo, PROMPT, width=64, height=48, steps=2, seed=3).latents
    pipe = _placed(tiny_bundle, Placement("single", CPU, fp8=True))
    for layer in moe_layers(pipe.transformer):
        assert layer.experts.mlp.w1.dtype == FP8 and layer.router.layer.weight.dtype == FP8
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == FP8
    assert pipe.transformer.router_head.net[0].weight.dtype == torch.float32  # analysis modules keep precision
    got = pipe.edit(photo, PROMPT, width=64, height=48, steps=2, seed=3).latents
    assert got.dtype == torch.float32 and not torch.equal(got, want)
    relative = (got - want).norm() / want.norm()
    assert relative < 0.25, float(relative)
    fp8_combo = _placed(tiny_bundle, Placement("block-swap", CPU, fp8=True, blocks_on_gpu=1))
    torch.testing.assert_close(fp8_combo.edit(photo, PROMPT, width=64, height=48, steps=2, seed=3).latents, got)


def test_load_pipeline_checks_the_placement_first(tiny_bundle):
    calls = []
    with pytest.raises(PlacementError, match="use 'single'"):
        load_pipeline(tiny_bundle.base, tiny_bundle.tagmoe, device="cpu", placement="model-offload",
                      before_load=lambda: calls.append(1))
    assert calls == []  # refused before any weight was read
    pipe = load_pipeline(tiny_bundle.base, tiny_bundle.tagmoe, device="cpu", placement="auto")
    assert pipe.placement.mode == "single" and "cpu" in pipe.placement.reason
