"""A Q6_K quantizer (gguf-py dequantizes K-quants but has no quantizer for them), in torch (its
elementwise ops use every CPU core, and any device).

The algorithm of llama.cpp's reference ``quantize_row_q6_K_ref`` (``ggml-quants.c``), vectorized over
super-blocks: each super-block of 256 values is 16 sub-blocks of 16; each sub-block gets the scale that
``make_qx_quants`` (rmse_type 1: weights x^2, 18 trial inverse scales around -32/max) finds best; the 16
scales are quantized to int8 against one float16 super-scale ``d``, and the values to 6 bits
(-32..31) against their sub-block's ``d * scale``. Not bit-identical to llama.cpp (its sums run in
another order, which can tip a near-tie between trial scales); the tests hold its error to what 6 bits
per value reach: below Q8_0's neighbour Q5_1's and far below Q4's.

Block layout (210 bytes, as ggml's ``block_q6_K``): 128 bytes of low nibbles, 64 bytes of the 2 high
bits, 16 int8 scales, the float16 ``d``.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
GROUP_MAX_EPS = 1e-15


def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [B], levels 0..2*nmax-1 [B, n]) for sub-blocks ``x`` [B, n], as llama.cpp's make_qx_quants
    with rmse_type 1 (no importance weights: w = x^2). Levels are float32 (exact small integers);
    ``torch.round`` rounds half to even, as llama.cpp's nearest_int."""
    index = x.abs().argmax(dim=-1, keepdim=True)
    peak = x.gather(-1, index)[:, 0]
    zero = peak.abs() < GROUP_MAX_EPS
    safe = torch.where(zero, torch.ones_like(peak), peak)
    weight = x * x
    wx = weight * x

    def trial(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = torch.round(iscale[:, None] * x).clamp_(-nmax, nmax - 1)
        return torch.einsum("ij,ij->i", wx, levels), torch.einsum("ij,ij->i", weight, levels.square_())

    # the trial inverse scales, in llama.cpp's order: -nmax/max first, then -(nmax + 0.1 i)/max for i = -9..9
    chosen = -nmax / safe
    sumlx, suml2 = trial(chosen)
    best = sumlx * sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(torch.tensor(nmax, dtype=torch.float32) + torch.tensor(0.1, dtype=torch.float32) * step) / safe
        trial_lx, trial_l2 = trial(iscale)
        better = (trial_l2 > 0) & (trial_lx * trial_lx > best * trial_l2)
        chosen = torch.where(better, iscale, chosen)
        best = torch.where(better, trial_lx * trial_lx / torch.where(trial_l2 > 0, trial_l2, torch.ones_like(trial_l2)),
                           best)
    levels = torch.round(chosen[:, None] * x).clamp_(-nmax, nmax - 1)
    sumlx, suml2 = torch.einsum("ij,ij->i", wx, levels), torch.einsum("ij,ij->i", weight, levels * levels)
    scale = torch.where(zero | (suml2 <= 0), torch.zeros_like(sumlx), sumlx / torch.where(suml2 > 0, suml2, 1.0))
    levels = torch.where(zero[:, None], torch.zeros_like(levels), levels + nmax)
    return scale, levels


def quantize_q6_k(rows: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 rows [R, n] (n a multiple of 256) -> Q6_K bytes [R, n / 256 * 210] (numpy, as gguf-py's)."""
    x = torch.as_tensor(rows).to(torch.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"Q6_K rows hold a multiple of {QK_K} values, not {x.shape[-1]}")
    count = x.shape[0]
    x = x.reshape(-1, 16, 16)  # super-blocks x sub-blocks x values
    blocks = x.shape[0]
    scales, levels = _make_qx_quants(x.reshape(-1, 16), 32)
    scales, levels = scales.reshape(blocks, 16), levels.reshape(blocks, 16, 16)
    max_scale = scales.gather(-1, scales.abs().argmax(dim=-1, keepdim=True))[:, 0]
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = -128 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    d = torch.where(zero, torch.zeros_like(iscale), 1 / iscale).to(torch.float16)
    q_scales = torch.round(iscale[:, None] * scales).clamp_(max=127)
    q_scales = torch.where(zero[:, None], torch.zeros_like(q_scales), q_scales).to(torch.int8)
    sub_d = d.to(torch.float32)[:, None] * q_scales.to(torch.float32)  # [blocks, 16]
    nonzero = (sub_d != 0)[:, :, None]
    requant = torch.round(x / torch.where(nonzero, sub_d[:, :, None], torch.ones_like(sub_d[:, :, None])))
    levels = torch.where(nonzero, requant.clamp_(-32, 31) + 32, levels)
    levels = torch.where(zero[:, None, None], torch.zeros_like(levels), levels)
    levels = levels.to(torch.uint8).reshape(blocks, 2, 4, 32)  # two halves of 128 values, 4 quarters each
    low, high = levels & 0x0F, levels >> 4
    ql = torch.cat((low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)), dim=-1)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = torch.cat((ql.reshape(blocks, 128), qh.reshape(blocks, 64), q_scales.view(torch.uint8),
                     d.reshape(blocks, 1).view(torch.uint8)), dim=-1)
    return out.reshape(count, -1).cpu().numpy()
