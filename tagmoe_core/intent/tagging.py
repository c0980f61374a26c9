"""Task tags from a VLM's free-form JSON answer, parsed robustly, with the rule tagger as the
fallback; and the question put to the VLM. (``rule_tags`` and ``TagResult`` are re-exported
from here for the callers that always imported them from this module.)"""

from __future__ import annotations

import json
import logging
import re

from ..taxonomy import PRESERVATIONS, SCOPES, TAG_DEFINITIONS, TAG_TIERS, TYPES, TagError, TaskTags, Tier, canonical_tag
from .tag_result import TagResult, TierConfidence
from .tag_rules import rule_tags, tag_with_rules

# A free-form answer carries no probability: tiers the VLM answered get this fixed level.
VLM_ANSWERED = 0.6

__all__ = ["TagResult", "extract_json_object", "rule_tags", "tags_from_vlm_answer", "vlm_tagging_prompt"]

log = logging.getLogger("tagmoe")


def vlm_tagging_prompt(instruction: str, has_image: bool = True) -> str:
    """The question put to a vision-language model, with the tier definitions."""
    lines = ["You annotate image-editing instructions with task tags in three tiers.", ""]
    for tier, names, rule in ((Tier.SCOPE, SCOPES, "choose exactly one"),
                              (Tier.TYPE, TYPES, "choose all that apply (none for image generation)"),
                              (Tier.PRESERVATION, PRESERVATIONS, "choose all that apply")):
        lines.append(f"{tier.value} ({rule}):")
        lines += [f"- {name}: {TAG_DEFINITIONS[name]}" for name in names]
        lines.append("")
    lines += [
        "Rules: if 'style transfer' applies, do not mark 'attribute editing'. "
        + ("The instruction comes with the input image shown." if has_image
           else "There is no input image, so the scope is 'image generation'."),
        "Example: 'Change the cloak to red color' -> {\"scope\": \"local editing\", \"type\": [\"attribute editing\"], "
        "\"preservation\": [\"identity preservation\", \"background preservation\", \"style preservation\"]}",
        "",
        f"Instruction: {instruction}",
        "Answer with one JSON object with the keys scope, type and preservation, and nothing else.",
    ]
    return "\n".join(lines)


def extract_json_object(text: str) -> dict | None:
    """The first JSON object in a model's answer, tolerating code fences, prose around it,
    single quotes, trailing commas and Python literals."""
    if not text:
        return None
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S | re.I)
    candidates = [fenced.group(1)] if fenced else []
    start = text.find("{")
    while start != -1:
        depth, in_string, quote = 0, False, ""
        for i in range(start, len(text)):
            ch = text[i]
            if in_string:
                if ch == quote and text[i - 1] != "\\":
                    in_string = False
            elif ch in "\"'":
                in_string, quote = True, ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    candidates.append(text[start:i + 1])
                    break
        start = text.find("{", start + 1)
    for candidate in candidates:
        for attempt in (candidate, _loosen(candidate)):
            try:
                value = json.loads(attempt)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _loosen(text: str) -> str:
    text = re.sub(r",\s*([}\]])", r"\1", text)  # trailing commas
    text = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", text)))
    if "'" in text and '"' not in text:
        text = text.replace("'", '"')
    return text


def tags_from_vlm_answer(answer: str, instruction: str, has_image: bool = True) -> TagResult:
    """Parse a VLM's answer into tags; unknown tags are dropped and broken answers fall back to
    the rules, each with a warning (never an exception)."""
    data = extract_json_object(answer)
    if data is None:
        warning = "the VLM's answer held no JSON object; using the rule-based tags"
        log.warning(warning)
        return _fallback(tag_with_rules(instruction, has_image), [warning])
    lowered = {str(k).strip().lower(): v for k, v in data.items()}
    warnings: list[str] = []
    picked: dict[Tier, list[str]] = {Tier.SCOPE: [], Tier.TYPE: [], Tier.PRESERVATION: []}
    for key in ("scope", "scopes", "type", "types", "preservation", "preservations", "tags"):
        value = lowered.get(key)
        if value is None:
            continue
        for raw in (value if isinstance(value, list) else re.split(r"[,;]", str(value))):
            if not str(raw).strip():
                continue
            try:
                name = canonical_tag(str(raw))
            except TagError:
                warnings.append(f"unknown tag {str(raw).strip()!r} dropped")
                continue
            picked[TAG_TIERS[name]].append(name)
    rules = tag_with_rules(instruction, has_image)
    scope_conf = VLM_ANSWERED
    scopes = list(dict.fromkeys(picked[Tier.SCOPE]))
    if not has_image:
        scopes = ["image generation"]
    if len(scopes) != 1:
        warnings.append(f"the VLM gave {len(scopes)} scopes ({', '.join(scopes) or 'none'}); using the rules' "
                        f"'{rules.tags.scope}'")
        scopes, scope_conf = [rules.tags.scope], rules.confidence.scope
    if has_image and scopes[0] == "image generation":
        warning = "the VLM chose 'image generation' although there is an input image; using the rule-based tags"
        log.warning(warning)
        return _fallback(rules, warnings + [warning])
    types = list(dict.fromkeys(picked[Tier.TYPE]))
    if scopes[0] == "image generation" and types:
        warnings.append(f"edit types dropped for image generation: {', '.join(types)}")
        types = []
    if "style transfer" in types and "attribute editing" in types:
        types.remove("attribute editing")
        warnings.append("'attribute editing' dropped: it cannot go with 'style transfer'")
    try:
        tags = TaskTags(scopes[0], tuple(types), tuple(dict.fromkeys(picked[Tier.PRESERVATION])))
    except TagError as exc:
        warnings.append(f"the VLM's tags break the rules ({exc}); using the rule-based tags")
        return _fallback(rules, warnings)
    for warning in warnings:
        log.warning("VLM tagging: %s", warning)
    return TagResult(tags, "vlm", TierConfidence(scope_conf, VLM_ANSWERED, VLM_ANSWERED), warnings)


def _fallback(rules: TagResult, warnings: list[str]) -> TagResult:
    return TagResult(rules.tags, "rules", rules.confidence, warnings + rules.warnings)
