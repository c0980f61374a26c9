"""A tiny bundle made of trained parts: the random tiny bundle's text encoder, tokenizer, scheduler
and dense base transformer, with a trained VAE and trained TAG-MoE transformer weights.

``assemble_bundle(source, output, vae=..., transformer=...)`` writes ``output`` in the layout of
:mod:`tagmoe_core.tiny` (``Qwen-Image-tiny/`` and ``TAG-MoE-tiny/transformer/``), so
``load_pipeline(bundle.base, bundle.tagmoe)`` and every loader here read it. ``latent_stats``
gives a trained VAE's measured per-channel latent mean and std; ``fold_latent_stats`` rescales
the VAE so its latents carry the config's ``latents_mean``/``latents_std`` (Qwen-Image's, what
``pipeline.latents.normalize`` and ComfyUI's latent format divide by) instead; ``collapse_posterior``
makes its encoder deterministic (a posterior sample is its mean), as a full-size VAE nearly is;
``flatten_unused_channels`` makes the latent channels its decoder ignores constant.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from ..tiny import TinyBundle

BASE_PARTS = ("text_encoder", "tokenizer", "scheduler", "transformer", "vae")


def _copy(source: Path, target: Path) -> None:
    if not source.is_dir():
        raise FileNotFoundError(f"'{source}' is not a folder")
    shutil.copytree(source, target)


def assemble_bundle(source: str | os.PathLike | TinyBundle, output: str | os.PathLike, *,
                    vae: str | os.PathLike | None = None, transformer: str | os.PathLike | None = None,
                    note: dict | None = None) -> TinyBundle:
    """Write a bundle at ``output`` (replacing it): ``source``'s parts, with ``vae`` (a diffusers
    ``AutoencoderKLQwenImage`` folder) and ``transformer`` (a TAG-MoE transformer folder: config.json
    and the weights, e.g. a training checkpoint's ``transformer/``) in place of its own when given."""
    src = source if isinstance(source, TinyBundle) else TinyBundle(Path(source))
    out = TinyBundle(Path(output))
    if out.root.exists():
        shutil.rmtree(out.root)
    out.base.mkdir(parents=True)
    for part in BASE_PARTS:
        _copy(Path(vae) if part == "vae" and vae is not None else src.base / part, out.base / part)
    shutil.copy2(src.base / "model_index.json", out.base / "model_index.json")
    out.tagmoe.mkdir(parents=True)
    _copy(Path(transformer) if transformer is not None else src.tagmoe / "transformer", out.tagmoe / "transformer")
    (out.root / "COMPLETE").write_text(json.dumps({"trained": True, **(note or {})}))
    return out


def latent_stats(latents: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of VAE latents [B, C, ...] (channel 1), as plain lists."""
    flat = latents.detach().float().transpose(0, 1).reshape(latents.shape[1], -1)
    return flat.mean(1).tolist(), flat.std(1).clamp_min(1e-6).tolist()


def fold_latent_stats(vae, mean: list[float], std: list[float]) -> None:
    """Make ``vae``'s raw latents carry its config's ``latents_mean``/``latents_std`` (Qwen-Image's
    own, by default) instead of ``mean``/``std`` (what this VAE's encoder was measured to give).

    ``quant_conv`` (the encoder's last 1x1 convolution: posterior mean and log-variance) is rescaled
    so a latent ``z`` becomes ``(z - mean) / std * target_std + target_mean``, and ``post_quant_conv``
    (the decoder's first) takes the inverse, so the decoded pictures are unchanged within float
    rounding. Normalised latents are then the same as before, and a reader that knows only
    Qwen-Image's fixed statistics (ComfyUI's Wan 2.1 latent format) works in the same space as the
    diffusers pipeline that reads the config.
    """
    z = len(mean)
    target_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float64)
    target_std = torch.tensor(vae.config.latents_std, dtype=torch.float64)
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    if target_mean.numel() != z or m.numel() != z:
        raise ValueError(f"latent statistics for {z} channels do not fit this VAE's {target_mean.numel()}")
    gain = target_std / s  # per channel
    with torch.no_grad():
        enc = vae.quant_conv
        w, b = enc.weight.double(), enc.bias.double()
        w[:z] *= gain.view(-1, *([1] * (w.dim() - 1)))
        b[:z] = (b[:z] - m) * gain + target_mean
        b[z:] += 2 * torch.log(gain)  # log-variance: the variance scales by gain squared
        enc.weight.copy_(w)
        enc.bias.copy_(b)
        dec = vae.post_quant_conv
        w, b = dec.weight.double(), dec.bias.double()
        inverse = 1 / gain  # z = (z' - target_mean) / gain + m
        b = b + (w.flatten(1) @ (m - target_mean * inverse))
        w = w * inverse.view(1, -1, *([1] * (w.dim() - 2)))
        dec.weight.copy_(w)
        dec.bias.copy_(b)


# diffusers' DiagonalGaussianDistribution clamps the log-variance to [-30, 20]: at -30 the std is e^-15.
MIN_LOGVAR = -30.0


def _quant_conv(vae):
    """``vae.quant_conv``, checked to output a mean and a log-variance per latent channel (diffusers'
    ``DiagonalGaussianDistribution`` splits it in two halves along the channels)."""
    z, conv = vae.config.z_dim, vae.quant_conv
    if conv.weight.shape[0] != 2 * z:
        raise ValueError(f"quant_conv has {conv.weight.shape[0]} outputs, not mean and log-variance of {z}")
    return conv


def is_collapsed(vae) -> bool:
    """Whether ``collapse_posterior`` has been applied (every log-variance output pinned)."""
    z, conv = vae.config.z_dim, _quant_conv(vae)
    return not bool(conv.weight[z:].any()) and bool((conv.bias[z:] == MIN_LOGVAR).all())


def collapse_posterior(vae) -> None:
    """Make ``vae``'s posterior a point: ``quant_conv``'s log-variance half outputs ``MIN_LOGVAR`` for
    every input, so ``latent_dist.sample()`` is ``latent_dist.mode()`` (within ~3e-7 of a unit latent).

    A small VAE trained with a weak KL term leaves channels it does not use at the prior (std ~1 there):
    the reference pipeline samples the condition image's posterior, so every edit then saw its input
    through fresh noise (two draws of one tiny-VAE condition were 78% apart, relative L2) and a
    transformer trained on one draw per sample could not read it at inference. Qwen-Image's own VAE
    has a near-point posterior; this gives the tiny one the same. The decoder is untouched (it was
    trained on samples, and decodes the mean, as ComfyUI's VAE Encode gives it, as well).
    """
    z, conv = vae.config.z_dim, _quant_conv(vae)
    with torch.no_grad():
        conv.weight[z:].zero_()
        conv.bias[z:].fill_(MIN_LOGVAR)


def _psnr_signed(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB between pictures in -1..1 (peak-to-peak 2); ``task_success.psnr`` is the 0..255 one."""
    return 10 * math.log10(4.0 / max(float(((a - b) ** 2).mean()), 1e-20))


def flatten_unused_channels(vae, pictures: torch.Tensor, min_db: float = 45.0) -> list[int]:
    """Make every latent channel that ``vae``'s decoder ignores a constant; returns those channels.

    The constant is the config's ``latents_mean`` of the channel (where ``fold_latent_stats`` centred
    it: call this after the fold), so the normalised latents a transformer learns to predict are 0 in
    those channels instead of the unit-variance values the fold had stretched out of what the encoder
    left in them (a tiny VAE left 3 of 16 so). A channel is unused when setting it to that constant for
    ``pictures`` ([B, 3, 1, H, W] in -1..1) leaves the decoded pictures within ``min_db`` dB PSNR of what
    the decoder gives from the unchanged latents (each channel alone, then all of them together within
    3 dB less; while they are not, the one that moves the pictures most goes back). ``quant_conv`` then
    outputs the constant for every input there, with a point posterior; the decoder is untouched.
    """
    z, conv = vae.config.z_dim, _quant_conv(vae)
    constants = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
    with torch.no_grad():
        mode = vae.encode(pictures).latent_dist.mode()
        decoded = vae.decode(mode).sample

        def kept(channels: list[int]) -> float:
            latent = mode.clone()
            for c in channels:
                latent[:, c] = constants[c]
            return _psnr_signed(vae.decode(latent).sample, decoded)

        alone = {c: kept([c]) for c in range(z)}
        unused = [c for c in range(z) if alone[c] >= min_db]
        while unused and kept(unused) < min_db - 3:
            unused.remove(min(unused, key=alone.__getitem__))
        for c in unused:
            conv.weight[c].zero_()
            conv.bias[c] = constants[c]
            conv.weight[z + c].zero_()
            conv.bias[z + c] = MIN_LOGVAR
    return unused


def pack_bundle(bundle: str | os.PathLike | TinyBundle, target: str | os.PathLike, *, demo_picture,
                card: str, dtype: torch.dtype = torch.float16) -> TinyBundle:
    """Write a trained bundle as the package ships it (``tiny.trained_tiny_bundle``) at ``target``
    (replacing it): every file of ``bundle`` but the base's dense transformer weights (the TAG-MoE
    checkpoint is complete, so no loader opens them), floating-point weights stored as ``dtype``
    (half the bytes; the loaders cast back to their compute dtype), ``demo_picture`` (a PIL image) as
    ``demo.png`` and ``card`` as ``README.md``."""
    from safetensors.torch import load_file, save_file

    src = bundle if isinstance(bundle, TinyBundle) else TinyBundle(Path(bundle))
    out = Path(target)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    skip = src.base / "transformer"
    shutil.copytree(src.root, staging, ignore=lambda folder, names: [
        n for n in names if n == "COMPLETE" or (Path(folder) == skip and n.endswith((".safetensors", ".json"))
                                                and n != "config.json")])
    for path in sorted(staging.rglob("*.safetensors")):
        state = load_file(path)
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, path,
                  metadata={"format": "pt"})
    demo_picture.convert("RGB").save(staging / "demo.png")
    (staging / "README.md").write_text(card)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return TinyBundle(out)
