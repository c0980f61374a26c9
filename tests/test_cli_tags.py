"""``tagmoe tags``: the rules without a model, the VLM scorer with --tiny, JSON output and clear errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tagmoe_core.cli import main
from tagmoe_core.intent.tag_rules import tag_with_rules

CLOAK = "Change the cloak to red color"


def run_json(capsys, *argv) -> dict:
    assert main(["tags", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_rules_without_a_model(capsys):
    out = run_json(capsys, CLOAK)
    assert set(out) == {"tags", "source", "confidence", "warnings"}
    assert out == tag_with_rules(CLOAK).to_dict() and out["source"] == "rules"
    assert main(["tags", CLOAK]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = tag_with_rules(CLOAK)
    assert lines[0].startswith(f"tags: {expected.tags.to_text()} (ids ") and lines[1] == "source: rules"
    assert lines[2] == f"confidence: {expected.confidence.to_text()}" and len(lines) == 3


def test_rules_say_what_they_cannot_read(capsys, photo, tmp_path):
    out = run_json(capsys, "把斗篷改成红色")
    assert any("does not look like English" in w for w in out["warnings"])
    assert max(out["confidence"].values()) < 0.5
    assert run_json(capsys, "a cat with a hat", "--no-image")["tags"]["scope"] == "image generation"
    photo.save(tmp_path / "in.png")
    seen = run_json(capsys, "Remove the umbrella", "--image", str(tmp_path / "in.png"))
    assert seen["source"] == "rules" and any("do not look at the image" in w for w in seen["warnings"])


def test_tiny_model_scores_the_tags(photo, tmp_path, capsys):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from tagmoe_core.intent.tag_scoring import TagScorer

    from tagmoe_core.tiny import trained_tiny_bundle

    photo.save(tmp_path / "in.png")
    out = run_json(capsys, CLOAK, "--tiny", "--device", "cpu", "--image", str(tmp_path / "in.png"))
    base = trained_tiny_bundle().base  # what --tiny scores with
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base / "text_encoder").eval()
    direct = TagScorer(model, AutoTokenizer.from_pretrained(base / "tokenizer")).tag(
        CLOAK, Image.open(tmp_path / "in.png"))
    assert out["source"] == "vlm" and out["tags"] == direct.tags.to_dict()
    assert out["confidence"] == pytest.approx(direct.confidence.to_dict())
    text_only = run_json(capsys, CLOAK, "--tiny", "--device", "cpu")
    assert text_only["source"] == "vlm" and text_only["confidence"] != out["confidence"]


@pytest.mark.parametrize("argv, message", [
    (["  "], "the instruction is empty"),
    (["x", "--image", "missing.png"], "does not exist"),
    (["x", "--image", "in.png", "--no-image"], "contradict"),
    (["x", "--pretrained_model_path", "/nonexistent/base"], "does not exist"),
    (["x", "--tiny", "--device", "7"], "CUDA"),
])
def test_errors_are_one_line_messages(tiny_bundle, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    assert main(["tags", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
