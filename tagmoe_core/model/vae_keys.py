"""Convert a diffusers ``AutoencoderKLQwenImage`` state dict to ComfyUI's Wan 2.1 VAE layout.

The core loads the Qwen-Image VAE in diffusers format; ComfyUI's loader (``comfy/sd.py``) only
recognises the Wan 2.1 / Qwen-Image VAE in the original Wan key layout (it looks for
``decoder.middle.0.residual.0.gamma`` and builds ``comfy.ldm.wan.vae.WanVAE`` with dim=96, or
the file's ``decoder.head.0.gamma`` width in newer ComfyUI, z_dim=16, dim_mult=[1, 2, 4, 4],
num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True]: ``vae_widen`` makes
a smaller VAE that shape). This module renames the diffusers keys into that layout, for the
trained tiny VAE's ComfyUI file and for the ComfyUI tests that run ``VAELoader`` / ``VAEDecode``
on the same weights; the tensors are passed through unchanged (every tensor has the same shape
in both layouts, so no reshape is needed).

Renames (diffusers -> ComfyUI/Wan):

* ``encoder.conv_in`` -> ``encoder.conv1``; ``decoder.conv_in`` -> ``decoder.conv1``
* ``{encoder,decoder}.norm_out`` -> ``.head.0``; ``.conv_out`` -> ``.head.2``
* ``quant_conv`` -> ``conv1``; ``post_quant_conv`` -> ``conv2``
* ``encoder.down_blocks.N`` -> ``encoder.downsamples.N`` (both are flat lists already)
* ``{encoder,decoder}.mid_block.resnets.0`` -> ``.middle.0``, ``.mid_block.attentions.0`` ->
  ``.middle.1``, ``.mid_block.resnets.1`` -> ``.middle.2``
* ``decoder.up_blocks.I.resnets.J`` / ``decoder.up_blocks.I.upsamplers.0`` -> one flat
  ``decoder.upsamples.K`` list, in order (each up block's resnets, then its upsampler)
* inside a residual block: ``norm1`` -> ``residual.0``, ``conv1`` -> ``residual.2``,
  ``norm2`` -> ``residual.3``, ``conv2`` -> ``residual.6``, ``conv_shortcut`` -> ``shortcut``
* attention (``norm``, ``to_qkv``, ``proj``) and resample (``resample.1``, ``time_conv``)
  parameter names are the same on both sides.

Conventions: both ``WanVAE.decode`` (ComfyUI) and ``AutoencoderKLQwenImage.decode``
(diffusers) take raw, un-normalised latents (the latents_mean/latents_std scaling lives in
the pipeline / ComfyUI's latent format, not in the VAE); ``WanVAE.encode`` returns the
posterior mean, like ``vae.encode(x).latent_dist.mean``. diffusers clamps the decoded image
to [-1, 1]; ``WanVAE.decode`` does not, but ``comfy.sd.VAE.decode`` clamps after mapping to
[0, 1].
"""

from __future__ import annotations

import re

import torch

_RESNET_PARAMS = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}
_RESNET_SUFFIX = r"((?:norm1|norm2)\.gamma|(?:conv1|conv2|conv_shortcut)\.(?:weight|bias))"
_ATTN_SUFFIX = r"(norm\.gamma|(?:to_qkv|proj)\.(?:weight|bias))"
_RESAMPLE_SUFFIX = r"((?:resample\.1|time_conv)\.(?:weight|bias))"

_TOP_LEVEL = {
    "quant_conv.weight": "conv1.weight",
    "quant_conv.bias": "conv1.bias",
    "post_quant_conv.weight": "conv2.weight",
    "post_quant_conv.bias": "conv2.bias",
}
for _side in ("encoder", "decoder"):
    for _p in ("weight", "bias"):
        _TOP_LEVEL[f"{_side}.conv_in.{_p}"] = f"{_side}.conv1.{_p}"
        _TOP_LEVEL[f"{_side}.conv_out.{_p}"] = f"{_side}.head.2.{_p}"
    _TOP_LEVEL[f"{_side}.norm_out.gamma"] = f"{_side}.head.0.gamma"
del _side, _p

_RE_DOWN_RESNET = re.compile(rf"encoder\.down_blocks\.(\d+)\.{_RESNET_SUFFIX}")
_RE_DOWN_RESAMPLE = re.compile(rf"encoder\.down_blocks\.(\d+)\.{_RESAMPLE_SUFFIX}")
_RE_MID_RESNET = re.compile(rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.{_RESNET_SUFFIX}")
_RE_MID_ATTN = re.compile(rf"(encoder|decoder)\.mid_block\.attentions\.0\.{_ATTN_SUFFIX}")
_RE_UP_RESNET = re.compile(rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.{_RESNET_SUFFIX}")
_RE_UP_SAMPLER = re.compile(rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.{_RESAMPLE_SUFFIX}")


def _resnet_param(suffix: str) -> str:
    module, param = suffix.split(".", 1)
    return f"{_RESNET_PARAMS[module]}.{param}"


def _up_block_offsets(keys) -> tuple[dict[int, int], dict[int, int]]:
    """For each diffusers up block: the index in ComfyUI's flat ``decoder.upsamples`` list at
    which it starts, and its number of resnets (its upsampler, if any, comes right after)."""
    resnets: dict[int, int] = {}
    has_upsampler: dict[int, bool] = {}
    for key in keys:
        m = _RE_UP_RESNET.fullmatch(key)
        if m:
            block, j = int(m.group(1)), int(m.group(2))
            resnets[block] = max(resnets.get(block, 0), j + 1)
            continue
        m = _RE_UP_SAMPLER.fullmatch(key)
        if m:
            has_upsampler[int(m.group(1))] = True
    blocks = sorted(set(resnets) | set(has_upsampler))
    if blocks and blocks != list(range(len(blocks))):
        raise ValueError(f"decoder.up_blocks indices are not contiguous from 0: {blocks}")
    offsets, pos = {}, 0
    for block in blocks:
        offsets[block] = pos
        pos += resnets.get(block, 0) + int(has_upsampler.get(block, False))
    return offsets, resnets


def _convert_key(key: str, offsets: dict[int, int], resnets: dict[int, int]) -> str | None:
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    m = _RE_DOWN_RESNET.fullmatch(key)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{_resnet_param(m.group(2))}"
    m = _RE_DOWN_RESAMPLE.fullmatch(key)
    if m:
        return f"encoder.downsamples.{m.group(1)}.{m.group(2)}"
    m = _RE_MID_RESNET.fullmatch(key)
    if m:
        side, j, suffix = m.group(1), int(m.group(2)), m.group(3)
        return f"{side}.middle.{0 if j == 0 else 2}.{_resnet_param(suffix)}"
    m = _RE_MID_ATTN.fullmatch(key)
    if m:
        return f"{m.group(1)}.middle.1.{m.group(2)}"
    m = _RE_UP_RESNET.fullmatch(key)
    if m:
        block, j, suffix = int(m.group(1)), int(m.group(2)), m.group(3)
        return f"decoder.upsamples.{offsets[block] + j}.{_resnet_param(suffix)}"
    m = _RE_UP_SAMPLER.fullmatch(key)
    if m:
        block = int(m.group(1))
        return f"decoder.upsamples.{offsets[block] + resnets.get(block, 0)}.{m.group(2)}"
    return None


def diffusers_qwen_vae_to_comfy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``state_dict`` (diffusers ``AutoencoderKLQwenImage``) with keys in ComfyUI's
    ``comfy.ldm.wan.vae.WanVAE`` layout. Tensors are not copied.

    Raises ValueError if any key is not a known diffusers Qwen-Image/Wan 2.1 VAE key (for
    example a state dict that is already in ComfyUI layout, has a prefix such as ``vae.``, or
    belongs to the Wan 2.2 VAE), or if two keys would map to the same name.
    """
    offsets, resnets = _up_block_offsets(state_dict)
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        new_key = _convert_key(key, offsets, resnets)
        if new_key is None:
            unknown.append(key)
            continue
        if new_key in converted:
            raise ValueError(f"two diffusers keys map to ComfyUI key {new_key!r} (second: {key!r})")
        converted[new_key] = tensor
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:10])
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise ValueError(
            f"{len(unknown)} key(s) are not diffusers AutoencoderKLQwenImage keys: {shown}{more}"
        )
    return converted
