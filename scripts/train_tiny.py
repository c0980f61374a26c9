"""Train the tiny TAG-MoE on the synthetic task set, on the CPU, and measure it (issue 16, section 2).

    python scripts/train_tiny.py OUT

The recipe is the defaults with --vae-minutes 0 --minutes 0 (33 minutes alone on the sixteenth
session's 2-core host, BENCHMARKS.md). The defaults' limits keep the command within about 28 minutes:
--vae-minutes stops the VAE, and --minutes fits the transformer's learning-rate schedule to the steps
that fit (timed over its first 200; the report says so), so a host less than about 1.5x faster than
that one trains fewer steps than the recipe's (there: about 3700 of 5500, 52% held-out instead of
56%); the rest (data, encoding, evaluation: about 3 minutes) scales with the machine. Every stage's
size and step count is a flag.

1. writes the synthetic train and held-out sets (``tagmoe_core.training.synthetic``) to OUT/data/;
2. trains a tiny AutoencoderKLQwenImage (base width 16, ComfyUI's stage multipliers 1,2,4,4, one
   residual block per stage: --vae-base-dim, --vae-dim-mult, --vae-res-blocks) on the train images
   with an MSE reconstruction loss + a small KL + a tie of 12 latent channels to each latent pixel's
   4x4-pixel block mean colours (--vae-linear: latents near-linear in colour, so an edit is a simple
   map, and no plateau at the mean colour; a start still there at --vae-restart-at starts again), the
   step through torch.compile unless --no-vae-compile; rescales its latent convolutions so its latents have
   Qwen-Image's latents_mean/std (``fold_latent_stats``: ComfyUI's fixed Wan 2.1 latent format then
   fits it too), collapses its posterior to the mean and makes the latent channels its decoder
   ignores constant (``collapse_posterior``, ``flatten_unused_channels``: else an edit's sampled
   condition is mostly noise), then (--vae-decoder-steps) trains the decoder alone on those very
   latents (the transformer's targets do not move), and measures its round trip (PSNR) on the
   held-out images and the success rule on the held-out targets round-tripped (the ceiling any
   transformer can reach through this VAE);
3. trains the whole tiny TAG-MoE transformer (random tiny bundle's weights as the start, the frozen
   tiny text encoder, its tokenizer taught the task set's words) with ``tagmoe_core.training``
   (L_flow + lambda_lbl L_lbl + lambda_align L_align) on the trained VAE's latents, Muon for the
   blocks' weight matrices and AdamW for the rest (--optimizer, --muon-lr), batches of 64 (--batch-size:
   on 2 cores a batch of 64 costs about twice a batch of 16, so 4x the samples a step), with a cosine
   learning-rate decay over --steps;
4. assembles OUT/bundle (trained VAE + trained transformer + the tiny text encoder, tokenizer,
   scheduler) and evaluates it on the held-out set through ``load_pipeline``: task success per
   task (``task_success.check_task``), the alignment score and per-task expert usage
   (``intent.routing``), and the same on training samples (--eval-train) and on unseen samples drawn
   as the training ones (--eval-unseen: new pictures of seen combinations). Figures go to
   OUT/report.json.

Not run by CI. Fixed step counts (not wall time) make a run reproducible for a seed; --minutes /
--vae-minutes only change a run that would overrun (then the report says so: ``shortened_by_minutes``,
``capped_by_minutes``). ``--evaluate-only`` judges
a finished OUT again.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tagmoe_core.tiny import build_tiny_bundle  # noqa: E402
from tagmoe_core.training import synthetic  # noqa: E402
from tagmoe_core.training.bundle import (  # noqa: E402
    assemble_bundle, collapse_posterior, flatten_unused_channels, fold_latent_stats, is_collapsed, latent_stats)
from tagmoe_core.training.task_success import check_task, psnr  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_pixels(folder: Path) -> torch.Tensor:
    """Every input and target picture of a data folder, [N, 3, 1, H, W] in -1..1."""
    from PIL import Image

    images = []
    for line in (folder / "samples.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for key in ("input", "target"):
            if entry.get(key):
                images.append(np.asarray(Image.open(folder / entry[key]).convert("RGB"), dtype=np.float32))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return x[:, :, None]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, 1, H, W] in -1..1 -> [B, H, W, 3] uint8."""
    return ((x[:, :, 0].permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


# -- the VAE --------------------------------------------------------------------------------------------
class SingleFrameConvs:
    """While active, the Qwen VAE's causal 3-D convolutions run as 2-D convolutions on one-frame input.

    A causal conv3d pads two zero frames before a single frame, so its output is exactly the 2-D
    convolution with the kernel's last temporal slice (the other slices meet only zeros and get zero
    gradient). Same values within float rounding, about 1.8x faster training on the CPU; the saved
    VAE is the unchanged diffusers class.
    """

    def __enter__(self):
        import torch.nn.functional as F
        from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qwen_vae

        self._cls = qwen_vae.QwenImageCausalConv3d
        self._forward = original = self._cls.forward

        def forward(conv, x, cache_x=None):
            if (cache_x is None and x.shape[2] == 1 and conv.stride[0] == 1
                    and conv._padding[4] == conv.kernel_size[0] - 1):
                padding = (conv._padding[2], conv._padding[0])
                return F.conv2d(x[:, :, 0], conv.weight[:, :, -1], conv.bias, conv.stride[1:], padding)[:, :, None]
            return original(conv, x, cache_x)

        self._cls.forward = forward
        return self

    def __exit__(self, *exc):
        self._cls.forward = self._forward
        return False


class FastRMSNorm:
    """While active, the Qwen VAE's RMS norm (``F.normalize`` over channels, then ``scale * gamma``)
    runs as one ``x * rsqrt(sum x^2)``: the same values within float rounding (max |diff| ~2e-6 on
    a training batch), about a fifth of a tiny VAE training step saved on the CPU, where the
    normalize-then-divide passes over channel-first maps are what costs."""

    def __enter__(self):
        from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qwen_vae

        self._cls = qwen_vae.QwenImageRMS_norm
        self._forward = original = self._cls.forward

        def forward(norm, x):
            if not norm.channel_first or x.dtype != torch.float32:
                return original(norm, x)
            # F.normalize clamps the norm at 1e-12: the same floor on the sum of squares.
            inverse_norm = torch.rsqrt(x.pow(2).sum(1, keepdim=True).clamp_min(1e-24))
            return x * inverse_norm * (norm.scale * norm.gamma) + norm.bias

        self._cls.forward = forward
        return self

    def __exit__(self, *exc):
        self._cls.forward = self._forward
        return False


def single_frame_round_trip(vae, x: torch.Tensor,
                            noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(decoded, posterior mean, log-variance) of one-frame pictures ``x`` [B, 3, 1, H, W], decoding
    the posterior sample ``mean + std * noise``: what ``vae.decode(vae.encode(x)...)`` computes, without
    its per-frame feature cache (whose copies serve only videos: exactly the same values for one frame)."""
    mean, logvar = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)  # as DiagonalGaussianDistribution
    decoded = vae.decoder(vae.post_quant_conv(mean + torch.exp(0.5 * logvar) * noise))
    return decoded.clamp(-1.0, 1.0), mean, logvar  # the clamp vae.decode applies


def reconstruction_loss(mse: torch.Tensor, y: torch.Tensor, x: torch.Tensor, l1: float) -> torch.Tensor:
    """Both VAE phases' reconstruction term: the MSE, plus ``l1`` times the mean absolute error."""
    return mse + l1 * (y - x).abs().mean() if l1 else mse


LINEAR_CHANNELS = 12  # latent channels --vae-linear ties to the picture: 2x2 blocks of 4x4 pixels x RGB


def block_means(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, 1, H, W] pictures -> [B, 12, 1, H/8, W/8]: each latent pixel's four 4x4-pixel blocks' mean
    colours, channel ``4 * c + 2 * dy + dx`` for colour ``c`` of the block at (dy, dx), as
    ``pixel_unshuffle`` orders them."""
    return torch.nn.functional.pixel_unshuffle(torch.nn.functional.avg_pool2d(x[:, :, 0], 4), 2)[:, :, None]


def vae_step_losses(vae, x: torch.Tensor, noise: torch.Tensor, kl_weight: float,
                    l1: float, linear: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mse, kl) of one joint VAE step on pictures ``x`` with posterior ``noise``; ``linear`` weighs
    the mean square between the posterior means' first :data:`LINEAR_CHANNELS` channels and
    :func:`block_means` (0 here and in :class:`VAEStep`; the script's --vae-linear default is 1)."""
    y, mean, logvar = single_frame_round_trip(vae, x, noise)
    rec = (y - x).pow(2).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = reconstruction_loss(rec, y, x, l1) + kl_weight * kl
    if linear:
        loss = loss + linear * (mean[:, :LINEAR_CHANNELS] - block_means(x)).pow(2).mean()
    return loss, rec, kl


class VAEStep:
    """The joint VAE step's forward and backward (the gradients land on ``vae``'s parameters), through
    ``torch.compile`` when ``use_compile``: Inductor fuses a tiny VAE's many small convolutions, norms and
    activations (about 0.6x the eager step on 2 cores, after about 80 s of compiling). Where compiling
    fails (no C++ compiler, an unsupported platform) the step says why once, drops what it computed and
    runs eagerly from then on: the same math."""

    def __init__(self, vae, kl_weight: float, l1: float, use_compile: bool, linear: float = 0.0):
        self.vae, self.kl_weight, self.l1, self.linear = vae, kl_weight, l1, linear
        self.losses = vae_step_losses
        self.failed: str | None = None
        if use_compile:
            try:  # (torch.compile refuses some platforms at once, e.g. Python versions it does not support)
                self.losses = torch.compile(vae_step_losses)
            except Exception as exc:  # noqa: BLE001 - the eager step is the same math
                self._fall_back(exc)

    def _fall_back(self, exc: Exception) -> None:
        self.failed = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        log(f"VAE: torch.compile failed ({self.failed}); training eagerly")
        self.losses = vae_step_losses

    @property
    def compiled(self) -> bool:
        return self.losses is not vae_step_losses

    def __call__(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward of one step; returns its (mse, kl), detached."""
        try:
            loss, rec, kl = self.losses(self.vae, x, noise, self.kl_weight, self.l1, self.linear)
            loss.backward()  # (the backward graph compiles on its first call)
        except Exception as exc:  # noqa: BLE001 - any backend failure: the eager step is the same math
            if not self.compiled:
                raise
            self._fall_back(exc)
            self.vae.zero_grad(set_to_none=True)  # (what a backward that failed half-way left)
            return self(x, noise)
        return rec.detach(), kl.detach()


def restart_seed(seed: int, attempt: int) -> int:
    """The initialisation seed of the VAE's fresh start ``attempt`` (1, 2, ...) for --seed ``seed``: apart
    from every first start's (``seed`` itself, below 2**32) and, for ``attempt`` < 64, from each other."""
    return 2**32 + seed * 64 + attempt


def train_vae(args, train_dir: Path, heldout_dir: Path, out_dir: Path) -> dict:
    from diffusers import AutoencoderKLQwenImage

    dim_mult = [int(v) for v in args.vae_dim_mult.split(",")]

    def fresh():
        return AutoencoderKLQwenImage(base_dim=args.vae_base_dim, z_dim=16, dim_mult=dim_mult,
                                      num_res_blocks=args.vae_res_blocks, temperal_downsample=[False, True, True])

    torch.manual_seed(args.seed)
    vae = fresh()
    data = load_pixels(train_dir)
    held = load_pixels(heldout_dir)
    log(f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, {len(data)} train pictures, "
        f"{len(held)} held-out")
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.vae_lr, fused=True)  # one kernel, not a loop per tensor
    generator = torch.Generator().manual_seed(args.seed)
    start, curve, steps_done, restarts, steps_total = time.perf_counter(), [], 0, [], 0
    vae.train()
    vae_step = VAEStep(vae, args.vae_kl, args.vae_l1, use_compile=args.vae_compile, linear=args.vae_linear)
    # The training loop only: the measured round trip below runs the unchanged VAE.
    with SingleFrameConvs(), FastRMSNorm():
        step = 0
        while step < args.vae_steps:
            if (step == args.vae_restart_at and len(restarts) < args.vae_restarts
                    and (recent := sum(curve[-100:]) / len(curve[-100:])) > args.vae_restart_mse):
                # Still painting the mean colour: a start that leaves that plateau late or never (the
                # lottery of tiny VAEs). A fresh initialisation costs less than waiting; loaded in
                # place, so the compiled step keeps its graphs. Its time counts against --vae-minutes.
                restarts.append({"step": step, "mse": round(recent, 5)})
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(restart_seed(args.seed, len(restarts)))
                    vae.load_state_dict(fresh().state_dict())
                optimizer = torch.optim.Adam(vae.parameters(), lr=args.vae_lr, fused=True)
                log(f"VAE: mse {recent:.3f} at step {step} (over {args.vae_restart_mse}): start {len(restarts) + 1}")
                step, curve, steps_done = 0, [], 0
            lr = args.vae_lr * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
            lr *= min(1.0, (step + 1) / max(1, args.vae_warmup))
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = torch.randint(len(data), (args.vae_batch,), generator=generator)
            x = data[idx]
            if args.vae_crop:  # a random window per batch: the VAE is convolutional, and crops are cheaper
                top, left = (int(v) for v in torch.randint(x.shape[-1] - args.vae_crop + 1, (2,), generator=generator))
                x = x[..., top:top + args.vae_crop, left:left + args.vae_crop]
            latent_shape = (x.shape[0], vae.config.z_dim, 1, x.shape[-2] // 8, x.shape[-1] // 8)  # 8x down
            optimizer.zero_grad(set_to_none=True)
            rec, kl = vae_step(x, torch.randn(latent_shape, generator=generator))
            optimizer.step()
            steps_done += 1
            steps_total += 1
            curve.append(float(rec))
            if step % 50 == 0 or step == args.vae_steps - 1:
                db = 10 * math.log10(4.0 / max(curve[-1], 1e-12))  # range -1..1: peak-to-peak 2
                log(f"VAE step {step + 1}/{args.vae_steps}  mse {curve[-1]:.5f} (~{db:.1f} dB)  "
                    f"kl {float(kl):.3f}  {time.perf_counter() - start:.0f}s")
            if args.vae_minutes and time.perf_counter() - start > args.vae_minutes * 60:
                log(f"VAE: stopped by --vae-minutes at step {step + 1}")
                break
            step += 1
    seconds = time.perf_counter() - start
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(data[i:i + 64]).latent_dist.mean for i in range(0, len(data), 64)])
        mean, std = latent_stats(means)
        fold_latent_stats(vae, mean, std)  # raw latents in Qwen-Image's statistics (what ComfyUI assumes)
        unused = finish_vae(vae, data[:64], args)
    deadline = start + args.vae_minutes * 60 if args.vae_minutes else None  # both phases share the cap
    decoder_steps, decoder_seconds = train_decoder(vae, data, args, generator, deadline)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out_dir)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    report = {"steps": steps_done, "seconds": round(seconds, 1), "mse_start": curve[0], "mse_end": curve[-1],
              "compiled": vae_step.compiled, "restarts": restarts, "steps_total": steps_total,
              **round_trip(vae, held), "bytes": size, "base_dim": args.vae_base_dim, "decoder_steps": decoder_steps,
              "decoder_seconds": round(decoder_seconds, 1), "unused_channels": unused}
    log(f"VAE done: {steps_done} steps in {seconds:.0f}s; held-out round trip PSNR mean "
        f"{report['heldout_psnr_mean']:.2f} dB, min {report['heldout_psnr_min']:.2f} dB, "
        f"{report['heldout_psnr_share_ge_25']:.0%} >= 25 dB; {size / 1e6:.2f} MB; unused latent channels {unused}")
    return report


def finish_vae(vae, pictures: torch.Tensor, args) -> list[int]:
    """After the fold: the posterior collapsed to its mean (a condition's sampled latent is not 78% noise)
    unless --keep-posterior, and the latent channels the decoder ignores made constant (the transformer
    need not learn them) unless --keep-unused-channels. Returns the flattened channels."""
    with torch.no_grad():
        if not args.keep_posterior:
            collapse_posterior(vae)
        if args.keep_unused_channels:
            return []
        with SingleFrameConvs():
            return flatten_unused_channels(vae, pictures)


def round_trip(vae, held: torch.Tensor) -> dict:
    """PSNR of ``held`` pictures after an encode -> decode (the posterior's mode), as uint8 pictures."""
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(held[i:i + 64]).latent_dist.mode()).sample
                           for i in range(0, len(held), 64)])
    original, rebuilt = to_uint8(held), to_uint8(recon)
    psnrs = np.array([psnr(rebuilt[i].astype(np.float64), original[i].astype(np.float64)) for i in range(len(held))])
    return {"heldout_psnr_mean": float(psnrs.mean()), "heldout_psnr_min": float(psnrs.min()),
            "heldout_psnr_share_ge_25": float((psnrs >= 25.0).mean())}


def reuse_vae(args, train_dir: Path, heldout_dir: Path, out_dir: Path) -> dict:
    """--vae-from: an earlier run's VAE, finished as a trained one is (collapse and flattening are no-ops
    on a VAE they already ran on, so an older run's VAE gets them too); a decoder phase only when
    --vae-decoder-steps is given (ablations of the transformer then share the earlier VAE as it was).
    The round trip is measured again; the earlier run's figures are kept under ``earlier``."""
    from diffusers import AutoencoderKLQwenImage

    if out_dir.exists():
        shutil.rmtree(out_dir)
    vae = AutoencoderKLQwenImage.from_pretrained(args.vae_from).eval()
    data = load_pixels(train_dir)
    unused = finish_vae(vae, data[:64], args)
    decoder_steps, decoder_seconds = train_decoder(vae, data, args, torch.Generator().manual_seed(args.seed))
    vae.save_pretrained(out_dir)
    earlier = args.vae_from.parent / "report.json"
    report = {"from": str(args.vae_from)}
    if earlier.is_file():
        report["earlier"] = json.loads(earlier.read_text()).get("vae", {})
    report.update(round_trip(vae, load_pixels(heldout_dir)), unused_channels=unused,
                  posterior_collapsed=is_collapsed(vae), decoder_steps=decoder_steps,
                  decoder_seconds=round(decoder_seconds, 1))
    log(f"VAE from {args.vae_from}: unused latent channels {unused}, posterior collapsed {is_collapsed(vae)}")
    return report


def train_decoder(vae, data: torch.Tensor, args, generator: torch.Generator,
                  deadline: float | None = None) -> tuple[int, float]:
    """--vae-decoder-steps (none when 0): the decoder (and post_quant_conv) alone on the encoder's
    stored posteriors, sampled anew each step; run on a finished VAE (posterior collapsed: each
    picture's one mean), the decoder learns the very latents it will decode. The latents the transformer
    learns do not move, and a step skips the encoder's two passes (about 0.6x the eager joint step). Latent
    channels that are the same constant for every picture (``flatten_unused_channels``) keep their
    post_quant_conv columns: the decoder stays blind to them. Stops early once ``deadline``
    (``time.perf_counter()``) has passed. Leaves the VAE in eval mode, trainable as it came. Returns
    (steps, seconds)."""
    start = time.perf_counter()
    vae.eval()
    if not args.vae_decoder_steps:
        return 0, 0.0
    with torch.no_grad(), SingleFrameConvs(), FastRMSNorm():
        moments = torch.cat([vae.quant_conv(vae.encoder(data[i:i + 64])) for i in range(0, len(data), 64)])
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    flat = mean.flatten(2)
    constant = (flat.amax(dim=(0, 2)) == flat.amin(dim=(0, 2))).nonzero().flatten()
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    vae.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=args.vae_decoder_lr, fused=True)
    side = mean.shape[-1]
    crop = args.vae_crop // 8 if args.vae_crop else side  # in latent cells (8 pixels each)
    vae.train()
    steps, done = args.vae_decoder_steps, 0
    with SingleFrameConvs(), FastRMSNorm():
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = args.vae_decoder_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            idx = torch.randint(len(data), (args.vae_batch,), generator=generator)
            top, left = (int(v) for v in torch.randint(side - crop + 1, (2,), generator=generator))
            cells = (..., slice(top, top + crop), slice(left, left + crop))
            m, s = mean[idx][cells], std[idx][cells]
            x = data[idx][..., top * 8:(top + crop) * 8, left * 8:(left + crop) * 8]
            y = vae.decoder(vae.post_quant_conv(m + s * torch.randn(m.shape, generator=generator))).clamp(-1.0, 1.0)
            rec = (y - x).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            reconstruction_loss(rec, y, x, args.vae_l1).backward()
            vae.post_quant_conv.weight.grad[:, constant] = 0.0  # (Adam leaves a weight with zero gradient)
            optimizer.step()
            done = step + 1
            if step % 500 == 0 or step == steps - 1:
                log(f"VAE decoder step {step + 1}/{steps}  mse {float(rec.detach()):.5f}  "
                    f"{time.perf_counter() - start:.0f}s")
            if deadline is not None and time.perf_counter() > deadline:
                log(f"VAE decoder: stopped by --vae-minutes at step {done}")
                break
    vae.requires_grad_(True)
    vae.eval()
    return done, time.perf_counter() - start


def vae_ceiling(pipe, heldout_dir: Path) -> dict:
    """Success of the rule on each held-out target after a VAE round trip (the best a model can do here)."""
    from PIL import Image

    specs = synthetic.read_tasks(heldout_dir)
    per_task: dict[str, list[bool]] = {}
    for spec in specs:
        target = spec.target_image()
        x = torch.from_numpy(np.asarray(target, dtype=np.float32)).permute(2, 0, 1)[None, :, None] / 127.5 - 1
        with torch.no_grad():
            y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
        out = Image.fromarray(to_uint8(y)[0])
        per_task.setdefault(spec.task, []).append(check_task(spec.input_image(), spec, out).ok)
    return {task: float(np.mean(v)) for task, v in per_task.items()}


def write_comfy_vae(vae_dir: Path, path: Path) -> str:
    """The trained VAE as a ComfyUI VAE file (Wan 2.1 keys, widened to the shape ComfyUI builds at the
    VAE's own width: newer ComfyUI's VAELoader reads it), or why not."""
    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import save_file

    from tagmoe_core.model.vae_widen import comfy_state_dict

    try:
        state = comfy_state_dict(AutoencoderKLQwenImage.from_pretrained(vae_dir))
    except ValueError as exc:
        return f"no ComfyUI file: {exc}"
    save_file(state, path)
    return str(path)


# -- the transformer ------------------------------------------------------------------------------------
FIT_AFTER = 200  # transformer steps timed before --minutes fits the schedule to the host
FIT_SHARE = 0.9  # of --minutes the fitted steps may take at the first steps' speed: room for a host that slows


def steps_that_fit(steps: int, done: int, seconds: float, minutes: float) -> int:
    """The transformer's step count for --minutes: ``steps``, or fewer where ``done`` steps took
    ``seconds`` and ``steps`` at that speed would run past :data:`FIT_SHARE` of ``minutes`` (never
    fewer than ``done`` + 1). The cosine learning-rate schedule then ends at the shorter count: a host
    too slow for the recipe gets a whole, shorter schedule instead of one stopped while its learning
    rate is still high (the sixteenth session's run slowed from 0.218 to 0.238 s a step after its
    first 200: fitted to all 15 minutes, the hard cap stopped it before the schedule's end)."""
    if not minutes or done <= 0:
        return steps
    return max(done + 1, min(steps, int(minutes * 60 * FIT_SHARE * done / max(seconds, 1e-9))))


def train_transformer(args, base: Path, tagmoe: Path, train_dir: Path, run_dir: Path) -> tuple[dict, Path]:
    from tagmoe_core.training.loop import TrainConfig, prepare

    config = TrainConfig(data=str(train_dir), output=str(run_dir), base=str(base), tagmoe=str(tagmoe),
                         train="whole", steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         lambda_lbl=args.lambda_lbl, lambda_align=args.lambda_align, seed=args.seed,
                         device="cpu", max_grad_norm=1.0, train_tag_embedding=not args.freeze_tag_embedding,
                         text_dropout=args.text_dropout, weight_decay=args.weight_decay, ema_decay=args.ema_decay,
                         optimizer=args.optimizer, muon_lr=args.muon_lr)
    start = time.perf_counter()
    with SingleFrameConvs(), FastRMSNorm():  # the data's VAE encoding: the same latents within float rounding
        trainer = prepare(config)
    encode_seconds = time.perf_counter() - start
    log(f"transformer: {sum(p.numel() for p in trainer.params) / 1e6:.3f} M trained parameters, "
        f"{len(trainer.samples)} samples encoded in {encode_seconds:.0f}s, {trainer.batches_per_epoch} batches/epoch")
    start, window = time.perf_counter(), []
    capped = False
    planned = args.steps  # --minutes may shorten it, once, after FIT_AFTER steps
    peaks = [group["lr"] for group in trainer.optimizer.param_groups]  # --lr, or --muon-lr for Muon's matrices
    while trainer.step_index < planned:
        for group, peak in zip(trainer.optimizer.param_groups, peaks):
            lr = peak * 0.5 * (1 + math.cos(math.pi * trainer.step_index / planned))
            lr *= min(1.0, (trainer.step_index + 1) / max(1, args.warmup))
            group["lr"] = lr
        report = trainer.step()
        window.append(report.terms)
        if report.step == FIT_AFTER and args.minutes:
            fitted = steps_that_fit(planned, report.step, time.perf_counter() - start, args.minutes)
            if fitted < planned:
                log(f"transformer: {(time.perf_counter() - start) / report.step:.3f} s a step here, so --minutes "
                    f"{args.minutes:g} fits {fitted} of the {planned} steps: the learning-rate schedule ends there")
                planned = fitted
        if report.step % args.log_every == 0 or report.step == planned or report.step == 1:
            mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            log(f"step {report.step}/{planned}  loss {mean['loss']:.4f}  flow {mean['flow']:.4f}  "
                f"lbl {mean['lbl']:.4f}  align {mean['align']:.4f}  lr {lr:.2e}  {time.perf_counter() - start:.0f}s")
            window = []
        if args.minutes and time.perf_counter() - start > args.minutes * 60:  # (a host that slowed down since)
            log(f"transformer: stopped by --minutes at step {trainer.step_index}")
            capped = True
            break
    seconds = time.perf_counter() - start
    checkpoint = trainer.save()
    history = trainer.history
    head = history[:min(50, len(history))]
    tail = history[-min(200, len(history)):]
    summary = {"steps": trainer.step_index, "steps_asked": args.steps, "shortened_by_minutes": planned < args.steps,
               "capped_by_minutes": capped, "seconds": round(seconds, 1),
               "encode_seconds": round(encode_seconds, 1), "seconds_per_step": seconds / max(1, len(history)),
               "first_50_mean": {k: float(np.mean([h[k] for h in head])) for k in head[0]},
               "last_200_mean": {k: float(np.mean([h[k] for h in tail])) for k in tail[0]},
               "lr": args.lr, "batch_size": args.batch_size, "lambda_lbl": args.lambda_lbl,
               "lambda_align": args.lambda_align, "weight_decay": args.weight_decay, "ema_decay": args.ema_decay,
               "optimizer": args.optimizer, "muon_lr": args.muon_lr}
    log(f"transformer done: {trainer.step_index} steps in {seconds:.0f}s; loss first 50 "
        f"{summary['first_50_mean']['loss']:.4f} -> last 200 {summary['last_200_mean']['loss']:.4f}")
    return summary, checkpoint


# -- evaluation -----------------------------------------------------------------------------------------
def evaluate(pipe, data_dir: Path, steps: int, cfg: float, limit: int | None, samples_dir: Path | None,
             tag_guidance: float = 0.0) -> dict:
    from tagmoe_core.training.evaluation import judge_sample

    specs = synthetic.read_tasks(data_dir)
    if limit:
        specs = specs[:limit]
    per_task: dict[str, list] = {}
    start = time.perf_counter()
    for i, spec in enumerate(specs):
        judged = judge_sample(pipe, spec, seed=i, steps=steps, cfg=cfg, tag_guidance=tag_guidance)
        per_task.setdefault(spec.task, []).append((judged.ok, judged.alignment, judged.expert_share,
                                                   judged.verdict.failed(), judged.input_objects))
        if samples_dir is not None and i < 28:
            samples_dir.mkdir(parents=True, exist_ok=True)
            judged.output.save(samples_dir / f"{i:03d}_{spec.task}_{'ok' if judged.ok else 'fail'}.png")
            if spec.source is not None:
                spec.input_image().save(samples_dir / f"{i:03d}_{spec.task}_in.png")
    seconds = time.perf_counter() - start
    tasks = {}
    for task, rows in per_task.items():
        tasks[task] = {"n": len(rows), "success": float(np.mean([r[0] for r in rows])),
                       "alignment": float(np.mean([r[1] for r in rows])),
                       "expert_share": [round(float(v), 3) for v in np.mean([r[2] for r in rows], axis=0)],
                       # how many outputs failed each check: what the edits get wrong, for the next recipe
                       "failed_checks": dict(Counter(name for r in rows for name in r[3]).most_common()),
                       # successes / samples by the number of objects in the input picture (0: none, or no picture)
                       "by_input_objects": {str(n): f"{sum(r[0] for r in rows if r[4] == n)}/"
                                                    f"{sum(1 for r in rows if r[4] == n)}"
                                            for n in sorted({r[4] for r in rows})}}
    every = [r[0] for rows in per_task.values() for r in rows]
    return {"tasks": tasks, "success": float(np.mean(every)), "n": len(every), "seconds": round(seconds, 1),
            "steps": steps, "cfg": cfg, "tag_guidance": tag_guidance}


def evaluate_again(args, out: Path, train_dir: Path, heldout_dir: Path) -> int:
    from tagmoe_core.pipeline.builder import load_pipeline
    from tagmoe_core.tiny import TinyBundle

    bundle = TinyBundle(out / "bundle")
    if not (bundle.tagmoe / "transformer").is_dir() or not (heldout_dir / synthetic.TASKS_FILE).is_file():
        raise SystemExit(f"--evaluate-only: '{out}' holds no finished run (bundle/ and data/heldout/)")
    pipe = load_pipeline(bundle.base, bundle.tagmoe, device="cpu", dtype=torch.float32, backend="torch",
                         placement="single")
    unseen = unseen_after_run(out, args.eval_unseen) if args.eval_unseen else None
    report = judge(pipe, args, heldout_dir, train_dir, unseen, None)
    name = f"eval_cfg{args.eval_cfg:g}_steps{args.eval_steps}_tg{args.eval_tag_guidance:g}"
    name += f"_n{args.eval_limit}" if args.eval_limit else ""
    name += f"_train{args.eval_train}" if args.eval_train else ""
    name += f"_unseen{args.eval_unseen}" if args.eval_unseen else ""
    path = out / f"{name}.json"
    path.write_text(json.dumps(report, indent=1))
    log(f"report: {path}")
    return 0


def judge(pipe, args, heldout_dir: Path, train_dir: Path, unseen_dir: Path | None,
          samples_dir: Path | None) -> dict:
    """The held-out split (--eval-limit), the first --eval-train training samples and the first
    --eval-unseen of ``unseen_dir``, each judged and logged: the report's eval, eval_train, eval_unseen."""
    splits = [("eval", "held-out", heldout_dir, args.eval_limit or None, samples_dir)]
    if args.eval_train:
        splits.append(("eval_train", "train", train_dir, args.eval_train, None))
    if unseen_dir is not None:
        splits.append(("eval_unseen", "unseen", unseen_dir, args.eval_unseen, None))
    report = {}
    for key, label, folder, limit, samples in splits:
        report[key] = evaluate(pipe, folder, args.eval_steps, args.eval_cfg, limit, samples, args.eval_tag_guidance)
        log_eval(label, report[key])
    return report


def write_unseen(folder: Path, count: int, seed: int, train_count: int,
                 size: tuple[int, int] = synthetic.DEFAULT_SIZE) -> Path:
    """``count`` samples of the train split after the ``train_count`` training ones: pictures no training
    sample holds, of the shape-colour pairs training sees (the held-out split's are absent from them)."""
    written = synthetic.write_dataset(folder, count, seed=seed, split="train", overwrite=True, start=train_count,
                                      size=size)
    log(f"unseen: {written.count} samples ({written.per_task})")
    return folder


def unseen_after_run(out: Path, count: int) -> Path:
    """--evaluate-only: the run's unseen folder when it holds the first ``count`` samples after the run's
    training ones (its own seed and --count, from its data/train manifest), else those written to
    OUT/data/unseen_N (the run's folder, which its report judged, is left as it is)."""
    manifest = json.loads((out / "data" / "train" / synthetic.MANIFEST_FILE).read_text())
    seed, start = int(manifest["seed"]), int(manifest["count"])
    width, height = synthetic.DEFAULT_SIZE
    size = (int(manifest.get("width", width)), int(manifest.get("height", height)))
    folder = out / "data" / "unseen"
    if (folder / synthetic.MANIFEST_FILE).is_file():
        have = json.loads((folder / synthetic.MANIFEST_FILE).read_text())
        if (have.get("seed"), have.get("split"), have.get("start"), have.get("version")) == \
                (seed, "train", start, synthetic.VERSION) and have.get("count", 0) >= count \
                and (have.get("width"), have.get("height")) == size:
            return folder
    return write_unseen(out / "data" / f"unseen_{count}", count, seed, start, size)


def log_eval(split: str, result: dict) -> None:
    for task, row in result["tasks"].items():
        log(f"{split} {task:<10} success {row['success']:.0%} (n={row['n']})  alignment {row['alignment']:+.3f}  "
            f"experts {row['expert_share']}  failed {row['failed_checks']}")
    log(f"{split} success {result['success']:.1%} of {result['n']} ({result['seconds']:.0f}s)")


def transformer_config(args) -> dict:
    """The trained transformer's width and depth (TRANSFORMER_CONFIG's other entries kept): rotary
    axes split as Qwen-Image's [16, 56, 56] of 128, a quarter for the frame axis."""
    frame = args.head_dim // 4 // 2 * 2
    side = (args.head_dim - frame) // 2
    if frame + 2 * side != args.head_dim or side % 2:
        raise SystemExit(f"--head-dim {args.head_dim}: the rotary axes need a multiple of 8")
    return {"num_layers": args.layers, "num_attention_heads": args.heads, "attention_head_dim": args.head_dim,
            "axes_dims_rope": [frame, side, side]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--count", type=int, default=6000)
    parser.add_argument("--heldout-count", type=int, default=140)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=synthetic.DEFAULT_SIZE[0],
                        help="the pictures' side in pixels (a multiple of 16 of at least 48; objects scale with it)")
    parser.add_argument("--vae-steps", type=int, default=7000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=3e-3)
    parser.add_argument("--vae-warmup", type=int, default=100, help="linear learning-rate warmup steps")
    parser.add_argument("--vae-kl", type=float, default=1e-4)
    parser.add_argument("--vae-linear", type=float, default=1.0,
                        help="weight of a loss tying 12 latent channels to the picture's 4x4-pixel block means "
                             "(latents near-linear in colour; 0: off)")
    parser.add_argument("--vae-restart-at", type=int, default=1500,
                        help="at this step, a VAE whose mse over the last 100 steps (fewer before) is above "
                             "--vae-restart-mse starts again from a new initialisation (its time counts against "
                             "--vae-minutes)")
    parser.add_argument("--vae-restart-mse", type=float, default=0.2,
                        help="mse above which a start counts as stuck (0.2 ~ 13 dB; the mean-colour plateau is ~11 dB)")
    parser.add_argument("--vae-restarts", type=int, default=1, help="at most this many fresh starts (0: none)")
    parser.add_argument("--vae-base-dim", type=int, default=16)
    parser.add_argument("--vae-dim-mult", default="1,2,4,4",
                        help="channel multipliers of the 4 VAE stages (1,2,4,4: the ComfyUI file can be written)")
    parser.add_argument("--vae-crop", type=int, default=32, help="train on random square crops of this size (0: whole)")
    parser.add_argument("--vae-res-blocks", type=int, default=1,
                        help="residual blocks per stage (ComfyUI file: up to 2)")
    parser.add_argument("--vae-decoder-steps", type=int, default=None,
                        help="then train the decoder alone this many steps on the finished VAE's latents, "
                             "within --vae-minutes (default 1000; with --vae-from 0, the earlier VAE as it was)")
    parser.add_argument("--vae-decoder-lr", type=float, default=1e-3)
    parser.add_argument("--vae-l1", type=float, default=0.0, help="weight of an L1 term beside the MSE")
    parser.add_argument("--keep-posterior", action="store_true",
                        help="keep the trained VAE's posterior variance (by default it is collapsed to a "
                             "point, so an edit's condition latent is not resampled noise)")
    parser.add_argument("--keep-unused-channels", action="store_true",
                        help="keep the latent channels the VAE's decoder ignores as the encoder left them (by "
                             "default they are made constant: 0 in the latents the transformer predicts)")
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="use this trained VAE folder (an earlier run's OUT/vae) instead of training one")
    parser.add_argument("--only-vae", action="store_true", help="stop after the VAE (for VAE experiments)")
    parser.add_argument("--vae-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="run the VAE's joint training step through torch.compile (about 1.7x the steps per "
                             "minute on a 2-core CPU; eager where compiling fails)")
    parser.add_argument("--vae-minutes", type=float, default=11.0,
                        help="cap on the VAE's training, both phases (0: none)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (the last 2 are MoE)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--task-vocabulary", action=argparse.BooleanOptionalAction, default=True,
                        help="train the tiny tokenizer on the task set's instructions too, so that each colour, "
                             "shape and verb is one token (--no-task-vocabulary: the random bundle's tokenizer, "
                             "which spells most of them letter by letter)")
    parser.add_argument("--freeze-tag-embedding", action=argparse.BooleanOptionalAction, default=True,
                        help="keep tag_embedding at its start (L_align then cannot collapse onto it)")
    parser.add_argument("--steps", type=int, default=5500)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100, help="the transformer's linear learning-rate warmup steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's decoupled weight decay")
    parser.add_argument("--optimizer", default="muon", choices=["adamw", "muon"],
                        help="the transformer's optimizer (muon: Muon for the blocks' weight matrices, AdamW for "
                             "the rest)")
    parser.add_argument("--muon-lr", type=float, default=6e-3, help="Muon's learning rate (0: --lr)")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="keep a moving average of the transformer's weights and ship it (0: the last weights)")
    parser.add_argument("--text-dropout", type=float, default=0.0,
                        help="share of samples trained on the empty prompt (what true CFG, --eval-cfg > 1, needs)")
    parser.add_argument("--lambda-lbl", type=float, default=0.01)
    parser.add_argument("--lambda-align", type=float, default=0.1)
    parser.add_argument("--minutes", type=float, default=15.0,
                        help="the transformer's minutes: where its steps would take longer (timed over the first "
                             f"{FIT_AFTER}), the schedule ends at the steps that fit (0: no limit)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--eval-cfg", type=float, default=1.0)
    parser.add_argument("--eval-limit", type=int, default=0, help="evaluate only the first N held-out samples")
    parser.add_argument("--eval-tag-guidance", type=float, default=0.0,
                        help="steer the routers toward each sample's tags while judging (0: the release's routing)")
    parser.add_argument("--eval-train", type=int, default=None,
                        help="also judge the first N training samples (under- or over-fitting: same rule, seen "
                             "data; default 70, with --evaluate-only 0)")
    parser.add_argument("--eval-unseen", type=int, default=None,
                        help="also judge N samples drawn as the training ones but after them (new pictures of "
                             "the combinations training sees: generalisation without composition; default 70, "
                             "with --evaluate-only 0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--evaluate-only", action="store_true",
                        help="judge OUTPUT's finished bundle again (--eval-steps, --eval-cfg, --eval-limit, "
                             "--eval-train, --eval-unseen, --eval-tag-guidance) without training: writes "
                             "OUTPUT/eval_cfgC_stepsS_tgG[_nN][_trainT][_unseenU].json")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        synthetic.check_size(args.size, args.size)
    except synthetic.DataError as exc:
        parser.error(f"--size: {exc}")
    if args.vae_crop % 8 or not 0 <= args.vae_crop <= args.size:
        parser.error(f"--vae-crop must be 0 or a multiple of 8 (the VAE's latent pixel) up to "
                     f"{args.size} (the pictures' side), got {args.vae_crop}")
    if args.vae_restart_at < 1 or not 0 <= args.vae_restarts < 64:
        parser.error("--vae-restart-at must be at least 1 and --vae-restarts from 0 to 63, got "
                     f"{args.vae_restart_at} and {args.vae_restarts}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be from 0 to 2**32 - 1, got {args.seed}")
    if args.vae_decoder_steps is None:
        args.vae_decoder_steps = 0 if args.vae_from else 1000
    if args.eval_train is None:
        args.eval_train = 0 if args.evaluate_only else 70
    if args.eval_unseen is None:
        args.eval_unseen = 0 if args.evaluate_only else 70
    torch.set_num_threads(args.threads)
    total = time.perf_counter()
    out: Path = args.output
    train_dir, heldout_dir = out / "data" / "train", out / "data" / "heldout"
    if args.evaluate_only:
        return evaluate_again(args, out, train_dir, heldout_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    size = (args.size, args.size)

    for folder, count, split in ((train_dir, args.count, "train"), (heldout_dir, args.heldout_count, "heldout")):
        written = synthetic.write_dataset(folder, count, seed=args.seed, split=split, overwrite=True, size=size)
        log(f"{split}: {written.count} samples in {written.seconds:.1f}s ({written.per_task})")

    random_bundle = build_tiny_bundle(out / "random", seed=args.seed, transformer_config=transformer_config(args),
                                      corpus=synthetic.instructions() if args.task_vocabulary else ())
    if args.vae_from:  # a VAE an earlier run trained (ablations of the transformer share one VAE)
        report["vae"] = reuse_vae(args, train_dir, heldout_dir, out / "vae")
    else:
        report["vae"] = train_vae(args, train_dir, heldout_dir, out / "vae")
    report["vae"]["comfyui_file"] = write_comfy_vae(out / "vae", out / "qwen_image_vae_tiny.safetensors")
    log(f"ComfyUI VAE: {report['vae']['comfyui_file']}")
    if args.only_vae:
        (out / "report.json").write_text(json.dumps(report, indent=1))
        return 0

    # The base with the trained VAE (and the random tiny TAG-MoE weights to start from).
    start_bundle = assemble_bundle(random_bundle, out / "start", vae=out / "vae")
    if (out / "run").exists():
        shutil.rmtree(out / "run")
    report["transformer"], checkpoint = train_transformer(args, start_bundle.base, start_bundle.tagmoe, train_dir,
                                                          out / "run")
    bundle = assemble_bundle(random_bundle, out / "bundle", vae=out / "vae", transformer=checkpoint / "transformer",
                             note={"checkpoint": str(checkpoint)})
    report["bundle_bytes"] = sum(f.stat().st_size for f in bundle.root.rglob("*") if f.is_file())

    from tagmoe_core.pipeline.builder import load_pipeline

    pipe = load_pipeline(bundle.base, bundle.tagmoe, device="cpu", dtype=torch.float32, backend="torch",
                         placement="single")
    report["vae"]["heldout_target_ceiling"] = vae_ceiling(pipe, heldout_dir)
    log(f"success of the held-out targets after a VAE round trip: {report['vae']['heldout_target_ceiling']}")
    unseen = None
    if args.eval_unseen:
        unseen = write_unseen(out / "data" / "unseen", args.eval_unseen, args.seed, args.count, size)
    report.update(judge(pipe, args, heldout_dir, train_dir, unseen, out / "samples"))
    report["seconds_total"] = round(time.perf_counter() - total, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log(f"all done in {report['seconds_total']:.0f}s; report: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
