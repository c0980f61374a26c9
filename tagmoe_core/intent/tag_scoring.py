"""Task tags by scoring the tag vocabulary with a VLM's language-model head, the way the paper's
labels were made with Qwen2.5-VL, but without a free-form answer to parse.

* scope: the log-probability of each scope option's name (plus the end of the answer) after a
  question listing the options with their definitions; softmax over the options -> the choice
  (argmax) and its probability;
* every type and every preservation: a yes/no question with the tag's definition;
  ``p(yes) = softmax(log p("Yes"), log p("No"))``; the tag is chosen when ``p(yes) > 0.5``.

The annotation rules hold: one scope, never "image generation" when there is an input image (and
only it when there is none); style transfer excludes attribute editing (the latter is dropped);
the two customization scopes, which make a new image rather than edit one, take no edit types.
Confidence per tier: the chosen scope's probability; for types and preservations the probability
of the chosen set as a whole (the product of each yes/no decision's probability).

The prompt's shared part (system, image, instruction) runs once; each tier's candidates are then
one padded batch over a copy of its KV cache.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass

import torch
from PIL import Image

from ..runtime.devices import module_device
from ..taxonomy import IMAGE_GENERATION, PRESERVATIONS, SCOPES, TAG_DEFINITIONS, TYPES, TaskTags
from .chat_template import QWEN_VL_CHAT_TEMPLATE
from .tag_result import TagResult, TierConfidence
from .vlm import default_vlm_image_processor, vlm_image, vlm_inputs

SYSTEM = ("You are a precise annotator of image-editing instructions. You label each instruction with task "
          "tags, following the definitions you are given.")
YES, NO = "Yes", "No"
NO_TYPES = ("content customization", "style customization")  # new images from a reference: no edit types
EDIT_SCOPES = tuple(s for s in SCOPES if s != IMAGE_GENERATION)


def scope_question() -> str:
    options = "\n".join(f"- {name}: {TAG_DEFINITIONS[name]}" for name in EDIT_SCOPES)
    return ("Which one of these best describes the scope of the instruction?\n" + options +
            "\nAnswer with the name of one option only.")


def type_question(tag: str) -> str:
    return (f"Is this edit an instance of '{tag}' ({TAG_DEFINITIONS[tag]})? Other kinds of edit may apply as well. "
            "Answer Yes or No.")


def preservation_question(tag: str) -> str:
    return (f"Does the instruction call for '{tag}' ({TAG_DEFINITIONS[tag]}) in the edited image? "
            "Answer Yes or No.")


@dataclass
class _Prefix:
    length: int
    next_position: int  # the (text) position of the first token after the prefix
    cache: object


class TagScorer:
    """Score the tag vocabulary with a causal (vision-)language model and its tokenizer, e.g. TAG-MoE's
    Qwen2.5-VL text encoder."""

    def __init__(self, model, tokenizer, image_processor=None):
        self.model, self.tokenizer = model, tokenizer
        self.image_processor = image_processor
        self.template = None if getattr(tokenizer, "chat_template", None) else QWEN_VL_CHAT_TEMPLATE
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        config = getattr(model, "config", None)
        self._mrope = getattr(config, "vision_config", None) is not None
        self._image_token = getattr(config, "image_token_id", None)

    # -- the chat text -----------------------------------------------------------------------------------
    def chat_text(self, instruction: str, with_image: bool, question: str, answer: str) -> str:
        """The whole conversation for one candidate answer, through the tokenizer's chat template,
        ending with the answer's end-of-turn token."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": self._head(instruction)
                                                                   + question}]
        messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                    {"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.template)
        end = self._end_of_turn()
        cut = text.rfind(end)
        if cut < 0:
            raise ValueError("the chat template does not end the assistant's turn with " + end)
        return text[:cut + len(end)]

    @staticmethod
    def _head(instruction: str) -> str:
        return "Instruction: " + " ".join(str(instruction).split()) + "\n"

    def _end_of_turn(self) -> str:
        eos = self.tokenizer.eos_token
        return eos if eos and eos in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>") else "<|im_end|>"

    def answer_ids(self, answer: str) -> list[int]:
        """The tokens that are scored: the answer and its end-of-turn token."""
        return self.tokenizer(answer + self._end_of_turn(), add_special_tokens=False).input_ids

    # -- scoring -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def option_logprobs(self, instruction: str, image: Image.Image | None,
                        candidates: list[tuple[str, str]]) -> list[float]:
        """``log p(answer + end of turn | prompt with question)`` for each (question, answer), in one
        batch over the shared prompt's cache."""
        return self._score(self._prefill(instruction, image), instruction, image is not None, candidates)

    def _split(self, instruction: str, with_image: bool, question: str, answer: str) -> tuple[str, str]:
        text = self.chat_text(instruction, with_image, question, answer)
        head = self._head(instruction)
        cut = text.find(head)
        if cut < 0:
            raise ValueError("the chat template changed the instruction text")
        return text[:cut + len(head)], text[cut + len(head):]

    def _prefill(self, instruction: str, image: Image.Image | None) -> _Prefix:
        prefix_text, _ = self._split(instruction, image is not None, "?", YES)
        device = module_device(self.model)
        kwargs: dict = {}
        if image is not None:
            processor = self.image_processor or default_vlm_image_processor()
            inputs = vlm_inputs(self.tokenizer, processor, prefix_text, [vlm_image(image)], device=device)
            ids = inputs["input_ids"]
            kwargs = {"pixel_values": inputs["pixel_values"].to(self.model.dtype),
                      "image_grid_thw": inputs["image_grid_thw"]}
            positions, delta = qwen_vl_positions(ids[0].cpu(), inputs["image_grid_thw"].cpu(), self._image_token,
                                                 processor.merge_size)
            positions = positions[:, None].to(device)
        else:
            ids = self.tokenizer([prefix_text], return_tensors="pt").input_ids.to(device)
            positions, delta = torch.arange(ids.shape[1], device=device)[None], 0
            if self._mrope:
                positions = positions[None].expand(3, 1, -1)
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1  # the prefix's logits are not needed: every answer follows a question
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions, use_cache=True,
                         **kwargs)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        length = ids.shape[1]
        return _Prefix(length, length + int(delta), cache)

    def _score(self, prefix: _Prefix, instruction: str, with_image: bool,
               candidates: list[tuple[str, str]]) -> list[float]:
        device = module_device(self.model)
        rows, answers = [], []
        for question, answer in candidates:
            _, suffix = self._split(instruction, with_image, question, answer)
            row = self.tokenizer(suffix, add_special_tokens=False).input_ids
            tail = self.answer_ids(answer)
            if len(row) <= len(tail) or row[-len(tail):] != tail:
                raise ValueError(f"the answer {answer!r} does not tokenize the same at the end of the prompt")
            rows.append(row)
            answers.append(len(tail))
        batch, width = len(rows), max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        positions = torch.full((batch, width), prefix.next_position, dtype=torch.long)
        for b, row in enumerate(rows):  # left-padded after the prefix: every answer ends in the last column
            ids[b, width - len(row):] = torch.tensor(row)
            mask[b, width - len(row):] = 1
            positions[b, width - len(row):] = prefix.next_position + torch.arange(len(row))
        keep = max(answers) + 1
        attention = torch.cat([torch.ones((batch, prefix.length), dtype=torch.long), mask], dim=1)
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(batch)
        kwargs = {self._cache_kw: cache, "logits_to_keep": keep} if self._keep_logits else {self._cache_kw: cache}
        out = self.model(input_ids=ids.to(device), attention_mask=attention.to(device),
                         position_ids=(positions[None].expand(3, -1, -1) if self._mrope else positions).to(device),
                         use_cache=True, **kwargs)
        logits = out.logits[:, -keep:].float().log_softmax(-1)  # column j predicts the token in column j + 1
        scores = []
        for b, n in enumerate(answers):
            targets = ids[b, width - n:].to(logits.device)
            predicted = logits[b, keep - n - 1: keep - 1]
            scores.append(float(predicted.gather(-1, targets[:, None]).sum()))
        return scores

    # -- tags ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def tag(self, instruction: str, image: Image.Image | None = None, *, has_image: bool | None = None) -> TagResult:
        """Tags for ``instruction`` (``image``: what the model looks at; ``has_image`` - default: whether
        ``image`` is given - says whether the task edits an image at all)."""
        has_image = image is not None if has_image is None else has_image
        if not has_image:  # the annotation rules settle it: nothing to score
            return TagResult(TaskTags(IMAGE_GENERATION), "rules", TierConfidence.uniform(1.0))
        prefix = self._prefill(instruction, image)
        with_image = image is not None

        scope_p = dict(zip(EDIT_SCOPES, _softmax(self._score(prefix, instruction, with_image,
                                                             [(scope_question(), s) for s in EDIT_SCOPES]))))
        scope = max(scope_p, key=scope_p.__getitem__)
        type_p = {} if scope in NO_TYPES else self._yes_no(prefix, instruction, with_image, TYPES, type_question)
        keep_p = self._yes_no(prefix, instruction, with_image, PRESERVATIONS, preservation_question)
        return decide_tags(scope_p, type_p, keep_p)

    def _yes_no(self, prefix: _Prefix, instruction: str, with_image: bool, tags: tuple[str, ...],
                question) -> dict[str, float]:
        candidates = [(question(t), answer) for t in tags for answer in (YES, NO)]
        scores = self._score(prefix, instruction, with_image, candidates)
        return {t: _softmax(scores[2 * i: 2 * i + 2])[0] for i, t in enumerate(tags)}


def decide_tags(scope_p: dict[str, float], type_p: dict[str, float], keep_p: dict[str, float]) -> TagResult:
    """Tags from the option probabilities (``scope_p`` sums to 1; ``type_p`` / ``keep_p``: p(yes) per tag),
    following the annotation rules, with per-tier confidence."""
    scope = max(scope_p, key=scope_p.__getitem__)
    if scope in NO_TYPES:
        type_p = {}
    types = {t for t, p in type_p.items() if p > 0.5}
    warnings = []
    if {"style transfer", "attribute editing"} <= types:
        types.discard("attribute editing")
        warnings.append("'attribute editing' dropped: it cannot go with 'style transfer'")
    keeps = {t for t, p in keep_p.items() if p > 0.5}
    confidence = TierConfidence(scope_p[scope], _set_probability(type_p, types), _set_probability(keep_p, keeps))
    return TagResult(TaskTags(scope, tuple(types), tuple(keeps)), "vlm", confidence, warnings,
                     scope_p | type_p | keep_p)


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _set_probability(p_yes: dict[str, float], chosen: set[str]) -> float:
    """The probability of exactly this set under independent yes/no decisions."""
    return math.prod(p if tag in chosen else 1.0 - p for tag, p in p_yes.items())


def qwen_vl_positions(ids: torch.Tensor, grids: torch.Tensor, image_token: int,
                      merge: int) -> tuple[torch.Tensor, int]:
    """Qwen2-VL / Qwen2.5-VL multimodal rotary positions of one sequence ([3, L]: time, height, width)
    and the shift of the text positions after it (``max position + 1 - L``), as its ``get_rope_index``
    computes them for still images."""
    parts, current, start, grid_iter = [], 0, 0, iter(grids.tolist())
    is_image = (ids == image_token).tolist()
    length = len(is_image)
    while start < length:
        end = start
        while end < length and is_image[end] == is_image[start]:
            end += 1
        if not is_image[start]:
            parts.append(torch.arange(current, current + end - start).expand(3, -1))
            current += end - start
        else:
            t, h, w = next(grid_iter)
            h, w = h // merge, w // merge
            if t * h * w != end - start:
                raise ValueError(f"{end - start} image tokens for a {t}x{h}x{w} grid")
            parts.append(torch.stack([torch.arange(t).repeat_interleave(h * w), torch.arange(h).repeat_interleave(w)
                                      .repeat(t), torch.arange(w).repeat(t * h)]) + current)
            current += max(h, w)
        start = end
    positions = torch.cat(parts, dim=1)
    return positions, int(positions.max()) + 1 - length
