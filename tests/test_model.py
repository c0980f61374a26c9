"""Building TAG-MoE transformers from Qwen-Image configs, tiny and full size."""

from __future__ import annotations

import json

import torch

from tagmoe_core.model.moe import MoESpec, TagMoEFeedForward
from tagmoe_core.model.rope import TagMoERope
from tagmoe_core.model.tag_heads import RouterHead
from tagmoe_core.model.transformer import build_tagmoe_transformer, moe_summary

QWEN_IMAGE_CONFIG = {  # Qwen/Qwen-Image transformer/config.json
    "_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
    "num_layers": 60, "out_channels": 16, "patch_size": 2,
}


def test_release_architecture_on_meta_device():
    model = build_tagmoe_transformer(QWEN_IMAGE_CONFIG, MoESpec(), device="meta", dtype=torch.bfloat16)
    summary = moe_summary(model)
    assert summary["moe_blocks"] == list(range(50, 60))
    assert summary["num_experts"] == 4 and summary["top_k"] == 1 and summary["ffn_hidden_size"] == 12288
    for i, block in enumerate(model.transformer_blocks):
        assert isinstance(block.img_mlp, TagMoEFeedForward) == (i >= 50)
        assert not isinstance(block.txt_mlp, TagMoEFeedForward)  # the text stream stays dense
    assert tuple(model.tag_embedding.weight.shape) == (18, 512)
    head = [tuple(p.shape) for p in model.router_head.parameters()]
    assert head == [(256, 4), (256,), (256, 256), (256,), (512, 256), (512,)]
    assert isinstance(model.pos_embed, TagMoERope)
    assert all(p.is_meta for p in model.parameters())

    # Parameter count: the dense Qwen-Image transformer plus, per MoE block, the experts beyond
    # the first (the dense FFN's biases are gone, a router and an unused output bias are new).
    dense = build_tagmoe_transformer(QWEN_IMAGE_CONFIG, MoESpec(num_moe_blocks=0), device="meta")
    n_dense = sum(p.numel() for n, p in dense.named_parameters() if not n.startswith(("tag_", "router_head")))
    n_moe = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("tag_", "router_head")))
    h, f = 3072, 12288
    per_block = (4 * 2 * f * h + 4 * h + h) - (2 * f * h + f + h)
    assert n_moe - n_dense == 10 * per_block
    assert 20.0e9 < n_dense < 20.8e9 and 22.0e9 < n_moe < 23.0e9  # ~20B dense, ~22B TAG-MoE


def test_tiny_config_any_block_set_and_forward(tiny_bundle):
    config = json.loads((tiny_bundle.base / "transformer" / "config.json").read_text())
    model = build_tagmoe_transformer(config, MoESpec(num_experts=3, top_k=2), moe_blocks=[0, 2], device="cpu")
    assert moe_summary(model)["moe_blocks"] == [0, 2]
    x = torch.randn(1, 12, 64)
    text = torch.randn(1, 5, config["joint_attention_dim"])
    out = model(hidden_states=x, timestep=torch.tensor([0.5]), encoder_hidden_states=text,
                img_shapes=[[(1, 3, 4)]], return_dict=False)[0]
    assert out.shape == (1, 12, 64) and torch.isfinite(out).all()


def test_router_head_maps_signature_to_semantic_space():
    head = RouterHead()
    assert head(torch.full((2, 4), 0.25)).shape == (2, 512)
