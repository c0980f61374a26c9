"""The two modules TAG-MoE trained beside the transformer and the release checkpoint carries:
``tag_embedding`` (one 512-dim row per task tag) and ``router_head`` (routing signature g [E] ->
the same semantic space). Inference runs without them; routing analysis and tag guidance use them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..taxonomy import NUM_TAGS

SEMANTIC_DIM = 512
ROUTER_HEAD_HIDDEN = 256
PREFIXES = ("tag_embedding.", "router_head.")


class RouterHead(nn.Module):
    """``router_head``: routing signature g [.., E] -> semantic space [.., 512] (Linear-GELU x2-Linear)."""

    def __init__(self, num_experts: int = 4, semantic_dim: int = SEMANTIC_DIM, hidden_dim: int = ROUTER_HEAD_HIDDEN,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.net = nn.Sequential(
            nn.Linear(num_experts, hidden_dim, **kw),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim, **kw),
            nn.GELU(),
            nn.Linear(hidden_dim, semantic_dim, **kw),
        )

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.net(g)


class TagHeads(nn.Module):
    """``tag_embedding`` and ``router_head`` on their own (the ComfyUI path keeps them beside the
    diffusion model, which holds only what denoising needs). Same attribute names as on the
    diffusers transformer, so the routing analysis reads either."""

    def __init__(self, num_experts: int = 4, device=None, dtype=None):
        super().__init__()
        self.tag_embedding = nn.Embedding(NUM_TAGS, SEMANTIC_DIM, device=device, dtype=dtype)
        self.router_head = RouterHead(num_experts, device=device, dtype=dtype)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "TagHeads":
        """From ``tag_embedding.*`` / ``router_head.*`` tensors (float32, CPU: they are tiny)."""
        num_experts = state["router_head.net.0.weight"].shape[1]
        heads = cls(num_experts)
        heads.load_state_dict({k: v.float() for k, v in state.items()})
        return heads.eval().requires_grad_(False)
