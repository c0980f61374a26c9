"""The rule tagger: its known misreads, each fixed with the cases that showed it, and its labelling as
the English-only fallback (warnings and low confidence where it cannot read)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tagmoe_core.intent.language import looks_english
from tagmoe_core.intent.tag_eval import load_eval_table
from tagmoe_core.intent.tag_result import TierConfidence
from tagmoe_core.intent.tag_rules import RULES_DEFAULT, RULES_NOT_ENGLISH, RULES_READ, tag_with_rules
from tagmoe_core.intent.tagging import rule_tags
from tagmoe_core.taxonomy import TaskTags

TABLE = Path(__file__).resolve().parent / "data" / "tag_eval.jsonl"

LOCAL_KEEP = ("identity preservation", "background preservation", "style preservation")


def local(*types: str, keeps: tuple[str, ...] = LOCAL_KEEP) -> TaskTags:
    return TaskTags("local editing", types, keeps)


# A comma that goes on describing the same edit is not a second region.
@pytest.mark.parametrize("instruction, tags", [
    ("change the shirt to red, make it striped", local("attribute editing")),
    ("Make the dress red, bright red", local("attribute editing")),
    ("Change the sofa to leather, dark brown", local("attribute editing")),
    ("Make her hair longer, curly and blonde", local("attribute editing")),
    ("Recolor the bag, make it blue", local("attribute editing")),
    ("Make the man older, with grey hair", local("attribute editing")),
    # still two edits: each clause names its own thing
    ("Change the shirt to blue, make the hat green", TaskTags("multi region editing", ("attribute editing",),
                                                              LOCAL_KEEP)),
    ("Remove the lamp, then make the sofa red", TaskTags("multi region editing", ("object editing",
                                                                                 "attribute editing"), LOCAL_KEEP)),
])
def test_commas_inside_one_edit(instruction, tags):
    assert rule_tags(instruction) == tags, rule_tags(instruction).to_text()


# The colour or material of a thing that is added describes the new thing: object editing only. And a
# body part named as the place of the new thing is not a pose edit.
@pytest.mark.parametrize("instruction, tags", [
    ("add a red hat", local("object editing")),
    ("Put a wooden bench in front of the fountain", local("object editing")),
    ("Make the man hold a white umbrella", local("object editing")),
    ("Give him a black leather jacket", local("object editing")),
    ("Swap the coffee mug for a glass of orange juice", local("object editing")),
    ("Add a blue balloon to the girl's hand", local("object editing")),
    ("Put a gold ring on her finger", local("object editing")),
    # the colour of a thing that is there already is still an attribute edit
    ("Give the cat green eyes", local("attribute editing")),
    ("Add a red hat and make the scarf blue", TaskTags("multi region editing", ("object editing",
                                                                               "attribute editing"), LOCAL_KEEP)),
    ("Make the girl raise her right hand", local("pose editing")),
])
def test_colours_of_added_things(instruction, tags):
    assert rule_tags(instruction) == tags, rule_tags(instruction).to_text()


# The colour of a thing that is removed says which thing goes: object editing only. A colour, texture or
# feature that is itself removed is still an attribute edit, and so is a later clause's colour.
@pytest.mark.parametrize("instruction, tags", [
    ("Remove the red circle", local("object editing")),
    ("Get rid of the green square", local("object editing")),
    ("Take away the white triangle", local("object editing")),
    ("Delete the black car from the street", local("object editing")),
    ("Erase the blue cup on the table", local("object editing")),
    ("Remove the dark red car", local("object editing")),
    ("Remove the red colour from the car", local("object editing", "attribute editing")),
    ("Remove all the red", local("object editing", "attribute editing")),
    ("Remove his beard", local("object editing", "attribute editing")),
    ("Remove the wooden texture", local("object editing", "attribute editing")),
    ("Remove the lamp while the sofa turns red", local("object editing", "attribute editing")),
    ("Remove the lamp so the sofa looks red", local("object editing", "attribute editing")),
    ("Remove the red circle and make the square blue", TaskTags("multi region editing", ("object editing",
                                                                                        "attribute editing"),
                                                                LOCAL_KEEP)),
])
def test_colours_of_removed_things(instruction, tags):
    assert rule_tags(instruction) == tags, rule_tags(instruction).to_text()


# "from the left" after a removal says where the thing is, and light "from the left" says where it
# comes from: neither is another camera position. "Show ... from the side" still is.
@pytest.mark.parametrize("instruction, tags", [
    ("Remove the cup from the left of the table", local("object editing")),
    ("Remove the car from the right side of the street", local("object editing")),
    ("Remove the sticker from the front of the laptop", local("object editing")),
    ("Remove the book from the top of the shelf", local("object editing")),
    ("Add warm light from the left", TaskTags("global editing", ("illumination editing",),
                                                     ("structure preservation", "identity preservation"))),
    ("Show the car from the side", TaskTags("viewpoint editing", (), ("identity preservation", "style preservation"))),
    ("Show the house from above", TaskTags("viewpoint editing", (), ("identity preservation", "style preservation"))),
])
def test_from_the_left_is_not_a_viewpoint(instruction, tags):
    assert rule_tags(instruction) == tags, rule_tags(instruction).to_text()


# What a clause keeps is not an edit, with or without "the same": keeping the view is no viewpoint edit,
# keeping everything else no global edit, keeping the lighting no second region. "The same" inside an
# edit ("the same colour as the house") keeps nothing.
@pytest.mark.parametrize("instruction, tags", [
    ("keep the same background, change the shirt to blue", local("attribute editing")),
    ("Keep the same view, change the shirt to blue", local("attribute editing",
                                                           keeps=LOCAL_KEEP + ("structure preservation",))),
    ("keep the same camera angle and make the car red", local("attribute editing",
                                                              keeps=LOCAL_KEEP + ("structure preservation",))),
    ("Keep the same perspective, remove the lamp", local("object editing",
                                                         keeps=LOCAL_KEEP + ("structure preservation",))),
    ("change the shirt to blue, everything else the same", local("attribute editing")),
    ("keep everything the same except the hat, make it blue", local("attribute editing")),
    ("Keep the same lighting and make the dress red", local("attribute editing")),
    ("Make a red version of the car, same style", local("attribute editing")),
    ("Keep the pose, change the background to a beach", TaskTags(
        "local editing", ("background editing",), ("structure preservation", "identity preservation",
                                                   "style preservation"))),
    ("Make the jacket green while preserving the pose", local("attribute editing",
                                                              keeps=LOCAL_KEEP + ("structure preservation",))),
    ("Change the car to the same color as the house", local("attribute editing")),
    ("Paint a city skyline in the same style", TaskTags("style customization", (), ("style preservation",))),
])
def test_what_is_kept_is_not_an_edit(instruction, tags):
    assert rule_tags(instruction) == tags, rule_tags(instruction).to_text()


# -- the labelled fallback: warnings and low confidence where the rules cannot read -------------------------
def test_rules_that_read_the_instruction_say_so():
    result = tag_with_rules("Change the cloak to red color")
    assert result.tags == rule_tags("Change the cloak to red color") and result.source == "rules"
    assert result.confidence == TierConfidence.uniform(RULES_READ) and not result.warnings
    generation = tag_with_rules("一只猫", has_image=False)  # no image: the scope follows, in any language
    assert generation.tags == TaskTags("image generation") and generation.confidence == TierConfidence.uniform(1.0)


def test_instructions_in_other_languages_are_never_a_confident_guess():
    rows = [r for r in load_eval_table(TABLE) if r.has_image]
    for row in rows:
        result = tag_with_rules(row.instruction)
        english_warning = any("does not look like English" in w for w in result.warnings)
        assert english_warning == (not row.english), row.instruction
        if not row.english:
            assert result.confidence == TierConfidence.uniform(RULES_NOT_ENGLISH)
            assert max(result.confidence.to_dict().values()) < RULES_DEFAULT < RULES_READ


@pytest.mark.parametrize("instruction, missing", [
    ("Do something nice with it", "scope and type and preservation"),
    ("Brighten the whole image", "type"),  # the scope is read ("whole image"), no edit type is
])
def test_instructions_no_rule_reads_are_flagged(instruction, missing):
    result = tag_with_rules(instruction)
    assert result.warnings == [f"no rule read the {missing} of this instruction: the rules' default guess, "
                               "low confidence"]
    levels = result.confidence.to_dict()
    assert all(levels[tier] == RULES_DEFAULT for tier in missing.split(" and "))
    assert all(levels[tier] == RULES_READ for tier in levels if tier not in missing)


@pytest.mark.parametrize("text, english", [
    ("Mach das Auto rot", False), ("Pon el coche rojo", False), ("Rendi il cielo blu", False),
    ("Enlève le chapeau", False), ("Maak de lucht blauw", False), ("Убери шляпу", False), ("把车变成红色", False),
    ("車を赤くして", False), ("모자를 지워줘", False),
    ("hair -> pink", True), ("Put a café sign above the door", True), ("Make it look like a Van Gogh painting", True),
    ("don't change the face, make the hair red", True), ("remove bg", True),
])
def test_language_guess(text, english):
    assert looks_english(text) is english
