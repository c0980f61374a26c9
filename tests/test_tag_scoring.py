"""The VLM tag scorer end to end on the tiny bundle's real Qwen2.5-VL text encoder (random weights:
the tags mean nothing, the scoring is real), checked against a direct, unbatched log-probability."""

from __future__ import annotations

import math

import pytest
import torch

from tagmoe_core.intent.tag_scoring import (
    EDIT_SCOPES,
    NO,
    YES,
    TagScorer,
    decide_tags,
    preservation_question,
    scope_question,
    type_question,
)
from tagmoe_core.intent.vlm import default_vlm_image_processor, vlm_image, vlm_inputs
from tagmoe_core.taxonomy import PRESERVATIONS, TYPES, TaskTags

INSTRUCTION = "Change the cloak to red color"


@pytest.fixture(scope="module")
def scorer(tiny_bundle):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_bundle.base / "text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bundle.base / "tokenizer")
    return TagScorer(model, tokenizer, default_vlm_image_processor())


def direct_logprob(scorer: TagScorer, image, question: str, answer: str) -> float:
    """log p(answer + end of turn) from one plain forward over the whole conversation, with the model
    computing its own (multimodal) positions: no cache, no batch, no padding."""
    model, tokenizer = scorer.model, scorer.tokenizer
    text = scorer.chat_text(INSTRUCTION, image is not None, question, answer)
    if image is not None:
        inputs = vlm_inputs(tokenizer, scorer.image_processor, text, [vlm_image(image)])
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).int()
    else:
        inputs = dict(tokenizer([text], return_tensors="pt"))
    with torch.inference_mode():
        logits = model(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    n = len(scorer.answer_ids(answer))
    assert ids[-n:].tolist() == scorer.answer_ids(answer)
    logp = logits[-n - 1:-1].log_softmax(-1)
    return float(logp.gather(-1, ids[-n:, None]).sum())


@pytest.mark.parametrize("with_image", [True, False])
def test_batched_scores_equal_a_direct_unbatched_computation(scorer, photo, with_image):
    image = photo if with_image else None
    candidates = [(scope_question(), s) for s in EDIT_SCOPES] + \
        [(type_question("pose editing"), YES), (preservation_question("face preservation"), NO)]
    batched = scorer.option_logprobs(INSTRUCTION, image, candidates)  # one padded batch, rows of unequal length
    assert len({len(scorer.answer_ids(a)) for _, a in candidates}) > 1
    for (question, answer), score in zip(candidates, batched):
        assert score == pytest.approx(direct_logprob(scorer, image, question, answer), abs=1e-4)
    assert all(s < 0 for s in batched)


def test_tags_from_the_scores(scorer, photo):
    result = scorer.tag(INSTRUCTION, photo)
    assert isinstance(result.tags, TaskTags) and result.source == "vlm"
    scores = result.scores
    scope_p = [scores[s] for s in EDIT_SCOPES]
    assert math.isclose(sum(scope_p), 1.0, rel_tol=1e-9) and result.tags.scope == max(EDIT_SCOPES, key=scores.get)
    assert result.confidence.scope == max(scope_p)
    assert all(0.0 < scores[t] < 1.0 for t in TYPES + PRESERVATIONS if t in scores)
    assert set(result.tags.preservations) == {t for t in PRESERVATIONS if scores[t] > 0.5}
    keep_set = math.prod(scores[t] if t in result.tags.preservations else 1 - scores[t] for t in PRESERVATIONS)
    assert result.confidence.preservation == pytest.approx(keep_set)
    for value in result.confidence.to_dict().values():
        assert 0.0 <= value <= 1.0
    # the yes/no probabilities are the two answers' log-probabilities, normalised
    yes, no = scorer.option_logprobs(INSTRUCTION, photo, [(preservation_question("face preservation"), YES),
                                                          (preservation_question("face preservation"), NO)])
    assert scores["face preservation"] == pytest.approx(1 / (1 + math.exp(no - yes)))


def test_scoring_is_deterministic(scorer, photo):
    first, again = scorer.tag(INSTRUCTION, photo), scorer.tag(INSTRUCTION, photo)
    assert first.tags == again.tags and first.scores == again.scores and first.confidence == again.confidence
    text_only = scorer.tag(INSTRUCTION, None, has_image=True)
    assert text_only.source == "vlm" and text_only.scores != first.scores  # the image changes the scores


def test_no_input_image_means_image_generation(scorer):
    result = scorer.tag("A cat holding a sign", None)
    assert result.tags == TaskTags("image generation") and result.confidence.to_dict() == {
        "scope": 1.0, "type": 1.0, "preservation": 1.0} and result.source == "rules" and not result.scores


def test_decisions_follow_the_annotation_rules():
    scope_p = dict.fromkeys(EDIT_SCOPES, 0.02) | {"global editing": 0.9}
    type_p = dict.fromkeys(TYPES, 0.1) | {"style transfer": 0.9, "attribute editing": 0.8}
    keep_p = dict.fromkeys(PRESERVATIONS, 0.3) | {"structure preservation": 0.7}
    result = decide_tags(scope_p, type_p, keep_p)
    assert result.tags == TaskTags("global editing", ("style transfer",), ("structure preservation",))
    assert result.warnings == ["'attribute editing' dropped: it cannot go with 'style transfer'"]
    assert result.confidence.scope == 0.9
    assert result.confidence.type == pytest.approx(0.9 * 0.2 * 0.9 ** 4)  # attribute editing counted as "no"
    assert result.confidence.preservation == pytest.approx(0.7 ** 5)
    custom = decide_tags(dict.fromkeys(EDIT_SCOPES, 0.0) | {"content customization": 1.0}, type_p, keep_p)
    assert custom.tags.types == () and custom.confidence.type == 1.0  # a new image from a reference: no edit types
