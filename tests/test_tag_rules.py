"""The rule tagger's known misreads, each fixed with the cases that showed it."""

from __future__ import annotations

import pytest

from tagmoe_core.intent.tagging import rule_tags
from tagmoe_core.taxonomy import TaskTags

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
