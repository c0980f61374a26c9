"""Task tags from a VLM's free-form JSON answer, parsed robustly, with the rule tagger as the
fallback; and the question put to the VLM. (``rule_tags`` and ``TagResult`` are re-exported
from here for the callers that always imported them from this module.)"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from ..taxonomy import PRESERVATIONS, SCOPES, TAG_DEFINITIONS, TAG_TIERS, TYPES, TagError, TaskTags, Tier
from .json_scan import extract_json_object, json_objects
from .tag_names import resolve_tag
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


# Keys that hold tags, with the tier they hold ("tags": any tier), and keys an answer may nest them under.
TIER_KEYS: dict[str, Tier | None] = {
    "scope": Tier.SCOPE, "scopes": Tier.SCOPE, "type": Tier.TYPE, "types": Tier.TYPE, "edit type": Tier.TYPE,
    "edit types": Tier.TYPE, "preservation": Tier.PRESERVATION, "preservations": Tier.PRESERVATION,
    "tags": None, "task tags": None, "labels": None}
NESTS = ("tags", "task tags", "answer", "result", "output", "annotation", "labels", "response")


@dataclass
class _Reading:
    """What one JSON object says, tier by tier."""

    picked: dict[Tier, list[str]]
    given: dict[Tier, int]  # entries listed under each tier's key (known or not)
    warnings: list[str]

    @property
    def valid(self) -> bool:
        return len(set(self.picked[Tier.SCOPE])) == 1


def _tag_fields(data: dict) -> dict | None:
    fields = {" ".join(str(k).strip().lower().replace("_", " ").split()): v for k, v in data.items()}
    if any(k in TIER_KEYS and not isinstance(v, dict) for k, v in fields.items()):
        return fields
    inner = [v for k, v in fields.items() if isinstance(v, dict) and (k in NESTS or len(fields) == 1)]
    return _tag_fields(inner[0]) if len(inner) == 1 and inner[0] is not data else None


def _read_answer(data: dict) -> _Reading | None:
    fields = _tag_fields(data)
    if fields is None:
        return None
    reading = _Reading({t: [] for t in Tier}, {t: 0 for t in Tier}, [])
    for key, tier in TIER_KEYS.items():
        value = fields.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value] if isinstance(value, (int, float)) else \
            re.split(r"[,;，、；]", str(value))
        for raw in items:
            if not str(raw).strip():
                continue
            if tier is not None:
                reading.given[tier] += 1
            try:
                name = resolve_tag(raw, tier)
            except TagError:
                reading.warnings.append(f"unknown tag {str(raw).strip()!r} dropped")
                continue
            reading.picked[TAG_TIERS[name]].append(name)
    return reading


def tags_from_vlm_answer(answer: str, instruction: str, has_image: bool = True) -> TagResult:
    """Parse a VLM's answer into tags: the last JSON object that validates (one scope) wins, else the
    last that holds tags. Tag ids, short and Chinese names are read; unknown tags are dropped, and a
    tier they leave empty is filled by the rules; broken answers fall back to the rules; each with a
    warning (never an exception)."""
    readings = [r for r in (_read_answer(obj) for obj in json_objects(answer)) if r is not None]
    rules = tag_with_rules(instruction, has_image)
    if not readings:
        warning = "the VLM's answer held no JSON object with task tags; using the rule-based tags"
        log.warning(warning)
        return _fallback(rules, [warning])
    valid = [r for r in readings if r.valid]
    reading = valid[-1] if valid else readings[-1]
    picked, warnings = reading.picked, list(reading.warnings)
    confidence = {tier: VLM_ANSWERED for tier in Tier}
    scopes = list(dict.fromkeys(picked[Tier.SCOPE]))
    if not has_image:
        scopes = ["image generation"]
    if len(scopes) != 1:
        warnings.append(f"the VLM gave {len(scopes)} scopes ({', '.join(scopes) or 'none'}); using the rules' "
                        f"'{rules.tags.scope}'")
        scopes, confidence[Tier.SCOPE] = [rules.tags.scope], rules.confidence.scope
    if has_image and scopes[0] == "image generation":
        warning = "the VLM chose 'image generation' although there is an input image; using the rule-based tags"
        log.warning(warning)
        return _fallback(rules, warnings + [warning])
    types = list(dict.fromkeys(picked[Tier.TYPE]))
    keeps = list(dict.fromkeys(picked[Tier.PRESERVATION]))
    from_rules = {Tier.TYPE: list(rules.tags.types), Tier.PRESERVATION: list(rules.tags.preservations)}
    for tier, chosen in ((Tier.TYPE, types), (Tier.PRESERVATION, keeps)):
        if reading.given[tier] and not chosen and from_rules[tier] and scopes[0] != "image generation":
            chosen.extend(from_rules[tier])
            confidence[tier] = getattr(rules.confidence, tier.value)
            warnings.append(f"none of the VLM's {tier.value} tags is known; using the rules' {tier.value} tags")
    if scopes[0] == "image generation" and types:
        warnings.append(f"edit types dropped for image generation: {', '.join(types)}")
        types = []
    if "style transfer" in types and "attribute editing" in types:
        types.remove("attribute editing")
        warnings.append("'attribute editing' dropped: it cannot go with 'style transfer'")
    try:
        tags = TaskTags(scopes[0], tuple(types), tuple(keeps))
    except TagError as exc:
        warnings.append(f"the VLM's tags break the rules ({exc}); using the rule-based tags")
        return _fallback(rules, warnings)
    for warning in warnings:
        log.warning("VLM tagging: %s", warning)
    return TagResult(tags, "vlm", TierConfidence(*(confidence[t] for t in Tier)), warnings)


def _fallback(rules: TagResult, warnings: list[str]) -> TagResult:
    return TagResult(rules.tags, "rules", rules.confidence, warnings + rules.warnings)
