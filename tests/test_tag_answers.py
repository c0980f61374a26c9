"""The VLM answer parser: ids, short and Chinese tag names, nested answers, an echoed example before the
real answer, unknown tags, and a JSON scan that stays linear on hostile input."""

from __future__ import annotations

import time

import pytest

from tagmoe_core.intent.tag_names import resolve_tag
from tagmoe_core.intent.tag_rules import tag_with_rules
from tagmoe_core.intent.tagging import VLM_ANSWERED, extract_json_object, tags_from_vlm_answer, vlm_tagging_prompt
from tagmoe_core.taxonomy import TAG_IDS, TAG_NAMES, TagError, TaskTags, Tier

CLOAK = "Change the cloak to red color"
PAPER = TaskTags("local editing", ("attribute editing",), ("identity preservation", "background preservation",
                                                           "style preservation"))


@pytest.mark.parametrize("answer", [
    '{"scope": 0, "type": [7], "preservation": [14, 13, 16]}',
    '{"scope": "0", "type": ["7"], "preservation": ["14", "13", "16"]}',
    '{"tags": [0, 7, 13, 14, 16]}',
    '{"scope": "局部编辑", "type": ["属性编辑"], "preservation": ["身份保持", "背景保留", "风格保持"]}',
    '{"scope": "local", "type": ["attribute"], "preservation": ["identity", "bg preservation", "style"]}',
    '{"scope": "Local-Edit", "type": "attribute edit", "preservation": "keep identity, keep background, style"}',
    '{"tags": {"scope": "local editing", "type": ["attribute editing"], "preservation": '
    '["identity preservation", "background preservation", "style preservation"]}}',
    '{"answer": {"scope": 0, "type": [7], "preservation": [13, 14, 16]}}',
])
def test_ids_short_and_chinese_names_and_one_level_of_nesting(answer):
    result = tags_from_vlm_answer(answer, CLOAK)
    assert result.tags == PAPER and result.source == "vlm" and not result.warnings, result.warnings
    assert result.confidence.scope == VLM_ANSWERED


def test_an_echoed_example_before_the_answer_is_ignored():
    prompt = vlm_tagging_prompt("Remove the umbrella")
    example = prompt[prompt.index("{"): prompt.index("}") + 1]  # the prompt's own example, echoed back
    answer = (f"The example was {example}. For this instruction:\n```json\n{{\"scope\": \"local editing\", "
              "\"type\": [\"object editing\"], \"preservation\": [\"identity preservation\"]}\n```")
    result = tags_from_vlm_answer(answer, "Remove the umbrella")
    assert result.tags == TaskTags("local editing", ("object editing",), ("identity preservation",))
    # the last object that validates wins: a trailing object without a scope does not
    result = tags_from_vlm_answer(answer + ' Note: {"confidence": "high"}', "Remove the umbrella")
    assert result.tags.types == ("object editing",) and not result.warnings


def test_unknown_tags_never_empty_a_tier_the_rules_can_fill():
    rules = tag_with_rules("Remove the hat")
    result = tags_from_vlm_answer('{"scope": "local editing", "type": ["colour change"], '
                                  '"preservation": ["vibe preservation", "mood preservation"]}', "Remove the hat")
    assert result.tags == TaskTags("local editing", rules.tags.types, rules.tags.preservations)
    assert result.source == "vlm" and result.confidence.type == rules.confidence.type
    assert sum("unknown tag" in w for w in result.warnings) == 3
    assert any("using the rules' type" in w for w in result.warnings)
    # a tier the VLM left empty on purpose stays empty
    empty = tags_from_vlm_answer('{"scope": "local editing", "type": ["object editing"], "preservation": []}',
                                 "Remove the hat")
    assert empty.tags.preservations == () and not empty.warnings


@pytest.mark.parametrize("text", [
    "{" * 8000,
    "{" * 8000 + '{"scope": "local editing"}',
    "{" * 4000 + "}" * 4000,
    '{"a": "' * 4000,
    "{'" * 4000,
    "x {" * 4000 + "}" * 10,
    '{"a": ' + "[" * 8000 + "]" * 8000 + "}",
])
def test_the_json_scan_is_linear(text):
    start = time.perf_counter()
    extract_json_object(text)
    tags_from_vlm_answer(text, CLOAK)
    assert time.perf_counter() - start < 0.5


def test_json_scan_finds_objects_after_stray_braces_and_quotes():
    assert extract_json_object('Here is {one brace and {"scope": "local editing"}') == {"scope": "local editing"}
    assert extract_json_object('It\'s the girl\'s hat: {"scope": "global editing"}') == {"scope": "global editing"}
    assert extract_json_object('{"a": "unterminated\n{"b": 2}') == {"b": 2}
    assert extract_json_object("{'a': 'it\\'s', 'b': 'the girl's hat'}") is not None
    assert extract_json_object('first {"a": 1} last {"b": 2}') == {"b": 2}


@pytest.mark.parametrize("raw, tier, name", [
    (7, None, "attribute editing"), ("17", None, "image generation"), (7.0, Tier.TYPE, "attribute editing"),
    ("local", Tier.SCOPE, "local editing"), ("style", Tier.TYPE, "style transfer"),
    ("style", Tier.PRESERVATION, "style preservation"), ("style", Tier.SCOPE, "style customization"),
    ("background", Tier.TYPE, "background editing"), ("bg", Tier.PRESERVATION, "background preservation"),
    ("multi-region", None, "multi region editing"), ("Style Customisation", None, "style customization"),
    ("人脸保持", None, "face preservation"), ("风格迁移", None, "style transfer"),
    ("背景", Tier.TYPE, "background editing"),
    ("lighting", Tier.TYPE, "illumination editing"), ("keep face", None, "face preservation"),
])
def test_resolve_tag(raw, tier, name):
    assert resolve_tag(raw, tier) == name


@pytest.mark.parametrize("raw, message", [
    (18, "out of range"), (True, "unknown"), ("style", "ambiguous"), ("background", "ambiguous"),
    ("vibe", "unknown task tag"),
])
def test_resolve_tag_errors(raw, message):
    with pytest.raises(TagError, match=message):
        resolve_tag(raw)


def test_every_name_and_id_resolves_to_itself():
    assert all(resolve_tag(name) == name and resolve_tag(TAG_IDS[name]) == name for name in TAG_NAMES)
