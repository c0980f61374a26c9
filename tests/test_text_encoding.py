"""Prompt encoding limits on the tiny bundle's real tokenizer and text encoder: a prompt longer
than the encoder's 1024 tokens is cut in the user's text, never in the template's end, and says so."""

from __future__ import annotations

import logging

import torch

from tagmoe_core.pipeline.text_encoding import (
    MAX_PROMPT_TOKENS,
    PROMPT_TEMPLATE,
    encode_prompts,
    template_prefix_length,
)

LONG = "Change the cloak to red color and keep the face and the background unchanged. " * 120


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _hidden(text_encoder, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        out = text_encoder.model(input_ids=torch.tensor([ids]),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.last_hidden_state[0]


def test_a_long_prompt_keeps_the_template_end_and_warns(tiny_pipe, caplog):
    tokenizer, text_encoder = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    drop = template_prefix_length(tokenizer)
    closing = _ids(tokenizer, PROMPT_TEMPLATE.split("{}")[1])  # <|im_end|>\n<|im_start|>assistant\n
    full = _ids(tokenizer, PROMPT_TEMPLATE.format(LONG))
    user_tokens = len(full) - drop - len(closing)
    assert user_tokens > MAX_PROMPT_TOKENS
    with caplog.at_level(logging.WARNING, logger="tagmoe"):
        embeds = encode_prompts(text_encoder, tokenizer, [LONG])
    # The encoder saw the prefix, the start of the user's text and the template's closing tokens.
    expected_ids = full[:drop + MAX_PROMPT_TOKENS - len(closing)] + closing
    assert tokenizer.decode(expected_ids[-len(closing):]) == "<|im_end|>\n<|im_start|>assistant\n"
    expected = _hidden(text_encoder, expected_ids)[drop:]
    assert embeds.embeds.shape == (1, MAX_PROMPT_TOKENS, expected.shape[-1]) and embeds.mask.all()
    torch.testing.assert_close(embeds.embeds[0], expected, rtol=0, atol=0)
    message = caplog.text
    assert f"{user_tokens} tokens" in message and str(MAX_PROMPT_TOKENS - len(closing)) in message


def test_prompts_within_the_limit_are_encoded_whole_and_silently(tiny_pipe, caplog):
    """Short prompts, batched with padding, are what the reference's tokenizer call makes of them."""
    tokenizer, text_encoder = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    drop = template_prefix_length(tokenizer)
    prompts = ["a cat", "Change the cloak to red color"]
    with caplog.at_level(logging.WARNING, logger="tagmoe"):
        embeds = encode_prompts(text_encoder, tokenizer, prompts)
    assert "tokens" not in caplog.text
    reference = tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=MAX_PROMPT_TOKENS + drop,
                          padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = text_encoder.model(input_ids=reference.input_ids, attention_mask=reference.attention_mask)
    for row, mask, got, got_mask in zip(hidden.last_hidden_state, reference.attention_mask, embeds.embeds,
                                        embeds.mask):
        want = row[mask.bool()][drop:]
        assert int(got_mask.sum()) == want.shape[0]
        torch.testing.assert_close(got[:want.shape[0]], want, rtol=0, atol=0)
    assert embeds.mask[0].sum() < embeds.mask[1].sum()  # the shorter prompt is padded


def test_a_long_prompt_in_a_batch(tiny_pipe, caplog):
    tokenizer, text_encoder = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    with caplog.at_level(logging.WARNING, logger="tagmoe"):
        both = encode_prompts(text_encoder, tokenizer, ["a cat", LONG])
    alone = encode_prompts(text_encoder, tokenizer, ["a cat"])
    assert both.mask[1].all() and both.embeds.shape[1] == MAX_PROMPT_TOKENS
    short = int(alone.mask[0].sum())
    assert int(both.mask[0].sum()) == short
    torch.testing.assert_close(both.embeds[0, :short], alone.embeds[0], rtol=1e-5, atol=1e-5)
    assert caplog.text.count("tokens") == 1
