"""K-quant quantizers, Q4_K, Q5_K and Q6_K (gguf-py dequantizes K-quants but has no quantizer for them), in
torch (its elementwise ops use every CPU core, and any device).

The algorithms of llama.cpp's reference ``quantize_row_q{4,5,6}_K_ref`` (``ggml-quants.c``), vectorized over
super-blocks of 256 values. Not bit-identical to llama.cpp (its sums run in another order, which can tip a
near-tie between trial scales); the tests hold each type's error to what its bits reach.

Q6_K: 16 sub-blocks of 16; each sub-block gets the scale that ``make_qx_quants`` (rmse_type 1: weights
x^2, 18 trial inverse scales around -32/max) finds best; the 16 scales are quantized to int8 against one
float16 super-scale ``d``, and the values to 6 bits (-32..31) against their sub-block's ``d * scale``.
Block layout (210 bytes, as ggml's ``block_q6_K``): 128 bytes of low nibbles, 64 bytes of the 2 high
bits, 16 int8 scales, the float16 ``d``.

Q4_K / Q5_K: 8 sub-blocks of 32, each fitted as ``scale * q - min`` (q 0..15 / 0..31) by ``make_qkx2_quants``:
weights ``sqrt(mean x^2) + |x|`` (the sub-block's), a first fit spanning min(x, 0)..max(x), then a walk of
trial inverse scales (Q4_K: 21 from (15 - 1)/(max - min) by 0.1; Q5_K: 16 from (31 - 0.5)/(max - min); min the
best fit's so far), each refitted by weighted least squares (min kept at or below 0) and kept where its
weighted squared error is lower. The 8 scales and 8 mins are quantized to 6 bits against two float16
super-scales ``d = max scale / 63``, ``dmin = max min / 63``, and the values requantized against ``d * sc``
and ``dmin * m``. Block layouts (as ggml's ``block_q4_K`` / ``block_q5_K``): ``d``, ``dmin``, 12 bytes of
6-bit scales and mins (ggml's ``get_scale_min_k4`` packing), then Q5_K's 32 bytes of 5th bits, then 128 bytes
of nibbles: 144 / 176 bytes.
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


# -- Q4_K / Q5_K: 8 sub-blocks of 32 with a 6-bit scale and a 6-bit min each ----------------------------------
def _make_qkx2_quants(x: torch.Tensor, weight: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [B], min [B]: the value subtracted) for sub-blocks ``x`` [B, n], as llama.cpp's make_qkx2_quants
    (no MAD): the affine fit ``scale * l - min`` with the lowest weighted squared error over nstep + 1 trial
    inverse scales around nmax / (max - min). The levels are recomputed against the 6-bit scales later."""
    low = x.amin(dim=-1).clamp(max=0)
    high = x.amax(dim=-1)
    flat = high == low
    span = torch.where(flat, torch.ones_like(high), high - low)
    sum_w = weight.sum(-1)
    sum_x = (weight * x).sum(-1)
    iscale = nmax / span
    levels = torch.round(iscale[:, None] * (x - low[:, None])).clamp_(0, nmax)
    scale = 1 / iscale
    offset = low.clone()
    best = (weight * (scale[:, None] * levels + offset[:, None] - x).square()).sum(-1)
    rmin32, rdelta32 = torch.tensor(rmin, dtype=torch.float32), torch.tensor(rdelta, dtype=torch.float32)
    for step in range(nstep + 1):
        # llama.cpp's trials run against the best min found so far (``min`` changes as a trial wins), and its
        # trial constant is float32
        gap = high - offset
        trial = rmin32 + rdelta32 * step + nmax
        iscale = trial / torch.where(flat | (gap == 0), torch.ones_like(gap), gap)
        lv = torch.round(iscale[:, None] * (x - offset[:, None])).clamp_(0, nmax)
        sum_l, sum_l2, sum_xl = (weight * lv).sum(-1), (weight * lv * lv).sum(-1), (weight * lv * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        error = (weight * (this_scale[:, None] * lv + this_min[:, None] - x).square()).sum(-1)
        better = ok & (error < best)
        best = torch.where(better, error, best)
        scale = torch.where(better, this_scale, scale)
        offset = torch.where(better, this_min, offset)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -offset


def _quantize_k(rows: np.ndarray | torch.Tensor, nmax: int, rmin: float, nstep: int, name: str) -> tuple[
        torch.Tensor, torch.Tensor, int]:
    """Q4_K/Q5_K's common part: (d+dmin+12 scale bytes [blocks, 16], levels 0..nmax [blocks, 8, 32], row count)."""
    x = torch.as_tensor(rows).to(torch.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"{name} rows hold a multiple of {QK_K} values, not {x.shape[-1]}")
    count = x.shape[0]
    x = x.reshape(-1, 8, 32)
    blocks = x.shape[0]
    flat = x.reshape(-1, 32)
    av_x = torch.sqrt(flat.square().sum(-1, keepdim=True) / 32)
    scales, mins = _make_qkx2_quants(flat, av_x + flat.abs(), nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(blocks, 8), mins.reshape(blocks, 8)
    max_scale = scales.amax(-1).clamp(min=0)
    max_min = mins.amax(-1).clamp(min=0)
    inv_scale = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, 1.0), 0.0)
    inv_min = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, 1.0), 0.0)
    ls = torch.round(inv_scale[:, None] * scales).clamp_(0, 63).to(torch.uint8)
    lm = torch.round(inv_min[:, None] * mins).clamp_(0, 63).to(torch.uint8)
    d = (max_scale / 63).to(torch.float16)
    dmin = (max_min / 63).to(torch.float16)
    packed = torch.cat((ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                        (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)), dim=-1)
    sub_d = (d.to(torch.float32)[:, None] * ls.to(torch.float32))[:, :, None]
    sub_m = (dmin.to(torch.float32)[:, None] * lm.to(torch.float32))[:, :, None]
    nonzero = sub_d != 0
    levels = torch.round((x + sub_m) / torch.where(nonzero, sub_d, torch.ones_like(sub_d))).clamp_(0, nmax)
    levels = torch.where(nonzero, levels, torch.zeros_like(levels)).to(torch.uint8)
    head = torch.cat((d.reshape(blocks, 1).view(torch.uint8), dmin.reshape(blocks, 1).view(torch.uint8), packed), -1)
    return head, levels, count


def quantize_q4_k(rows: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 rows [R, n] (n a multiple of 256) -> Q4_K bytes [R, n / 256 * 144], as llama.cpp's
    quantize_row_q4_K_ref (make_qkx2_quants with nmax 15, rmin -1, rdelta 0.1, 20 steps)."""
    head, levels, count = _quantize_k(rows, 15, -1.0, 20, "Q4_K")
    pairs = levels.reshape(-1, 4, 2, 32)  # 4 pairs of sub-blocks: low nibbles the first, high the second
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat((head, qs), -1).reshape(count, -1).cpu().numpy()


def quantize_q5_k(rows: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 rows [R, n] (n a multiple of 256) -> Q5_K bytes [R, n / 256 * 176], as llama.cpp's
    quantize_row_q5_K_ref (make_qkx2_quants with nmax 31, rmin -0.5, rdelta 0.1, 15 steps)."""
    head, levels, count = _quantize_k(rows, 31, -0.5, 15, "Q5_K")
    blocks = levels.shape[0]
    fifth = (levels >> 4).to(torch.uint8)  # [blocks, 8, 32]: bit s of qh[j] is sub-block s's value j
    qh = torch.zeros(blocks, 32, dtype=torch.uint8, device=levels.device)
    for s in range(8):
        qh |= fifth[:, s] << s
    low = (levels & 0x0F).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat((head, qh, qs), -1).reshape(count, -1).cpu().numpy()

