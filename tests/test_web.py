"""The front-end extension: valid JavaScript, and it names nodes that exist."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from node_harness import REPO, load_pack

SCRIPTS = sorted((REPO / "web").glob("*.js"))


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_extension_parses_as_an_es_module(path):
    result = subprocess.run(["node", "--input-type=module", "--check"], stdin=path.open(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_extension_targets_real_nodes_and_their_ui_keys():
    source = (REPO / "web" / "tagmoe.js").read_text()
    named = set(re.findall(r'"(TagMoE\w+)"', source))
    assert named and named <= set(load_pack().NODE_CLASS_MAPPINGS)
    assert "message?.text" in source  # the loader's and the sampler's ui key


def test_picker_tiers_match_the_taxonomy():
    from tagmoe_core.taxonomy import PRESERVATIONS, TYPES

    source = (REPO / "web" / "tagmoe.js").read_text()
    block = source[source.index("const TIERS"):source.index("};", source.index("const TIERS"))]
    types, keeps = (re.findall(r'"([a-z ]+)"', part) for part in block.split('"preservations"'))
    assert types[1:] == list(TYPES) and keeps == list(PRESERVATIONS)  # types[0] is the key "edit types"
