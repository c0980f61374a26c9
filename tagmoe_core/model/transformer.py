"""Build a TAG-MoE transformer from diffusers' ``QwenImageTransformer2DModel``.

TAG-MoE = Qwen-Image with ``img_mlp`` of the last N blocks swapped for a MegaBlocks-layout
MoE layer, plus two modules used in training (``tag_embedding``, ``router_head``) that the
release checkpoint carries. Works for any config size: the 60-block release and tiny ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import QwenImageTransformer2DModel
from torch import nn

from ..taxonomy import NUM_TAGS
from .moe import Backend, MoESpec, TagMoEFeedForward, moe_layers
from .rope import TagMoERope
from .tag_heads import SEMANTIC_DIM, RouterHead

def convert_to_tagmoe(transformer: QwenImageTransformer2DModel, spec: MoESpec = MoESpec(),
                      backend: Backend = "auto", moe_blocks: list[int] | None = None) -> QwenImageTransformer2DModel:
    """Swap ``img_mlp`` of the MoE blocks for :class:`TagMoEFeedForward` and attach the tag modules.

    New modules are created on the device and dtype of the layer they replace (the meta device
    when building for loading). ``moe_blocks`` overrides ``spec.num_moe_blocks`` (any block set).
    """
    blocks = transformer.transformer_blocks
    indices = list(moe_blocks) if moe_blocks is not None else list(spec.block_indices(len(blocks)))
    ref = transformer.img_in.weight
    kw = {"device": ref.device, "dtype": ref.dtype}
    hidden = transformer.inner_dim
    for index in indices:
        block = blocks[index]
        if isinstance(block.img_mlp, TagMoEFeedForward):
            continue
        layer = TagMoEFeedForward(hidden, spec, backend=backend, layer_index=index, **kw)
        if ref.device.type != "meta":
            layer.reset_parameters()
        block.img_mlp = layer
    transformer.tag_embedding = nn.Embedding(NUM_TAGS, SEMANTIC_DIM, **kw)
    transformer.router_head = RouterHead(spec.num_experts, **kw)
    if not isinstance(transformer.pos_embed, TagMoERope):
        transformer.pos_embed = TagMoERope.like(transformer.pos_embed)
    return transformer


def build_tagmoe_transformer(config: Mapping[str, Any], spec: MoESpec = MoESpec(), backend: Backend = "auto",
                             moe_blocks: list[int] | None = None, device: str | torch.device = "meta",
                             dtype: torch.dtype = torch.float32) -> QwenImageTransformer2DModel:
    """A TAG-MoE transformer for a Qwen-Image transformer ``config`` (a config.json dict).

    On the meta device (the default) no memory is allocated: weights are then assigned by the
    loader. On a real device it is randomly initialised (for tests and benchmarks).
    """
    device = torch.device(device)
    # init_empty_weights puts parameters on the meta device but leaves plain tensors (the RoPE
    # tables) real, unlike a torch.device("meta") context.
    with init_empty_weights() if device.type == "meta" else contextlib.nullcontext():
        model = QwenImageTransformer2DModel.from_config(dict(config))
    # nn.Module.to: ModelMixin.to warns about dtype casts that from_pretrained would do differently.
    model = nn.Module.to(model, dtype=dtype) if device.type == "meta" else nn.Module.to(model, device, dtype)
    model.eval().requires_grad_(False)
    return convert_to_tagmoe(model, spec, backend=backend, moe_blocks=moe_blocks)


def moe_summary(transformer: nn.Module) -> dict[str, Any]:
    layers = moe_layers(transformer)
    if not layers:
        return {"moe_blocks": [], "num_experts": 0, "top_k": 0}
    return {
        "moe_blocks": [layer.layer_index for layer in layers],
        "num_experts": layers[0].num_experts,
        "top_k": layers[0].top_k,
        "ffn_hidden_size": layers[0].ffn_hidden_size,
        "backend": layers[0].backend,
    }
