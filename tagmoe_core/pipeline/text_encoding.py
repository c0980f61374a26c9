"""Prompt encoding with Qwen2.5-VL, as Qwen-Image and the TAG-MoE reference do it.

The prompt is wrapped in Qwen-Image's text-to-image chat template, run through the language
model, and the last hidden state is kept without the template's system prefix (34 tokens
with Qwen's tokenizer; counted from the tokenizer here so tiny test tokenizers work too).
The image-aware variant (the reference's ``use_vlm``) also shows the condition image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import InputError
from ..intent.chat_template import QWEN_VL_CHAT_TEMPLATE
from ..intent.vlm import vlm_image, vlm_inputs
from ..runtime.devices import module_device

log = logging.getLogger("tagmoe")

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
MAX_PROMPT_TOKENS = 1024
VLM_EXTRA_TOKENS = 374  # the reference's allowance for image tokens in the image-aware variant
EMPTY_NEGATIVE = " "  # an empty negative prompt is encoded as a single space


@dataclass
class PromptEmbeds:
    """Hidden states [B, L, D] and mask [B, L] (1 = token) of encoded prompts."""

    embeds: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds.to(device=device, dtype=dtype), self.mask.to(device=device))

    def repeat(self, n: int) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds.repeat_interleave(n, dim=0), self.mask.repeat_interleave(n, dim=0))

    @property
    def fully_valid(self) -> bool:
        return bool(self.mask.all())


def normalize_negative_prompt(text: str | None) -> str:
    return text if text is not None and str(text).strip() else EMPTY_NEGATIVE


def template_prefix_length(tokenizer) -> int:
    """Tokens of the template before the user's text (34 for Qwen's tokenizer)."""
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])


def _language_model(text_encoder: torch.nn.Module) -> torch.nn.Module:
    # Qwen2_5_VLForConditionalGeneration.model is the decoder without the LM head; its last
    # hidden state is the (final-normed) hidden_states[-1] the reference reads.
    return getattr(text_encoder, "model", text_encoder)


def _split_and_pad(hidden: torch.Tensor, mask: torch.Tensor, drop: int) -> PromptEmbeds:
    rows = [h[m.bool()][drop:] for h, m in zip(hidden, mask)]
    length = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
    out_mask = torch.stack([torch.cat([torch.ones(r.shape[0], dtype=torch.long, device=r.device),
                                       torch.zeros(length - r.shape[0], dtype=torch.long, device=r.device)])
                            for r in rows])
    return PromptEmbeds(embeds, out_mask)


def prompt_tokens(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token ids and attention mask [B, L] of ``prompts`` in the template, and the prefix length.

    The encoder takes ``MAX_PROMPT_TOKENS`` tokens after the template's prefix (the reference's
    ``max_length``). A longer prompt is cut at the end of the user's text, keeping the template's
    closing tokens (``<|im_end|>\n<|im_start|>assistant\n``), with a warning; the reference's
    tokenizer call cut the closing tokens as well, silently. Prompts within the limit get the
    tokens (and the padding) that call gives."""
    drop = template_prefix_length(tokenizer)
    closing = tokenizer(PROMPT_TEMPLATE.split("{}")[1], add_special_tokens=False)["input_ids"]
    keep = MAX_PROMPT_TOKENS - len(closing)  # tokens of the user's text that fit
    rows = []
    for prompt, ids in zip(prompts, tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts])["input_ids"]):
        user = len(ids) - drop - len(closing)
        if user > keep:
            if list(ids[-len(closing):]) != list(closing):  # a tokenizer merging across the template's end
                raise InputError(f"the prompt is {user} tokens, more than the {keep} the text encoder takes; "
                                 "shorten it")
            log.warning("the prompt is %d tokens; the text encoder takes %d, so its end is cut (%r ...)", user, keep,
                        prompt[:40])
            ids = list(ids[:drop + keep]) + list(closing)
        rows.append(list(ids))
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return input_ids, mask, drop


@torch.inference_mode()
def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> PromptEmbeds:
    """Qwen-Image text embeddings of ``prompts`` (the reference's ``_get_qwen_prompt_embeds``;
    over-long prompts: see :func:`prompt_tokens`)."""
    input_ids, mask, drop = prompt_tokens(tokenizer, prompts)
    device = module_device(text_encoder)
    input_ids, mask = input_ids.to(device), mask.to(device)
    out = _language_model(text_encoder)(input_ids=input_ids, attention_mask=mask)
    return _split_and_pad(out.last_hidden_state, mask, drop)


@torch.inference_mode()
def encode_prompt_with_image(text_encoder, tokenizer, image_processor, prompt: str, image: Image.Image) -> PromptEmbeds:
    """The image-aware variant (the reference's ``_get_qwenvl_prompt_embeds``), reproduced as
    released: the system message holds the whole text template (placeholder included), the
    chat template wraps it again, and the first 34-equivalent tokens are dropped."""
    drop = template_prefix_length(tokenizer)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": PROMPT_TEMPLATE}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
    ]
    template = None if getattr(tokenizer, "chat_template", None) else QWEN_VL_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, add_vision_id=True,
                                         chat_template=template)
    device = module_device(text_encoder)
    inputs = vlm_inputs(tokenizer, image_processor, text, [vlm_image(image)],
                        max_length=MAX_PROMPT_TOKENS + drop + VLM_EXTRA_TOKENS, device=device)
    inputs["pixel_values"] = inputs["pixel_values"].to(text_encoder.dtype)
    out = _language_model(text_encoder)(**inputs)
    return _split_and_pad(out.last_hidden_state, inputs["attention_mask"], drop)
