"""The TAG-MoE layer made of plain Linear modules: a router and one Linear pair per expert.

Same routing and math as :class:`~.moe.TagMoEFeedForward` (shared :func:`~.moe.route_logits`,
:func:`~.moe.dispatch`, :func:`~.moe.combine`); what differs is the parameter layout, built
from any ``Linear`` class (``linear_cls``). Given ComfyUI's ``operations.Linear`` the layer
inherits everything ComfyUI does to Linear weights (partial loading with cast-on-forward, fp8
storage, LoRA patches, async offload), and an expert that receives no token is never called, so
its weights are never moved. Its parameters (``split_experts`` in ``expert_layout`` maps the
release's keys onto them)::

    router.weight           [E, H]   logits = x @ W.T (MegaBlocks' router.layer.weight)
    experts.{e}.w1.weight   [F, H]   rows e*F..(e+1)*F of experts.mlp.w1
    experts.{e}.w2.weight   [H, F]   rows e*F..(e+1)*F of experts.mlp.w2, transposed

``experts.bias`` has no place here: the reference never adds it.
"""

from __future__ import annotations

import torch
from torch import nn

from .moe import ACTIVATIONS, combine, dispatch, route_logits


class ExpertMLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str, linear_cls: type[nn.Module],
                 device=None, dtype=None):
        super().__init__()
        self.w1 = linear_cls(hidden_size, ffn_hidden_size, bias=False, device=device, dtype=dtype)
        self.w2 = linear_cls(ffn_hidden_size, hidden_size, bias=False, device=device, dtype=dtype)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.activation(self.w1(x)))


class LinearExpertsMoE(nn.Module):
    """Drop-in replacement for a Qwen-Image block's ``img_mlp``: tokens [..., H] -> [..., H]."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int = 1,
                 activation: str = "gelu_tanh", layer_index: int = -1, linear_cls: type[nn.Module] = nn.Linear,
                 device=None, dtype=None, router_dtype=None):
        super().__init__()
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.num_experts, self.top_k, self.layer_index = num_experts, top_k, layer_index
        # router_dtype: the router may be stored finer than the experts (fp8 experts, bf16 router:
        # its logits choose the expert, and 3 mantissa bits would change routes; it is tiny)
        self.router = linear_cls(hidden_size, num_experts, bias=False, device=device, dtype=router_dtype or dtype)
        self.experts = nn.ModuleList(ExpertMLP(hidden_size, ffn_hidden_size, activation, linear_cls, device, dtype)
                                     for _ in range(num_experts))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, ffn={self.ffn_hidden_size}, experts={self.num_experts}, top_k={self.top_k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        _, weights, experts = route_logits(self.router(x2d), self.top_k, self.layer_index, shape)
        d = dispatch(experts, self.num_experts)
        xs = x2d.index_select(0, d.token_of_pair)
        parts, start = [], 0
        for expert, count in enumerate(d.counts.tolist()):  # one host sync; idle experts are never called
            if count:
                parts.append(self.experts[expert](xs[start:start + count]))
                start += count
        ys = torch.cat(parts) if parts else x2d.new_empty(0, shape[-1])
        return combine(ys, weights, d).view(shape)
