"""The math both paths share, checked without ComfyUI: the reference schedule (bit for bit against
diffusers' scheduler), true CFG in the latent layout, the condition image (against diffusers'
VaeImageProcessor), rotary ids (against diffusers' QwenEmbedRope), the per-expert MoE and its
key layout, region boxes, and dimensions read off a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tagmoe_core.errors import InputError
from tagmoe_core.model.checkpoint import CheckpointReader, resolve_weight_files
from tagmoe_core.model.expert_layout import merge_experts, split_experts, to_linear_experts, to_release
from tagmoe_core.model.layout import infer_moe_layout, strip_wrapper_prefix, transformer_dims
from tagmoe_core.model.moe import MoESpec, TagMoEFeedForward
from tagmoe_core.model.moe_linear import LinearExpertsMoE
from tagmoe_core.model.positions import RegionShape, reference_ids
from tagmoe_core.model.run_state import routing_run
from tagmoe_core.pipeline.condition import condition_pixels, vae_input
from tagmoe_core.pipeline.guidance import true_cfg, true_cfg_latents
from tagmoe_core.pipeline.latents import pack, unpack
from tagmoe_core.pipeline.regions import mask_box
from tagmoe_core.pipeline.schedule import QWEN_IMAGE_SCHEDULER, reference_sigmas, shifted_sigmas


# -- schedule ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 30, 50])
@pytest.mark.parametrize("seq_len", [12, 256, 4096, 6889])
def test_schedule_is_diffusers_reference_scheduler_bit_for_bit(steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tagmoe_core.pipeline.schedule import shift_for

    config = dict(QWEN_IMAGE_SCHEDULER)
    if steps == 1:
        config["shift_terminal"] = None  # the reference divides by zero here; one step is 1 -> 0
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=shift_for(seq_len))
    ours = reference_sigmas(steps, seq_len)
    assert ours.dtype == torch.float32 and torch.equal(ours, scheduler.sigmas)
    assert ours[0] == 1.0 and ours[-1] == 0.0


def test_schedule_denoise_keeps_the_tail_and_refuses_nonsense():
    full = reference_sigmas(10, 256)
    assert torch.equal(reference_sigmas(10, 256, denoise=0.4), full[6:])
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(InputError, match="denoise"):
            reference_sigmas(10, 256, denoise=bad)
    with pytest.raises(InputError, match="steps"):
        shifted_sigmas(0, 256)


# -- CFG -----------------------------------------------------------------------------------------------
def test_true_cfg_in_latent_layout_is_the_token_rule():
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(2, 16, 1, 6, 8, generator=gen), torch.randn(2, 16, 1, 6, 8, generator=gen)
    want = unpack(true_cfg(pack(pos), pack(neg), 4.0), 6 * 8, 8 * 8)
    assert torch.equal(true_cfg_latents(pos, neg, 4.0), want)
    assert torch.equal(true_cfg_latents(pos[:, :, 0], neg[:, :, 0], 4.0), want[:, :, 0])  # 4-D latents
    assert true_cfg_latents(pos, neg, 1.0) is pos  # no CFG at scale <= 1, as the reference
    # the rule: every 2x2x16 token of the result has the conditional token's norm
    out = pack(true_cfg_latents(pos, neg, 3.0))
    torch.testing.assert_close(out.norm(dim=-1), pack(pos).norm(dim=-1))


def test_true_cfg_latents_with_an_odd_grid_has_no_nan_and_keeps_the_shape():
    pos, neg = torch.randn(1, 16, 1, 5, 7), torch.randn(1, 16, 1, 5, 7)
    out = true_cfg_latents(pos, neg, 4.0)
    assert out.shape == pos.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[..., :4, :6], true_cfg_latents(pos[..., :4, :6], neg[..., :4, :6], 4.0))


# -- condition image -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, target", [((72, 40), (640, 384)), ((300, 300), (64, 64)), ((97, 211), (48, 96))])
def test_condition_pixels_are_diffusers_preprocess_of_the_bucketed_image(photo, size, target):
    from diffusers.image_processor import VaeImageProcessor

    from tagmoe_core.pipeline.buckets import snap_to_bucket

    image = photo.resize(size)
    width, height = target
    want = VaeImageProcessor(vae_scale_factor=16).preprocess(snap_to_bucket(image), height, width)[:, :, None]
    pixels = condition_pixels(image, width, height)
    assert pixels.shape == (1, height, width, 3) and 0 <= pixels.min() and pixels.max() <= 1
    assert torch.equal(vae_input(pixels), want)


# -- rotary ids -------------------------------------------------------------------------------------------
def _rope_from_ids(ids: torch.Tensor, axes: list[int], theta: float = 10000.0) -> torch.Tensor:
    """Complex rotary factors of ids [N, 3] (what any RoPE implementation computes from positions)."""
    parts = []
    for axis, dim in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(torch.polar(torch.ones(len(ids), dim // 2, dtype=torch.float64),
                                 ids[:, axis].double()[:, None] * freqs[None]))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("target, condition", [((4, 4), (4, 4)), ((3, 4), (3, 4)), ((5, 7), (3, 5)), ((6, 2), None)])
def test_reference_ids_give_diffusers_rotary_embeddings(target, condition):
    """Target frame 0, condition frame 1, grids centred as diffusers centres them (odd sizes too),
    text after the target grid: the ids ComfyUI's EmbedND gets reproduce QwenEmbedRope exactly."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    axes, text_len = [4, 6, 6], 5
    rope = QwenEmbedRope(theta=10000, axes_dim=axes, scale_rope=True)
    shapes = [(1, *target)] + ([(1, *condition)] if condition else [])
    img, txt = rope([shapes], device=torch.device("cpu"), max_txt_seq_len=text_len)
    ids = reference_ids(target, [condition] if condition else [], text_len)
    ours = _rope_from_ids(ids, axes)
    torch.testing.assert_close(ours[:text_len].to(txt.dtype), txt, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[text_len:].to(img.dtype), img, rtol=0, atol=1e-6)


def test_region_ids_are_full_grid_positions_in_frame_zero():
    from tagmoe_core.model.rope import TagMoERope

    axes, text_len = [4, 6, 6], 3
    region = RegionShape(5, 6, (1, 2, 3, 4))
    rope = TagMoERope(theta=10000, axes_dim=axes, scale_rope=True)
    img, txt = rope([[(1, 4, 4), region]], device=torch.device("cpu"), max_txt_seq_len=text_len)
    ids = reference_ids((4, 4), [region], text_len)
    assert ids.shape == (text_len + 16 + region.num_tokens, 3) and torch.all(ids[text_len + 16:, 0] == 0)
    torch.testing.assert_close(_rope_from_ids(ids, axes)[text_len:].to(img.dtype), img, rtol=0, atol=1e-6)


# -- the MoE made of Linear layers ------------------------------------------------------------------------
H, F_, E = 16, 24, 4


def _pair(seed=0):
    torch.manual_seed(seed)
    release = TagMoEFeedForward(H, MoESpec(num_experts=E, ffn_hidden_size=F_), backend="torch", layer_index=7).eval()
    release.reset_parameters()
    with torch.no_grad():
        release.router.layer.weight.mul_(5)
        release.experts.bias.normal_()  # trained but never added: must not change anything
    linear = LinearExpertsMoE(H, F_, E, layer_index=7).eval()
    prefix = "transformer_blocks.0.img_mlp."
    state = {prefix + k: v for k, v in release.state_dict().items()}
    split = {k.removeprefix(prefix): v for k, v in split_experts(state, E).items()}
    linear.load_state_dict(split, strict=True)
    return release, linear


def test_linear_experts_give_the_release_layer_and_route_the_same():
    release, linear = _pair()
    x = torch.randn(3, 11, H)
    seen = {"release": [], "linear": []}
    with torch.no_grad():
        for name, layer in (("release", release), ("linear", linear)):
            with routing_run(observer=lambda i, s, e, w, shape, name=name: seen[name].append((i, e, shape))):
                out = layer(x)
            seen[name].append(out)
    torch.testing.assert_close(seen["linear"][-1], seen["release"][-1], rtol=1e-5, atol=1e-6)
    (i1, e1, s1), (i2, e2, s2) = seen["release"][0], seen["linear"][0]
    assert i1 == i2 == 7 and torch.equal(e1, e2) and s1 == s2 == x.shape
    with torch.no_grad(), routing_run(logit_bias=torch.tensor([0.0, 0.0, 60.0, 0.0])):
        torch.testing.assert_close(linear(x), release(x), rtol=1e-5, atol=1e-6)


def test_an_expert_without_tokens_is_never_called():
    _, linear = _pair()
    calls = [0] * E
    for e, expert in enumerate(linear.experts):
        expert.w1.register_forward_hook(lambda m, a, o, e=e: calls.__setitem__(e, calls[e] + 1))
    with torch.no_grad(), routing_run(logit_bias=torch.tensor([0.0, 80.0, 0.0, 0.0])):
        linear(torch.randn(2, 9, H))
    assert calls == [0, 1, 0, 0]


def test_expert_layout_split_and_merge_are_exact_inverses():
    release, _ = _pair(3)
    state = {f"transformer_blocks.9.img_mlp.{k}": v for k, v in release.state_dict().items()}
    state["transformer_blocks.9.attn.to_q.weight"] = torch.randn(H, H)
    split = split_experts(state, E)
    assert "transformer_blocks.9.img_mlp.experts.bias" not in split
    assert split["transformer_blocks.9.img_mlp.experts.2.w2.weight"].shape == (H, F_)
    assert torch.equal(split["transformer_blocks.9.img_mlp.experts.2.w1.weight"],
                       state["transformer_blocks.9.img_mlp.experts.mlp.w1"][2 * F_:3 * F_])
    merged = merge_experts(split)
    assert set(merged) == set(state) - {"transformer_blocks.9.img_mlp.experts.bias"}
    for key, value in merged.items():
        assert torch.equal(value, state[key]), key
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert set(to_linear_experts(shapes, E)) == set(split)
    assert set(to_release({k: tuple(v.shape) for k, v in split.items()})) == set(merged)


# -- regions, layout ---------------------------------------------------------------------------------------
def test_an_empty_default_mask_asks_for_a_painted_region_before_the_size_check():
    """LoadImage gives a 64x64 empty mask for an image without alpha: say what to do about it."""
    with pytest.raises(InputError, match="paint the region"):
        mask_box(torch.zeros(64, 64), (256, 192))
    with pytest.raises(InputError, match="is 64x64 but the image is 256x192"):
        mask_box(torch.ones(64, 64), (256, 192))
    assert mask_box(torch.ones(192, 256), (256, 192)) == (0, 0, 256, 192)


def test_dimensions_and_moe_layout_read_off_the_tiny_checkpoint(tiny_bundle):
    from tagmoe_core.tiny import TINY_MOE, TRANSFORMER_CONFIG

    reader = CheckpointReader.open(resolve_weight_files(tiny_bundle.tagmoe))
    strip_wrapper_prefix(reader)
    dims = transformer_dims(reader, {"axes_dims_rope": TRANSFORMER_CONFIG["axes_dims_rope"]})
    assert dims == {**TRANSFORMER_CONFIG, "axes_dims_rope": tuple(TRANSFORMER_CONFIG["axes_dims_rope"])}
    spec, blocks = infer_moe_layout(reader, dims["num_layers"])
    assert blocks == [2, 3] and spec.num_experts == TINY_MOE.num_experts and spec.ffn_hidden_size == 4 * 32
    with pytest.raises(Exception, match="rotary"):
        transformer_dims(reader)  # 16-dim heads and no config: the split cannot be guessed
