"""The parts of the reference pipeline that can be compared in isolation, each against an
independent re-derivation of the reference's formula (ICTMCG/TAG-MoE, infer_tagmoe.py and
pipeline_qwenimage_tagmoe.py): schedule, CFG, packing, RoPE positions, buckets, text prefix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tagmoe_core.images import to_rgb
from tagmoe_core.model.positions import RegionShape
from tagmoe_core.model.rope import TagMoERope
from tagmoe_core.pipeline.buckets import PREFERRED_BUCKETS, nearest_bucket, snap_to_bucket
from tagmoe_core.pipeline.latents import denormalize, normalize, pack, unpack
from tagmoe_core.pipeline.guidance import true_cfg
from tagmoe_core.pipeline.sampling import make_schedule
from tagmoe_core.pipeline.text_encoding import PROMPT_TEMPLATE, template_prefix_length
from tagmoe_core.tiny import SCHEDULER_CONFIG

# The reference's PREFERRED_QWENIMAGE_RESOLUTIONS, (width, height), in its order.
REFERENCE_BUCKETS = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (512, 1792), (512, 1728), (512, 1664), (512, 1600),
    (512, 1536), (576, 1472), (640, 1408), (704, 1344), (768, 1280), (832, 1216), (896, 1152), (960, 1088),
    (1024, 1024), (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 704), (1408, 640), (1472, 576),
    (1536, 512), (1600, 512), (1664, 512), (1728, 512), (1792, 512), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
]


def test_bucket_table_and_choice():
    assert list(PREFERRED_BUCKETS) == REFERENCE_BUCKETS
    for w, h in [(1920, 1080), (1080, 1920), (640, 480), (1000, 1000), (3000, 200), (200, 3000), (512, 777), (72, 40)]:
        ratio = w / h
        best = sorted(REFERENCE_BUCKETS, key=lambda b: (abs(ratio - b[0] / b[1]), b[0], b[1]))[0]
        assert nearest_bucket(w, h) == best
    assert nearest_bucket(1920, 1080) == (1280, 768)
    assert nearest_bucket(1024, 1024) == (1024, 1024)


def test_rgba_is_composited_on_white_then_lanczos_to_bucket():
    rgba = Image.new("RGBA", (300, 200), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 150, 200))  # opaque blue left half
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB" and rgb.getpixel((250, 100)) == (255, 255, 255) and rgb.getpixel((10, 10)) == (0, 0, 255)
    snapped = snap_to_bucket(rgba)
    assert snapped.size == nearest_bucket(300, 200)
    assert np.array_equal(np.asarray(snapped), np.asarray(rgb.resize(snapped.size, Image.LANCZOS)))


def test_sigma_schedule_is_linspace_with_dynamic_exponential_shift():
    steps, seq_len = 30, 4096  # a 1024x1024 target
    _, timesteps = make_schedule(SCHEDULER_CONFIG, steps, seq_len, "cpu")
    cfg = SCHEDULER_CONFIG
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    mu = seq_len * m + cfg["base_shift"] - m * cfg["base_image_seq_len"]
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))  # exponential time shift
    scale = (1 - shifted[-1]) / (1 - cfg["shift_terminal"])  # stretched to the terminal value
    stretched = 1 - (1 - shifted) / scale
    np.testing.assert_allclose(timesteps.numpy(), stretched * 1000, rtol=1e-5)
    assert timesteps[0] == pytest.approx(1000.0) and stretched[-1] == pytest.approx(cfg["shift_terminal"])


def test_denoise_keeps_the_tail_of_the_schedule():
    _, full = make_schedule(SCHEDULER_CONFIG, 10, 256, "cpu")
    _, tail = make_schedule(SCHEDULER_CONFIG, 10, 256, "cpu", denoise=0.4)
    assert torch.equal(tail, full[6:])


def test_true_cfg_rescales_each_token_to_the_conditional_norm():
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(2, 5, 64, generator=gen), torch.randn(2, 5, 64, generator=gen)
    out = true_cfg(pos, neg, 4.0)
    for b in range(2):
        for t in range(5):
            comb = neg[b, t] + 4.0 * (pos[b, t] - neg[b, t])
            want = comb / comb.norm() * pos[b, t].norm()
            torch.testing.assert_close(out[b, t], want, rtol=1e-5, atol=1e-6)


def test_packing_is_2x2_patches_channel_major():
    x = torch.randn(2, 16, 1, 6, 8)
    tokens = pack(x)
    assert tokens.shape == (2, 12, 64)
    for i in range(3):
        for j in range(4):
            for c in range(16):
                for di in range(2):
                    for dj in range(2):
                        assert tokens[1, i * 4 + j, c * 4 + di * 2 + dj] == x[1, c, 0, 2 * i + di, 2 * j + dj]
    assert torch.equal(unpack(tokens, 48, 64), x)


def test_latent_normalisation_formula():
    class Cfg:
        z_dim = 16
        latents_mean = list(np.linspace(-1, 1, 16))
        latents_std = list(np.linspace(0.5, 3, 16))

    x = torch.randn(1, 16, 1, 2, 2)
    mean = torch.tensor(Cfg.latents_mean).view(1, 16, 1, 1, 1)
    want = (x - mean) / torch.tensor(Cfg.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(normalize(x, Cfg), want.float())
    torch.testing.assert_close(denormalize(normalize(x, Cfg), Cfg), x)


def _expected_freqs(positions, axes=(16, 56, 56), theta=10000):
    """Complex RoPE factors for (frame, row, col) integer positions, per axis."""
    parts = []
    for axis, dim in enumerate(axes):
        inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).float().div(dim))
        angles = torch.tensor([p[axis] for p in positions], dtype=torch.float32)[:, None] * inv[None]
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=1)


def _centred(n):
    return list(range(-(n - n // 2), n // 2))


def test_rope_target_frame0_condition_frame1_text_after_target():
    rope = TagMoERope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    h, w = 3, 5
    img, txt = rope([[(1, h, w), (1, h, w)]], device=torch.device("cpu"), max_txt_seq_len=4)
    grid = [(r, c) for r in _centred(h) for c in _centred(w)]
    want = _expected_freqs([(0, r, c) for r, c in grid] + [(1, r, c) for r, c in grid])
    torch.testing.assert_close(img, want, rtol=0, atol=1e-5)
    start = max(h // 2, w // 2)
    torch.testing.assert_close(txt, _expected_freqs([(start + k,) * 3 for k in range(4)]), rtol=0, atol=1e-5)
    # Text positions follow the target grid only, even next to a larger condition grid.
    _, txt_big = rope([[(1, h, w), (1, 9, 11)]], device=torch.device("cpu"), max_txt_seq_len=4)
    torch.testing.assert_close(txt_big, txt)


def test_rope_region_keeps_full_grid_positions_at_frame0():
    rope = TagMoERope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    h, w, box = 4, 6, (1, 0, 3, 2)  # x1, y1, x2, y2 inclusive
    img, _ = rope([[(1, h, w), RegionShape(h, w, box)]], device=torch.device("cpu"), max_txt_seq_len=1)
    rows, cols = _centred(h), _centred(w)
    region = [(0, rows[y], cols[x]) for y in range(box[1], box[3] + 1) for x in range(box[0], box[2] + 1)]
    target = [(0, r, c) for r in rows for c in cols]
    torch.testing.assert_close(img, _expected_freqs(target + region), rtol=0, atol=1e-5)
    assert RegionShape(h, w, box).num_tokens == 9


def test_text_template_prefix_is_34_tokens_like_qwen(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    assert template_prefix_length(tokenizer) == 34  # the reference's prompt_template_encode_start_idx
    ids = tokenizer(PROMPT_TEMPLATE.format("Change the cloak to red color"))["input_ids"]
    kept = tokenizer.decode(ids[34:])
    assert kept == "Change the cloak to red color<|im_end|>\n<|im_start|>assistant\n"
    embeds = tiny_pipe.encode_prompt("Change the cloak to red color")
    assert embeds.embeds.shape[1] == len(ids) - 34 and embeds.mask.all()


def test_empty_negative_prompt_becomes_a_space(tiny_pipe):
    cond = tiny_pipe.encode("a cat", "")
    assert cond.negative_prompt == " "
    torch.testing.assert_close(cond.negative.embeds, tiny_pipe.encode_prompt(" ").embeds)


def test_transformer_inputs_as_the_reference(tiny_pipe, photo):
    """Noise drawn as (B, 1, 16, h, w) from a generator on the model's device, packed; condition
    tokens appended after the target; timestep t/1000; output cut to the target tokens."""
    calls = []

    def spy(module, args, kwargs, output):
        calls.append({k: kwargs[k] for k in ("hidden_states", "timestep", "img_shapes")} | {"out": output[0]})

    handle = tiny_pipe.transformer.register_forward_hook(spy, with_kwargs=True)
    try:
        cond = tiny_pipe.encode("Change the cloak to red color")
        tiny_pipe.sample(cond, photo, width=64, height=32, steps=3, cfg=4.0, seed=11)
    finally:
        handle.remove()
    assert len(calls) == 6  # 3 steps x (conditional + unconditional)
    noise = torch.randn((1, 1, 16, 4, 8), generator=torch.Generator().manual_seed(11))
    first = calls[0]["hidden_states"]
    assert first.shape == (1, 8 + 8, 64)  # 2x4 target tokens + 2x4 condition tokens
    torch.testing.assert_close(first[:, :8], pack(noise.view(1, 16, 4, 8)))
    assert calls[0]["img_shapes"] == [[(1, 2, 4), (1, 2, 4)]]
    _, timesteps = make_schedule(tiny_pipe.scheduler.config, 3, 8, "cpu")
    seen = torch.stack([c["timestep"][0] for c in calls[::2]])
    torch.testing.assert_close(seen, timesteps / 1000)
    assert torch.equal(calls[0]["hidden_states"][:, 8:], calls[2]["hidden_states"][:, 8:])  # condition fixed


def test_single_step_schedule_is_finite():
    # The reference's terminal stretch divides by zero for one step; one Euler step 1 -> 0 instead.
    scheduler, timesteps = make_schedule(SCHEDULER_CONFIG, 1, 4096, "cpu")
    assert timesteps.tolist() == [1000.0] and scheduler.sigmas.tolist() == [1.0, 0.0]
