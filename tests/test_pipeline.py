"""Full edit and text-to-image runs on the tiny model: shapes, seeds, batches, regions,
callbacks and cancelling, image-aware prompts, image-to-image, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tagmoe_core.errors import Cancelled, InputError
from tagmoe_core.pipeline.regions import region_from_pixel_box

PROMPT = "Change the cloak to red color"


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_edit_shape_and_determinism(tiny_pipe, photo):
    a = tiny_pipe.edit(photo, PROMPT, width=64, height=48, steps=3, seed=5)
    b = tiny_pipe.edit(photo, PROMPT, width=64, height=48, steps=3, seed=5)
    c = tiny_pipe.edit(photo, PROMPT, width=64, height=48, steps=3, seed=6)
    assert a.seed == 5 and len(a.images) == 1
    assert a.images[0].size == (64, 48) and a.images[0].mode == "RGB"
    assert a.latents.shape == (1, 16, 1, 6, 8) and a.latents.dtype == torch.float32
    assert np.array_equal(arr(a.images[0]), arr(b.images[0]))
    assert np.abs(arr(a.images[0]) - arr(c.images[0])).mean() > 1.0


def test_random_seed_is_returned_and_reproduces(tiny_pipe, photo):
    first = tiny_pipe.edit(photo, PROMPT, width=32, height=32, steps=2, seed=-1)
    assert 0 <= first.seed < 2**32
    again = tiny_pipe.edit(photo, PROMPT, width=32, height=32, steps=2, seed=first.seed)
    assert torch.equal(first.latents, again.latents)


def test_the_prompt_and_the_image_matter(tiny_pipe, photo):
    base = tiny_pipe.edit(photo, PROMPT, width=32, height=32, steps=2, seed=1).latents
    other_prompt = tiny_pipe.edit(photo, "Make the person wear sunglasses", width=32, height=32, steps=2,
                                  seed=1).latents
    other_image = tiny_pipe.edit(photo.transpose(Image.FLIP_LEFT_RIGHT), PROMPT, width=32, height=32, steps=2,
                                 seed=1).latents
    assert not torch.allclose(base, other_prompt) and not torch.allclose(base, other_image)


def test_several_images_per_prompt(tiny_pipe, photo):
    out = tiny_pipe.edit(photo, PROMPT, width=32, height=48, steps=2, seed=3, num_images=3)
    assert len(out.images) == 3 and out.latents.shape == (3, 16, 1, 6, 4)
    assert not torch.allclose(out.latents[0], out.latents[1])
    single = tiny_pipe.edit(photo, PROMPT, width=32, height=48, steps=2, seed=3)
    assert not torch.equal(single.latents[0], out.latents[1])


def test_default_size_is_the_condition_bucket(tiny_pipe, photo):
    assert tiny_pipe.target_size(photo, None, None) == (1344, 704)  # 72x40 is nearest the 1344x704 bucket
    assert tiny_pipe.target_size(photo, 64, None) == (64, 704)
    assert tiny_pipe.target_size(None, None, None) == (1024, 1024)


def test_keep_original_size_only_without_a_custom_size(tiny_pipe, photo):
    out = tiny_pipe.edit(photo, PROMPT, width=32, height=32, steps=1, seed=0, keep_original_size=True)
    assert out.images[0].size == (32, 32)  # as the reference: a custom size wins


@pytest.mark.slow
def test_edit_at_the_bucket_size_and_keep_original_size(tiny_pipe, photo):
    out = tiny_pipe.edit(photo, PROMPT, steps=1, cfg=1.0, seed=0, keep_original_size=True)
    assert out.images[0].size == photo.size
    assert out.latents.shape[-2:] == (704 // 8, 1344 // 8)


def test_text_to_image(tiny_pipe):
    out = tiny_pipe.generate("a cat holding a sign", width=48, height=32, steps=3, seed=2, num_images=2)
    assert [im.size for im in out.images] == [(48, 32), (48, 32)]
    again = tiny_pipe.generate("a cat holding a sign", width=48, height=32, steps=3, seed=2, num_images=2)
    assert torch.equal(out.latents, again.latents)


def test_cfg_at_most_one_skips_the_negative_pass(tiny_pipe):
    calls = []
    handle = tiny_pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        tiny_pipe.generate("a cat", width=32, height=32, steps=2, cfg=1.0, seed=0)
        assert len(calls) == 2
        tiny_pipe.generate("a cat", width=32, height=32, steps=2, cfg=2.0, seed=0)
        assert len(calls) == 2 + 4
    finally:
        handle.remove()


def test_region_edit_keeps_only_the_box_of_condition_tokens(tiny_pipe, photo):
    shapes = []
    handle = tiny_pipe.transformer.register_forward_hook(
        lambda m, a, kw, o: shapes.append(kw["hidden_states"].shape[1]), with_kwargs=True)
    try:
        full = tiny_pipe.edit(photo, PROMPT, width=64, height=64, steps=2, seed=4)
        region = tiny_pipe.edit(photo, PROMPT, width=64, height=64, steps=2, seed=4, region=(1, 0, 2, 1))
    finally:
        handle.remove()
    assert shapes[0] == 16 + 16 and shapes[-1] == 16 + 4  # 4x4 target tokens + a 2x2 region
    assert not torch.allclose(full.latents, region.latents)


def test_region_from_a_pixel_box():
    # a 200x100 image encoded at 64x32 pixels: a 4x2 patch grid
    assert region_from_pixel_box((0, 0, 200, 100), (200, 100), (64, 32)) == (0, 0, 3, 1)
    assert region_from_pixel_box((60, 10, 110, 40), (200, 100), (64, 32)) == (1, 0, 2, 0)
    with pytest.raises(InputError, match="inside"):
        region_from_pixel_box((150, 0, 250, 50), (200, 100), (64, 32))


def test_callback_sees_every_step_with_previews(tiny_pipe, photo):
    infos = []
    tiny_pipe.edit(photo, PROMPT, width=32, height=48, steps=4, seed=0, callback=infos.append)
    assert [i.step for i in infos] == [0, 1, 2, 3] and all(i.total == 4 for i in infos)
    assert infos[0].sigma == pytest.approx(1.0) and infos[-1].sigma < infos[0].sigma
    assert infos[0].latents.shape == infos[0].denoised.shape == (1, 6, 64)
    preview = infos[-1].denoised_vae_latents()
    assert preview.shape == (1, 16, 1, 6, 4) and torch.isfinite(preview).all()


def test_cancel_stops_the_run_and_leaves_the_model_usable(tiny_pipe, photo):
    reference = tiny_pipe.edit(photo, PROMPT, width=32, height=32, steps=3, seed=8)
    seen = []

    def cancel_at_second_step(info):
        seen.append(info.step)
        if info.step == 1:
            raise Cancelled("stopped by the user")

    with pytest.raises(Cancelled):
        tiny_pipe.edit(photo, PROMPT, width=32, height=32, steps=3, seed=8, callback=cancel_at_second_step)
    assert seen == [0, 1]
    after = tiny_pipe.edit(photo, PROMPT, width=32, height=32, steps=3, seed=8)
    assert torch.equal(after.latents, reference.latents)


def test_image_aware_prompt_variant(tiny_pipe, photo):
    text_only = tiny_pipe.encode_prompt(PROMPT)
    with_image = tiny_pipe.encode_prompt(PROMPT, image=photo)
    assert with_image.embeds.shape[-1] == text_only.embeds.shape[-1]
    assert with_image.embeds.shape[1] > text_only.embeds.shape[1]  # the image's tokens are in the sequence
    out = tiny_pipe.edit(photo, PROMPT, width=32, height=32, steps=2, seed=0, use_vlm=True)
    assert out.images[0].size == (32, 32)


def test_image_to_image_from_latents(tiny_pipe):
    cond = tiny_pipe.encode("a cat")
    start = tiny_pipe.sample(cond, None, width=32, height=32, steps=2, seed=1).latents
    calls = []
    handle = tiny_pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        half = tiny_pipe.sample(cond, None, steps=6, cfg=1.0, seed=2, init_latents=start, denoise_strength=0.5)
    finally:
        handle.remove()
    assert len(calls) == 3 and half.latents.shape == start.shape and (half.width, half.height) == (32, 32)
    full = tiny_pipe.sample(cond, None, steps=6, cfg=1.0, seed=2, init_latents=start, denoise_strength=1.0)
    plain = tiny_pipe.sample(cond, None, width=32, height=32, steps=6, cfg=1.0, seed=2)
    assert torch.equal(full.latents, plain.latents)  # full strength starts from pure noise


@pytest.mark.parametrize("kwargs, message", [
    ({"width": 50, "height": 32}, "multiple of 16"),
    ({"width": 0, "height": 32}, "multiple of 16"),
    ({"width": 32, "height": -16}, "multiple of 16"),
    ({"width": 32.5, "height": 32}, "whole number"),
    ({"steps": 0}, "steps"),
    ({"num_images": 0}, "num_images"),
    ({"seed": 2**64}, "seed"),
    ({"cfg": -1.0}, "cfg"),
    ({"region": (0, 0, 9, 9)}, "region box"),
])
def test_bad_input_is_a_clear_error(tiny_pipe, photo, kwargs, message):
    args = {"width": 32, "height": 32, "steps": 1} | kwargs
    with pytest.raises(InputError, match=message):
        tiny_pipe.edit(photo, PROMPT, **args)


def test_bad_images_and_prompts(tiny_pipe, photo):
    with pytest.raises(InputError, match="input image"):
        tiny_pipe.edit(None, PROMPT)
    with pytest.raises(InputError, match="PIL"):
        tiny_pipe.sample(tiny_pipe.encode(PROMPT), np.zeros((8, 8, 3)), width=32, height=32, steps=1)
    with pytest.raises(InputError, match="prompt must be text"):
        tiny_pipe.encode_prompt(None)
    with pytest.raises(InputError, match="region edit needs"):
        tiny_pipe.sample(tiny_pipe.encode(PROMPT), None, width=32, height=32, steps=1, region=(0, 0, 1, 1))


def test_tiled_decode_matches_the_whole_decode(tiny_pipe):
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 1, 48, 40)  # 320x384: several 256 px tiles
    whole, tiled = tiny_pipe.decode(latents), tiny_pipe.decode(latents, tiled=True)
    assert tiled.shape == whole.shape == (1, 384, 320, 3)
    assert not torch.equal(tiled, whole)  # really tiled (blended seams)...
    assert (tiled - whole).abs().mean() < 0.02  # ...and the same picture


def test_decode_falls_back_to_tiles_when_the_gpu_runs_out_of_memory(tiny_pipe, monkeypatch, caplog):
    """A whole decode that runs out of GPU memory is done again in tiles instead of losing the
    sampled latents. (No GPU here: the VAE's whole-image decode raises CUDA's error; the tiled
    decode that follows is the real one.)"""
    from tagmoe_core.errors import DeviceError

    torch.manual_seed(0)
    latents = torch.randn(1, 16, 1, 40, 40)
    expected = tiny_pipe.decode(latents, tiled=True)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.50 GiB")

    monkeypatch.setattr(tiny_pipe.vae, "decode", out_of_memory)
    with caplog.at_level("WARNING"):
        assert torch.equal(tiny_pipe.decode(latents), expected)
    assert "decoding it in tiles instead" in caplog.text
    with pytest.raises(DeviceError, match="out of GPU memory decoding 320x320: free memory.*decode in tiles"):
        tiny_pipe.decode(latents, tiled=False)


def test_a_failed_decode_leaves_no_feature_cache_behind(tiny_pipe, monkeypatch):
    """The VAE's causal convolutions cache feature maps while decoding; a decode that ran out of
    memory partway left them held (the review found 21 maps; GBs on the real VAE)."""
    from tagmoe_core.errors import DeviceError

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tiny_pipe.vae.decoder.conv_out, "forward", out_of_memory)
    with pytest.raises(DeviceError):
        tiny_pipe.decode(torch.randn(1, 16, 1, 8, 8), tiled=False)
    assert not any(f is not None for f in tiny_pipe.vae._feat_map)


NOT_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize("name, kwargs, message", [
    ("cfg", {}, "cfg must be a finite number"),
    ("denoise_strength", {}, "denoise must be in"),
    ("tag_guidance", {"tags": "style"}, "tag_guidance must be a finite number"),
    ("region", {}, "region box .* whole numbers"),
])
def test_numbers_that_are_not_finite_are_refused_before_any_work(tiny_pipe, photo, name, kwargs, message, value):
    """NaN cfg silently disabled CFG, an infinite one wrote a black PNG; NaN tag guidance made NaN
    routing. Refused before the condition image is encoded or the transformer runs."""
    from tagmoe_core.taxonomy import TaskTags

    cond = tiny_pipe.encode(PROMPT)
    args = {name: value if name != "region" else (0, 0, value, 1)}
    if kwargs.get("tags"):
        args["tags"] = TaskTags("local editing", ("style transfer",))
    calls = []
    hooks = [tiny_pipe.transformer.register_forward_hook(lambda *a: calls.append("transformer")),
             tiny_pipe.vae.encoder.register_forward_hook(lambda *a: calls.append("vae"))]
    try:
        with pytest.raises(InputError, match=message):
            tiny_pipe.sample(cond, photo, width=32, height=32, steps=2, seed=0, **args)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []


def test_region_boxes_out_of_the_grid_are_refused_before_any_work(tiny_pipe, photo):
    calls = []
    hook = tiny_pipe.vae.encoder.register_forward_hook(lambda *a: calls.append("vae"))
    try:
        with pytest.raises(InputError, match="region box"):
            tiny_pipe.sample(tiny_pipe.encode(PROMPT), photo, width=32, height=32, steps=1, region=(0, 0, 9, 9))
    finally:
        hook.remove()
    assert calls == []
