"""Muon for the hidden matrices, batched: torch's ``torch.optim.Muon`` update, one Newton-Schulz
iteration for every matrix of a shape at once.

``torch.optim.Muon`` orthogonalises each 2-D parameter's momentum on its own (a Python loop of
small bf16 matmuls) and takes only 2-D parameters. Here the same update (``lerp`` momentum with
Nesterov, the quintic Newton-Schulz iteration in bfloat16 with torch's coefficients, decoupled
weight decay, torch's ``adjust_lr_fn`` scalings) runs on stacks of same-shaped matrices, and a
parameter may be several matrices stored in one tensor (MegaBlocks' stacked experts ``w1``/``w2``
[E*F, H] are E matrices [F, H], each orthogonalised on its own, as a per-expert Linear would be).
On a 2-core CPU this halves the optimizer's time for the tiny transformer's 52 matrices.

Which parameters take Muon and which AdamW is ``training.loop.muon_parameters``'s choice (the
usual one: the matrices inside the transformer blocks; embeddings, input/output projections, norms,
biases and the tag heads stay on AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's (Keller Jordan's quintic)


def newton_schulz(stack: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS) -> torch.Tensor:
    """The orthogonalised [..., A, B] stack (each matrix on its own), as torch's
    ``_zeropower_via_newtonschulz`` computes it for one matrix: in bfloat16, scaled by its
    Frobenius norm first."""
    a, b, c = coefficients
    x = stack.bfloat16()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.transpose(-2, -1)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(-2, -1) if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """torch.optim.Muon's per-shape scaling of the learning rate."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class MuonWithAdamW(torch.optim.AdamW):
    """AdamW whose groups marked ``muon=True`` take torch's Muon update instead, batched by shape.

    One optimizer (one ``state_dict``, per-group learning rates for a schedule), as Muon's own
    reference pairs it with an auxiliary AdamW. A Muon group's settings: ``momentum`` (0.95),
    ``nesterov`` (True), ``ns_steps`` (5), ``ns_eps`` (1e-7), ``adjust_lr_fn`` ("match_rms_adamw": the
    AdamW learning rate and weight decay carry over) and ``matrices`` (1; M splits each parameter
    [M*A, B] into M matrices [A, B]); its ``lr`` and ``weight_decay`` are used as torch.optim.Muon uses
    them. The other groups are AdamW's (``fused`` etc. as AdamW takes them).
    """

    MUON_DEFAULTS = {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "ns_eps": 1e-7,
                     "adjust_lr_fn": "match_rms_adamw", "matrices": 1}

    def __init__(self, params: Iterable, **adamw):
        super().__init__(params, **adamw)
        # A GradScaler must unscale the gradients itself: the Muon groups do not read fused AdamW's grad_scale.
        self._step_supports_amp_scaling = False

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("muon"):
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            param_group = {**self.MUON_DEFAULTS, **param_group, "params": params}
            for param in params:
                if param.ndim != 2 or param.shape[0] % param_group["matrices"]:
                    raise ValueError(f"a Muon group takes 2-D parameters of {param_group['matrices']} stacked "
                                     f"matrices, got shape {tuple(param.shape)}")
        else:
            param_group = {**param_group, "muon": False}
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        # AdamW's upgrade of loaded state expects its own per-parameter state: show it only its groups.
        groups = state["param_groups"]
        super().__setstate__({**state, "param_groups": [g for g in groups if not g.get("muon")]})
        self.param_groups = groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step([g for g in self.param_groups if g["muon"]])
        # AdamW's own step, without the hook-and-profiler wrapper torch puts on the first optimizer class it
        # builds (this step already runs inside it when it is this class's; step hooks must run once).
        adamw_step = torch.optim.AdamW.step
        if getattr(adamw_step, "hooked", False):
            adamw_step = adamw_step.__wrapped__
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g["muon"]]
        try:
            adamw_step(self)
        finally:
            self.param_groups = groups
        return loss

    def _muon_step(self, groups: list[dict]) -> None:
        # Every matrix of one shape and one group goes through one Newton-Schulz iteration.
        batches: dict[tuple, list[tuple[nn.Parameter, torch.Tensor, dict]]] = {}
        for index, group in enumerate(groups):
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(param.grad, 1 - group["momentum"])
                update = param.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                m = group["matrices"]
                shape = (param.shape[0] // m, param.shape[1])
                batches.setdefault((shape, index, param.device), []).append((param, update.view(m, *shape), group))
        for (shape, _, _), items in batches.items():
            group = items[0][2]
            ortho = newton_schulz(torch.cat([u for _, u, _ in items]), group["ns_steps"], group["ns_eps"])
            step = adjusted_lr(group["lr"], group["adjust_lr_fn"], *shape)
            start = 0
            for param, update, _ in items:
                part = ortho[start:start + update.shape[0]].reshape(param.shape)
                start += update.shape[0]
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(part.to(param.dtype), alpha=-step)
