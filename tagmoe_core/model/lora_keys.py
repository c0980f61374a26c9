"""What LoRA-style files append to a module name: the suffix of every weight-adapter format ComfyUI's
``comfy/weight_adapter`` loads (LoRA in its regular, diffusers, PEFT, transformers and mochi spellings,
LoHa, LoKr, GLoRA, OFT/BOFT, and the plain weight diffs), so that a file's keys can be told by the
module they patch."""

from __future__ import annotations

import re

SUFFIX = re.compile(
    r"(?:_lora\.(?:up|down)\.weight"  # diffusers: "{module}_lora.up.weight"
    r"|\.(?:lora_(?:up|down|A|B|mid)\.weight|lora_[AB]\.default\.weight|lora_[AB]|lora\.(?:up|down)\.weight"
    r"|lora_linear_layer\.(?:up|down)\.weight|alpha|dora_scale|diff|diff_b|set_weight|reshape_weight|w_norm|b_norm"
    r"|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2|[ab][12]\.weight|oft_blocks|oft_diag|rescale"
    r"|weight|bias))$")


def lora_stem(key: str) -> str:
    """The module a LoRA file's ``key`` patches (``transformer.blocks.0.attn.to_q.lora_A.default.weight`` ->
    ``transformer.blocks.0.attn.to_q``)."""
    return SUFFIX.sub("", key)
