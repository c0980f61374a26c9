"""model.vae_widen and model.vae_keys: a small Qwen-Image VAE rewritten as the shape ComfyUI builds,
computing the same, in the key layout ComfyUI's VAELoader reads."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLQwenImage

from tagmoe_core.model.vae_keys import diffusers_qwen_vae_to_comfy
from tagmoe_core.model.vae_widen import widen


def _small(dim_mult=(1, 2, 4, 4), base_dim=8) -> AutoencoderKLQwenImage:
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=base_dim, z_dim=16, dim_mult=list(dim_mult), num_res_blocks=1,
                                 temperal_downsample=[False, True, True]).eval()
    with torch.no_grad():  # away from the init, so zero-initialised parts matter too
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


@pytest.mark.parametrize("base_dim", [None, 12])
def test_widened_vae_encodes_and_decodes_as_the_small_one(base_dim):
    small = _small()
    wide = widen(small, base_dim)
    assert list(wide.config.dim_mult) == [1, 2, 4, 4] and wide.config.num_res_blocks == 2
    assert wide.config.base_dim == (base_dim or 8)
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = small.encode(x).latent_dist, wide.encode(x).latent_dist
        torch.testing.assert_close(b.mean, a.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.logvar, a.logvar, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(wide.decode(a.mean).sample, small.decode(a.mean).sample, atol=1e-5, rtol=1e-5)


def test_a_vae_whose_shortcuts_differ_is_refused():
    with pytest.raises(ValueError, match="cannot widen"):
        widen(_small(dim_mult=(1, 2, 2, 2)))
    with pytest.raises(ValueError, match="cannot widen"):
        widen(_small(), base_dim=4)


def test_widened_keys_are_comfyuis_qwen_image_vae_keys_and_shapes():
    """Widened to 96, in ComfyUI's key layout: exactly the keys and shapes of the Qwen-Image VAE file
    (the default diffusers config converted), which ComfyUI 0.3.x builds at dim 96."""
    small = _small(base_dim=4)
    with torch.device("meta"):
        full = AutoencoderKLQwenImage()
    expected = {k: tuple(v.shape) for k, v in diffusers_qwen_vae_to_comfy(full.state_dict()).items()}
    got = {k: tuple(v.shape) for k, v in diffusers_qwen_vae_to_comfy(widen(small, 96).state_dict()).items()}
    assert got == expected
    assert "decoder.middle.0.residual.0.gamma" in got and got["decoder.head.0.gamma"][0] == 96
    # newer ComfyUI reads the width from decoder.head.0.gamma: the small width itself
    assert diffusers_qwen_vae_to_comfy(widen(small).state_dict())["decoder.head.0.gamma"].shape[0] == 4
    # what a ComfyUI VAE file holds: the same, in the file's dtype
    from tagmoe_core.model.vae_widen import comfy_state_dict

    state = comfy_state_dict(small, 96, torch.float16)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert {v.dtype for v in state.values()} == {torch.float16}


def test_converting_keys_refuses_what_is_not_a_diffusers_vae():
    with pytest.raises(ValueError, match="not diffusers AutoencoderKLQwenImage keys"):
        diffusers_qwen_vae_to_comfy({"vae.encoder.conv_in.weight": torch.zeros(1)})
