"""MegaBlocks expert kernels behind a :class:`~tagmoe_core.model.moe.TagMoEFeedForward`.

Only imported when MegaBlocks is importable (CUDA). The routing is computed by our layer (the
same math as MegaBlocks' ``LearnedRouter`` in eval mode, plus the optional tag-guidance bias);
MegaBlocks' ``ParallelDroplessMLP`` runs the experts on *our* parameters (tied, not copied), so
both backends always see the same weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the layer imports this module; this one only needs its type
    from .moe import TagMoEFeedForward


def megablocks_experts_for(layer: TagMoEFeedForward) -> nn.Module:
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import ParallelDroplessMLP

    args = Arguments(
        hidden_size=layer.hidden_size,
        ffn_hidden_size=layer.ffn_hidden_size,
        num_layers=1,
        bias=True,
        return_bias=True,
        activation_fn=layer.activation,
        moe_num_experts=layer.num_experts,
        moe_top_k=layer.top_k,
        moe_loss_weight=0.0,
        mlp_type="mlp",
        mlp_impl="grouped",
        shared_expert=False,
        moe_expert_model_parallelism=False,
        fp16=False,
        bf16=True,  # grouped_gemm's kernels take bf16 only; the layer checks before choosing MegaBlocks
        device=torch.device("meta"),
    )
    experts = ParallelDroplessMLP(args)
    experts.eval()
    tie_parameters(experts, layer)
    return experts


def tie_parameters(experts: nn.Module, layer: TagMoEFeedForward) -> None:
    """Point MegaBlocks' parameters at ours (same names and shapes by construction)."""
    experts.mlp.w1 = layer.experts.mlp.w1
    experts.mlp.w2 = layer.experts.mlp.w2
    experts.bias = layer.experts.bias
