"""A small Qwen-Image VAE rewritten, exactly, as one of the shape ComfyUI builds.

ComfyUI's ``VAELoader`` builds the Qwen-Image (Wan 2.1) VAE with ``dim_mult=[1, 2, 4, 4]`` and
``num_res_blocks=2`` always, and ``dim=96`` (0.3.x) or the file's own ``decoder.head.0.gamma``
width (newer ComfyUI). ``widen(vae, base_dim)`` returns a diffusers ``AutoencoderKLQwenImage`` of
that shape which computes what ``vae`` computes, within float rounding, so a VAE trained small
(fewer channels or residual blocks: the tiny model's) loads there too:

* channels are zero-padded: a padded channel is zero after every convolution (zero weights and
  bias), stays zero through SiLU, nearest upsampling and the RMS norms; each norm's ``gamma`` is
  scaled by sqrt(c / C), since the norm multiplies by sqrt(channels); the mid-block attention's
  query by sqrt(C / c), since it divides by sqrt(channels);
* a residual block the small VAE lacks has a zero last convolution: it passes its input on;
* a shortcut the wider VAE has where the small one adds its input unchanged is the identity.

A small VAE whose residual block changes its width where the wider one's does not (dim_mult
[1, 2, 2, 2] against [1, 2, 4, 4] in the decoder) cannot be rewritten so; ``widen`` refuses it.
"""

from __future__ import annotations

import math

import torch

COMFY_DIM_MULT = (1, 2, 4, 4)
COMFY_RES_BLOCKS = 2


def _stages(blocks) -> list[tuple[list[int], int | None]]:
    """The encoder's flat ``down_blocks`` grouped into stages: (resnet indices, resample index)."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageResample, QwenImageResidualBlock

    stages, current = [], []
    for i, block in enumerate(blocks):
        if isinstance(block, QwenImageResidualBlock):
            current.append(i)
        elif isinstance(block, QwenImageResample):
            stages.append((current, i))
            current = []
        else:
            raise ValueError(f"encoder block {i} ({type(block).__name__}): only VAEs without attn_scales widen")
    stages.append((current, None))
    return stages


def _module_map(small, wide) -> dict[str, str]:
    """The wide VAE's module prefix for each of the small one's (encoder blocks shift: a stage
    with more residual blocks pushes the later ones along)."""
    mapping = {}
    small_stages, wide_stages = _stages(small.encoder.down_blocks), _stages(wide.encoder.down_blocks)
    for (res_s, down_s), (res_w, down_w) in zip(small_stages, wide_stages):
        for j, i in enumerate(res_s):
            mapping[f"encoder.down_blocks.{i}."] = f"encoder.down_blocks.{res_w[j]}."
        if down_s is not None:
            mapping[f"encoder.down_blocks.{down_s}."] = f"encoder.down_blocks.{down_w}."
    return mapping


def _rename(key: str, mapping: dict[str, str]) -> str:
    for prefix, target in mapping.items():
        if key.startswith(prefix):
            return target + key[len(prefix):]
    return key


def _embed(small: torch.Tensor, shape: torch.Size, chunks: int = 1, first_gain: float = 1.0) -> torch.Tensor:
    """``small`` in the leading corner of zeros of ``shape``; with ``chunks``, dimension 0 is that
    many equal blocks (qkv, a time conv's two frames), each placed at its block's start."""
    out = torch.zeros(shape, dtype=torch.float64)
    c, big = small.shape[0] // chunks, shape[0] // chunks
    for k in range(chunks):
        part = small[k * c:(k + 1) * c].double() * (first_gain if k == 0 else 1.0)
        out[(slice(k * big, k * big + c),) + tuple(slice(0, n) for n in part.shape[1:])] = part
    return out


def widen(vae, base_dim: int | None = None, dim_mult=COMFY_DIM_MULT, num_res_blocks: int = COMFY_RES_BLOCKS):
    """A diffusers ``AutoencoderKLQwenImage`` of ``base_dim`` (default: ``vae``'s), ``dim_mult`` and
    ``num_res_blocks`` computing what ``vae`` computes (see the module docstring)."""
    from diffusers import AutoencoderKLQwenImage

    config = vae.config
    base_dim = base_dim or config.base_dim
    small_dims = [config.base_dim * m for m in config.dim_mult]
    wide_dims = [base_dim * m for m in dim_mult]
    if (len(small_dims) != len(wide_dims) or any(s > w for s, w in zip(small_dims, wide_dims))
            or config.num_res_blocks > num_res_blocks or list(config.attn_scales)):
        raise ValueError(f"a VAE of base_dim {config.base_dim}, dim_mult {list(config.dim_mult)}, "
                         f"{config.num_res_blocks} residual blocks cannot widen to base_dim {base_dim}, "
                         f"dim_mult {list(dim_mult)}, {num_res_blocks}")
    with torch.device("meta"):  # every tensor is written below: no random init (127 M values at width 96)
        wide = AutoencoderKLQwenImage(base_dim=base_dim, z_dim=config.z_dim, dim_mult=list(dim_mult),
                                      num_res_blocks=num_res_blocks, attn_scales=[],
                                      temperal_downsample=list(config.temperal_downsample), dropout=0.0,
                                      latents_mean=list(config.latents_mean), latents_std=list(config.latents_std))
    mapping = _module_map(vae, wide)
    small_state = {_rename(k, mapping): v for k, v in vae.state_dict().items()}
    target = wide.state_dict()
    unused = set(small_state) - set(target)
    if unused:
        raise ValueError(f"cannot widen: {len(unused)} tensors have no place in the wider VAE "
                         f"(e.g. {sorted(unused)[0]}: a shortcut where the wider VAE adds its input unchanged)")
    state = {}
    for key, like in target.items():
        small = small_state.get(key)
        if small is None:
            block_kept = key.replace("conv_shortcut.weight", "conv1.weight") in small_state
            if key.endswith("conv_shortcut.weight") and block_kept:
                # the small block adds its input unchanged
                value = torch.eye(like.shape[0], like.shape[1], dtype=torch.float64).view(like.shape)
            else:  # a block the small VAE lacks (or its shortcut's bias): zeros, so it passes its input on
                value = torch.zeros(like.shape, dtype=torch.float64)
        elif key.endswith(".gamma"):
            value = _embed(small, like.shape) * math.sqrt(small.shape[0] / like.shape[0])
        elif ".to_qkv." in key:
            value = _embed(small, like.shape, chunks=3, first_gain=math.sqrt(like.shape[0] / small.shape[0]))
        elif ".upsamplers.0.time_conv." in key:
            value = _embed(small, like.shape, chunks=2)
        else:
            value = _embed(small, like.shape)
        state[key] = value
    dtype = next(vae.parameters()).dtype
    wide.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return wide.eval()


def comfy_state_dict(vae, base_dim: int | None = None, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """``vae`` widened to the shape ComfyUI builds (at its own width, or ``base_dim``: 96 for ComfyUI
    0.3.x), in ComfyUI's key layout (Wan 2.1), as ``dtype``: what a ComfyUI VAE file holds."""
    from .vae_keys import diffusers_qwen_vae_to_comfy

    wide = widen(vae, base_dim)
    return {k: v.to(dtype).contiguous() for k, v in diffusers_qwen_vae_to_comfy(wide.state_dict()).items()}
