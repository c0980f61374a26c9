"""Every weight-adapter spelling ComfyUI loads names the module it patches (the LoRA report of TAG-MoE
LoRA Loader reads the modules from these)."""

from __future__ import annotations

import pytest

from tagmoe_core.model.lora_keys import lora_stem

STEM = "transformer.transformer_blocks.0.attn.to_q"
# The keys of one module in each format of ComfyUI's comfy/weight_adapter (lora.py, loha.py, lokr.py,
# glora.py, oft.py, boft.py) and its plain diffs.
FORMATS = {
    "regular": ["lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "reshape_weight"],
    "diffusers": ["_lora.up.weight", "_lora.down.weight"],
    "diffusers2": ["lora_B.weight", "lora_A.weight"],
    "diffusers3": ["lora.up.weight", "lora.down.weight"],
    "mochi": ["lora_B", "lora_A"],
    "transformers": ["lora_linear_layer.up.weight", "lora_linear_layer.down.weight"],
    "peft default (Qwen)": ["lora_B.default.weight", "lora_A.default.weight"],
    "loha": ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"],
    "lokr": ["lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"],
    "glora": ["a1.weight", "a2.weight", "b1.weight", "b2.weight"],
    "oft": ["oft_blocks", "oft_diag", "rescale"],
    "diff": ["diff", "diff_b", "set_weight", "w_norm", "b_norm", "weight", "bias"],
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_adapter_format_names_its_module(name):
    keys = [STEM + (s if s.startswith("_") else "." + s) for s in FORMATS[name]]
    assert {lora_stem(k) for k in keys} == {STEM}, [(k, lora_stem(k)) for k in keys]


def test_module_names_that_look_like_suffixes_stay_whole():
    # the last dotted part is cut only when it is an adapter's: a module called "lora" or "alpha_proj" stays
    assert lora_stem("blocks.0.lora.lora_A.weight") == "blocks.0.lora"
    assert lora_stem("blocks.0.alpha_proj.lora_B.default.weight") == "blocks.0.alpha_proj"
    assert lora_stem("blocks.0.proj_lora.up.weight") == "blocks.0.proj"
