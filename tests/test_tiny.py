"""The embedded tiny model: real layouts, deterministic bytes."""

from __future__ import annotations

import hashlib
import json

import pytest

from tagmoe_core.tiny import SPECIAL_TOKENS, build_tiny_bundle


def digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_same_seed_same_bytes(tiny_bundle, tmp_path):
    again = build_tiny_bundle(tmp_path / "again", seed=0)
    assert digest(again.root) == digest(tiny_bundle.root)
    other = build_tiny_bundle(tmp_path / "other", seed=1)
    changed = {k for k, v in digest(other.root).items() if digest(tiny_bundle.root).get(k) != v}
    assert any(k.endswith(".safetensors") for k in changed)


def test_base_is_a_diffusers_qwen_image_folder(tiny_bundle):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_bundle.base)
    assert type(pipe).__name__ == "QwenImagePipeline"
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(pipe.tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(pipe.vae).__name__ == "AutoencoderKLQwenImage"
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder.config.text_config.hidden_size


def test_tokenizer_has_qwen_special_tokens(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    for token in SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids)[0] == token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    config = tiny_pipe.text_encoder.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_tagmoe_weights_in_release_layout(tiny_bundle):
    folder = tiny_bundle.tagmoe / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1  # sharded
    for block in (2, 3):
        for name in ("router.layer.weight", "experts.mlp.w1", "experts.mlp.w2", "experts.bias"):
            assert f"transformer_blocks.{block}.img_mlp.{name}" in keys
    assert "transformer_blocks.1.img_mlp.net.0.proj.weight" in keys  # dense blocks stay dense
    assert {"tag_embedding.weight", "router_head.net.0.weight", "router_head.net.4.bias"} <= keys


def test_transformer_config_override_builds_a_wider_bundle_that_loads(tmp_path):
    """scripts/train_tiny.py starts from a wider transformer: both folders carry it and the core loads it."""
    import torch

    from tagmoe_core.pipeline.builder import load_pipeline

    wide = {"num_attention_heads": 4, "attention_head_dim": 32, "axes_dims_rope": [8, 12, 12]}
    bundle = build_tiny_bundle(tmp_path / "wide", seed=0, transformer_config=wide)
    for folder in (bundle.base / "transformer", bundle.tagmoe / "transformer"):
        config = json.loads((folder / "config.json").read_text())
        assert {k: config[k] for k in wide} == wide
    pipe = load_pipeline(bundle.base, bundle.tagmoe, device="cpu", dtype=torch.float32, backend="torch",
                         placement="single")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.shape == (128, 128)
    assert pipe.transformer.transformer_blocks[-1].img_mlp.experts.mlp.w1.shape[-1] == 128


def test_a_corpus_teaches_the_tokenizer_the_task_sets_words_and_keeps_the_template_prefix(tiny_pipe):
    """The default tokenizer spells most synthetic-task words letter by letter ("yellow" in 5 tokens): a tiny
    model trained on them gets a tokenizer that also learnt the task set's instructions."""
    from tagmoe_core.pipeline.text_encoding import PROMPT_TEMPLATE
    from tagmoe_core.tiny import train_tokenizer
    from tagmoe_core.training.synthetic import COLOURS, SHAPES, instructions

    corpus = instructions()
    assert "Change the background to yellow" in corpus and "A purple square on a white background" in corpus
    taught, default = train_tokenizer(corpus=corpus), tiny_pipe.tokenizer
    words = [" " + w for w in (*COLOURS, *SHAPES, "background", "whole")] + ["Invert", "Remove"]
    assert [w for w in words if len(taught.tokenize(w)) != 1] == []
    assert len(default.tokenize(" yellow")) > 1  # what the corpus is for
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    assert len(taught(prefix)["input_ids"]) == len(default(prefix)["input_ids"]) == 34
    assert train_tokenizer().get_vocab() == default.get_vocab()  # no corpus: the random bundle's tokenizer
