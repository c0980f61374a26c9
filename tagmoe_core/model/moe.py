"""The TAG-MoE feed-forward layer: MegaBlocks ``dMoE`` parameters and math, in plain PyTorch.

Parameter names and shapes are exactly those of MegaBlocks 0.10 ``dMoE`` with
``mlp_type="mlp"``, ``mlp_impl="grouped"`` (what the TAG-MoE release trains), so a release
checkpoint loads with no key remapping::

    router.layer.weight   [E, H]      logits = x @ W.T            (no bias)
    experts.mlp.w1        [E*F, H]    h_e = act(x @ w1_e.T)        (rows e*F..(e+1)*F)
    experts.mlp.w2        [E*F, H]    y_e = h_e @ w2_e             (not transposed)
    experts.bias          [H]         kept in the state dict, never added (see below)

Routing follows ``LearnedRouter`` in eval mode: softmax over the logits in the input dtype,
top-1 by ``max`` (ties go to the lowest expert index), top-k>1 by ``topk``, and each expert
output scaled by its raw softmax probability (no renormalisation). ``dMoE.forward`` returns
``(out, bias)`` with ``out`` excluding ``experts.bias``; the reference keeps only ``out``, so
this layer returns ``out`` and the trained bias is never added.

The routing and the token bookkeeping (:func:`route_logits`, :func:`dispatch`, :func:`combine`) are
shared with ``moe_linear.LinearExpertsMoE``, the same layer made of one Linear pair per expert
(what ComfyUI's memory management needs); only how each expert's matmuls run differs.

Backends: ``torch`` (dropless: sort tokens by expert, one matmul per expert, scatter back;
CPU and GPU) and ``megablocks`` (MegaBlocks' grouped-GEMM expert kernels on CUDA, used only
when MegaBlocks is already importable). ``auto`` picks MegaBlocks for CUDA inputs when it can.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TagMoEError
from .run_state import current_routing

Backend = Literal["auto", "torch", "megablocks"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "megablocks")

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
}


@dataclass(frozen=True)
class MoESpec:
    """Shape of the MoE part of a TAG-MoE transformer (the release: 4 experts, top-1, last 10)."""

    num_experts: int = 4
    top_k: int = 1
    num_moe_blocks: int = 10
    ffn_hidden_size: int | None = None  # None: 4 x hidden, like Qwen-Image's dense FFN
    activation: str = "gelu_tanh"

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise TagMoEError(f"num_experts must be at least 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise TagMoEError(f"top_k must be between 1 and num_experts={self.num_experts}, got {self.top_k}")
        if self.num_moe_blocks < 0:
            raise TagMoEError(f"num_moe_blocks must be >= 0, got {self.num_moe_blocks}")
        if self.activation not in ACTIVATIONS:
            raise TagMoEError(f"unknown activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}")

    def ffn_size(self, hidden_size: int) -> int:
        return self.ffn_hidden_size or 4 * hidden_size

    def block_indices(self, num_layers: int) -> range:
        if self.num_moe_blocks > num_layers:
            raise TagMoEError(f"num_moe_blocks={self.num_moe_blocks} exceeds the transformer's {num_layers} blocks")
        return range(num_layers - self.num_moe_blocks, num_layers)


def route_logits(logits: torch.Tensor, top_k: int, layer_index: int,
                 input_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> softmax scores [N, E], top weights [N, k], top expert ids [N, k].

    The run's logit bias (tag guidance) is added first and its observer (routing analysis) sees
    the result; both come from :func:`~.run_state.current_routing`, so a plain run pays nothing.
    """
    run = current_routing()
    if run.logit_bias is not None:
        logits = logits + run.logit_bias.to(device=logits.device, dtype=logits.dtype)
    scores = logits.softmax(dim=-1)
    if top_k == 1:
        weights, experts = scores.max(dim=-1, keepdim=True)
    else:
        weights, experts = torch.topk(scores, top_k, dim=-1)
    if run.observer is not None:
        run.observer(layer_index, scores, experts, weights, input_shape)
    return scores, weights, experts


@dataclass(frozen=True)
class Dispatch:
    """(token, expert) pairs stably sorted by expert: ``token_of_pair[i]`` is the token of the
    i-th pair, ``counts[e]`` how many pairs expert e got (its rows are contiguous)."""

    order: torch.Tensor
    counts: torch.Tensor
    token_of_pair: torch.Tensor
    num_tokens: int
    top_k: int


def dispatch(experts: torch.Tensor, num_experts: int) -> Dispatch:
    num_tokens, top_k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # scatter_add instead of bincount: same counts, a shape torch.compile knows (bincount's depends on the data)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    token_of_pair = order // top_k if top_k > 1 else order
    return Dispatch(order, counts, token_of_pair, num_tokens, top_k)


def combine(ys: torch.Tensor, weights: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """Scale every pair's expert output by its routing weight and put it back at its token
    (summed over the k experts of a token)."""
    ys = ys * weights.reshape(-1).index_select(0, d.order).unsqueeze(1).to(ys.dtype)
    if d.top_k == 1:
        return torch.empty_like(ys).index_copy_(0, d.token_of_pair, ys)
    out = torch.zeros(d.num_tokens, ys.shape[1], dtype=ys.dtype, device=ys.device)
    return out.index_add_(0, d.token_of_pair, ys)


class Router(nn.Module):
    """MegaBlocks ``LearnedRouter`` layout: ``layer`` = Linear(hidden, experts, bias=False)."""

    def __init__(self, hidden_size: int, num_experts: int, device=None, dtype=None):
        super().__init__()
        self.layer = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)


class ExpertWeights(nn.Module):
    """MegaBlocks ``GroupedMLP`` layout: all experts' weights stacked row-wise."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden_size, ffn_hidden_size
        rows = num_experts * ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(rows, hidden_size, device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(rows, hidden_size, device=device, dtype=dtype))

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``w1`` as [E, H, F] (so that ``x @ w1[e]`` is ``x @ w1_e.T``) and ``w2`` as [E, F, H]."""
        w1 = self.w1.view(self.num_experts, self.ffn_hidden_size, self.hidden_size).transpose(1, 2)
        w2 = self.w2.view(self.num_experts, self.ffn_hidden_size, self.hidden_size)
        return w1, w2


class Experts(nn.Module):
    """MegaBlocks ``ParallelDroplessMLP`` layout: ``mlp`` plus the (unused) output ``bias``."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, device=None, dtype=None):
        super().__init__()
        self.mlp = ExpertWeights(num_experts, hidden_size, ffn_hidden_size, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))


class TagMoEFeedForward(nn.Module):
    """Drop-in replacement for a Qwen-Image block's ``img_mlp``: tokens [..., H] -> [..., H]."""

    def __init__(self, hidden_size: int, spec: MoESpec = MoESpec(), backend: Backend = "auto",
                 layer_index: int = -1, device=None, dtype=None):
        super().__init__()
        if backend not in BACKENDS:
            raise TagMoEError(f"unknown MoE backend {backend!r}; choose from {', '.join(BACKENDS)}")
        ffn = spec.ffn_size(hidden_size)
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn
        self.num_experts, self.top_k = spec.num_experts, spec.top_k
        self.activation_name = spec.activation
        self.activation = ACTIVATIONS[spec.activation]
        self.backend: Backend = backend
        self.layer_index = layer_index
        self.router = Router(hidden_size, spec.num_experts, device=device, dtype=dtype)
        self.experts = Experts(spec.num_experts, hidden_size, ffn, device=device, dtype=dtype)
        self._megablocks: nn.Module | None = None

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, ffn={self.ffn_hidden_size}, experts={self.num_experts}, "
                f"top_k={self.top_k}, backend={self.backend}")

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """MegaBlocks' initialisation (router xavier-uniform, w1 xavier over [E,F,H], w2 N(0, 0.02))."""
        _xavier_uniform(self.router.layer.weight, generator)
        w1 = self.experts.mlp.w1.view(self.num_experts, self.ffn_hidden_size, self.hidden_size)
        _xavier_uniform(w1, generator)
        self.experts.mlp.w2.normal_(0.0, 0.02, generator=generator)
        self.experts.bias.zero_()

    def route(self, x2d: torch.Tensor, input_shape: torch.Size | None = None):
        """Softmax scores [N, E], top weights [N, k] and top expert ids [N, k] of tokens [N, H]."""
        return route_logits(self.router.layer(x2d), self.top_k, self.layer_index,
                            x2d.shape if input_shape is None else input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        scores, weights, experts = self.route(x2d, shape)
        if self._use_megablocks(x2d):
            out = self._megablocks_experts(x2d, scores, weights, experts)
        else:
            w1, w2 = self.experts.mlp.stacked()
            out = dropless_moe(x2d, weights, experts, w1, w2, self.activation)
        return out.view(shape)

    # -- MegaBlocks backend -------------------------------------------------------------------
    def _use_megablocks(self, x: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        usable = x.is_cuda and x.dtype == torch.bfloat16 and megablocks_available()
        if self.backend == "megablocks" and not usable:
            raise TagMoEError(
                "the MegaBlocks MoE backend needs CUDA, bfloat16 (its grouped GEMM kernels take nothing else) and "
                f"an importable megablocks package (here: {x.device.type}, {str(x.dtype).removeprefix('torch.')}); "
                "use backend 'torch' or 'auto'")
        return usable

    def _megablocks_experts(self, x2d, scores, weights, experts) -> torch.Tensor:
        from .moe_megablocks import megablocks_experts_for, tie_parameters

        if self._megablocks is None:
            # object.__setattr__: a cache, not a submodule (it must stay out of the state dict).
            object.__setattr__(self, "_megablocks", megablocks_experts_for(self))
        tie_parameters(self._megablocks, self)  # cheap; follows reloads and .to() of our params
        out = self._megablocks(x2d, scores, weights, experts)
        return out[0] if isinstance(out, tuple) else out  # (out, bias): the bias is never added


def dropless_moe(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Dropless top-k expert FFN: every routed (token, expert) pair is computed exactly once.

    ``x`` [N, H]; ``weights``/``experts`` [N, k]; ``w1`` [E, H, F]; ``w2`` [E, F, H].
    Pairs are stably sorted by expert, each expert runs one matmul over its contiguous group,
    outputs are scaled by the routing weight and scattered (summed for k > 1) back to tokens.
    """
    d = dispatch(experts, w1.shape[0])
    xs = x.index_select(0, d.token_of_pair)
    if _grouped_mm_ok(xs, w1):  # CUDA: two grouped GEMMs, no host sync (w1 [E,H,F] covers H and F)
        ys = grouped_matmul(activation(grouped_matmul(xs, w1, d.counts)), w2, d.counts)
    else:
        ys = expert_loop(xs, w1, w2, d.counts, activation)
    return combine(ys, weights, d)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` grouped contiguously by expert (``counts`` [E]) times ``b[e]`` ([E, K, N]),
    as one ``grouped_mm`` (no host sync)."""
    return F.grouped_mm(a, b, offs=torch.cumsum(counts, 0, dtype=torch.int32))


def expert_loop(xs: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Each expert's whole MLP on its contiguous group, one expert at a time: its hidden
    activations stay small and in cache (measured faster than two grouped phases on the CPU,
    and as fast as a dense FFN of the same active size)."""
    parts, start = [], 0
    for expert, count in enumerate(counts.tolist()):  # one host sync
        if count:
            group = xs[start:start + count]
            parts.append(activation(group @ w1[expert]) @ w2[expert])
            start += count
    return torch.cat(parts) if parts else xs.new_empty(0, w2.shape[2])


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch.nn.functional.grouped_mm: fp32/bf16, 16-byte aligned strides. On the CPU a loop of
    # plain matmuls is as fast (measured) and works for every dtype, so use it only on CUDA.
    if not (a.is_cuda and hasattr(F, "grouped_mm") and a.dtype in (torch.float32, torch.bfloat16)):
        return False
    size = a.element_size()
    aligned = all(d * size % 16 == 0 for d in (a.shape[1], b.shape[1], b.shape[2]))
    return aligned and _grouped_mm_supported(a.device, a.dtype)


@functools.cache
def _grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        a = torch.zeros(16, 16, device=device, dtype=dtype)
        b = torch.zeros(2, 16, 16, device=device, dtype=dtype)
        F.grouped_mm(a, b, offs=torch.tensor([8, 16], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


@functools.cache
def megablocks_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import megablocks.layers.dmoe  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (missing CUDA ops, torch pin) means "no"
        return False
    return True


def _xavier_uniform(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    weight.uniform_(-bound, bound, generator=generator)


def moe_layers(model: nn.Module) -> list[TagMoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, TagMoEFeedForward)]


def effective_backend(layer: TagMoEFeedForward, device: torch.device, dtype: torch.dtype) -> str:
    """What ``auto`` means for this layer when it runs on ``device`` in ``dtype``."""
    if layer.backend != "auto":
        return layer.backend
    return "megablocks" if device.type == "cuda" and dtype == torch.bfloat16 and megablocks_available() else "torch"


def set_backend(model: nn.Module, backend: Backend) -> None:
    if backend not in BACKENDS:
        raise TagMoEError(f"unknown MoE backend {backend!r}; choose from {', '.join(BACKENDS)}")
    for layer in moe_layers(model):
        layer.backend = backend
