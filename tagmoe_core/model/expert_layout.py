"""The two key layouts of TAG-MoE's MoE layers, and the exact maps between them.

Release (MegaBlocks ``dMoE``, what the checkpoint ships)::

    {block}.img_mlp.router.layer.weight  [E, H]
    {block}.img_mlp.experts.mlp.w1       [E*F, H]   expert e: rows e*F..(e+1)*F, applied as x @ w1_e.T
    {block}.img_mlp.experts.mlp.w2       [E*F, H]   expert e: rows e*F..(e+1)*F, applied as h @ w2_e
    {block}.img_mlp.experts.bias         [H]        trained, never added by the reference

Per-expert Linear (``moe_linear.LinearExpertsMoE``, the ComfyUI path)::

    {block}.img_mlp.router.weight        [E, H]
    {block}.img_mlp.experts.{e}.w1.weight [F, H]   = w1_e
    {block}.img_mlp.experts.{e}.w2.weight [H, F]   = w2_e transposed

Every map here is a plan of :class:`Piece` s (a source key, a row range, a transpose), made from
key names and shapes only, so callers read each tensor once and lazily: the native loader streams
file by file and ``tagmoe convert`` writes one piece after another.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

_RELEASE = re.compile(r"^(?P<moe>(?:.*\.)?transformer_blocks\.\d+\.img_mlp)\."
                      r"(?P<part>router\.layer\.weight|experts\.mlp\.w1|experts\.mlp\.w2|experts\.bias)$")
_LINEAR = re.compile(r"^(?P<moe>(?:.*\.)?transformer_blocks\.\d+\.img_mlp)\."
                     r"(?:(?P<router>router\.weight)|experts\.(?P<expert>\d+)\.(?P<w>w1|w2)\.weight)$")

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` of ``source`` (all rows when None), transposed when ``transpose``."""

    source: str
    start: int | None = None
    stop: int | None = None
    transpose: bool = False

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.start is not None:
            tensor = tensor[self.start:self.stop]
        return tensor.T if self.transpose else tensor

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        rows = source_shape[0] if self.start is None else self.stop - self.start
        shape = (rows, *source_shape[1:])
        return tuple(reversed(shape)) if self.transpose else shape


def to_linear_experts(shapes: Shapes, num_experts: int) -> dict[str, Piece]:
    """Release layout -> per-expert Linear layout: for every key of the result, where it comes
    from. Keys outside the MoE layers map to themselves; ``experts.bias`` is left out."""
    plan: dict[str, Piece] = {}
    for key, shape in shapes.items():
        m = _RELEASE.match(key)
        if m is None:
            plan[key] = Piece(key)
            continue
        moe, part = m["moe"], m["part"]
        if part == "router.layer.weight":
            plan[f"{moe}.router.weight"] = Piece(key)
        elif part != "experts.bias":
            rows = shape[0] // num_experts
            name = part.rsplit(".", 1)[1]
            for e in range(num_experts):
                plan[f"{moe}.experts.{e}.{name}.weight"] = Piece(key, e * rows, (e + 1) * rows, transpose=name == "w2")
    return plan


def to_release(shapes: Shapes) -> dict[str, list[Piece]]:
    """Per-expert Linear layout -> release layout: every key of the result is the row-wise
    concatenation of its pieces (experts in order). ``experts.bias`` cannot be recovered (it is
    not kept by the per-expert layout) and is zero-filled by the caller if it wants one."""
    plan: dict[str, list[Piece]] = {}
    experts: dict[tuple[str, str], dict[int, Piece]] = {}
    for key in shapes:
        m = _LINEAR.match(key)
        if m is None:
            plan[key] = [Piece(key)]
        elif m["router"]:
            plan[f"{m['moe']}.router.layer.weight"] = [Piece(key)]
        else:
            experts.setdefault((m["moe"], m["w"]), {})[int(m["expert"])] = Piece(key, transpose=m["w"] == "w2")
    for (moe, w), pieces in sorted(experts.items()):
        order = sorted(pieces)
        if order != list(range(len(order))):
            raise ValueError(f"{moe}: experts {order} are not numbered 0..{len(order) - 1}")
        plan[f"{moe}.experts.mlp.{w}"] = [pieces[e] for e in order]
    return plan


def planned_shape(pieces: list[Piece] | Piece, shapes: Shapes) -> tuple[int, ...]:
    pieces = [pieces] if isinstance(pieces, Piece) else pieces
    parts = [p.shape(tuple(shapes[p.source])) for p in pieces]
    return (sum(s[0] for s in parts), *parts[0][1:])


def split_experts(state: Mapping[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """A whole release state dict in the per-expert Linear layout (views, no copies)."""
    plan = to_linear_experts({k: tuple(v.shape) for k, v in state.items()}, num_experts)
    return {key: piece.take(state[piece.source]) for key, piece in plan.items()}


def merge_experts(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole per-expert Linear state dict back in the release layout (``split_experts``'s inverse,
    without ``experts.bias``)."""
    plan = to_release({k: tuple(v.shape) for k, v in state.items()})
    return {key: torch.cat([p.take(state[p.source]) for p in pieces]) if len(pieces) > 1
            else pieces[0].take(state[pieces[0].source]) for key, pieces in plan.items()}
