"""The training data folder: its layout, tags from the rules, and every bad input refused in one line
before the first training step."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from train_data import SIZE, make_data, scene, write_samples

from tagmoe_core.cli import main
from tagmoe_core.errors import DataError, InconsistentExpertsError, InputError, ShapeMismatchError, TagMoEError
from tagmoe_core.intent.tagging import rule_tags
from tagmoe_core.pipeline.latents import pack
from tagmoe_core.taxonomy import TaskTags
from tagmoe_core.training.data import encode_samples, read_samples, target_tokens
from tagmoe_core.training.loop import TrainConfig, train


def test_samples_are_read_with_rule_tags_where_none_are_given(tmp_path):
    samples = read_samples(make_data(tmp_path / "d", tags=False))
    assert [s.is_edit for s in samples] == [True, True, True, False]
    assert samples[0].tags == rule_tags("Make the circle red", has_image=True) and samples[0].tags_from_rules
    assert samples[3].tags == TaskTags("image generation")
    given = read_samples(make_data(tmp_path / "g"))[0]
    assert given.tags.names == ("local editing", "attribute editing", "background preservation")
    assert not given.tags_from_rules and (given.width, given.height) == SIZE


def test_encoding_batches_by_pixels_so_large_pictures_go_one_at_a_time(tiny_pipe, tmp_path, monkeypatch):
    """A batch holds at most ENCODE_PIXELS pixels (a 1024x1024 data set: one picture a VAE call, as
    before batching): with the budget at one 64x48 picture, the default batch gives exactly the
    one-at-a-time tensors."""
    from tagmoe_core.training import data

    samples = read_samples(make_data(tmp_path / "d"))
    single = encode_samples(tiny_pipe, samples, seed=5, batch=1)
    monkeypatch.setattr(data, "ENCODE_PIXELS", 64 * 48)
    for one, capped in zip(single, encode_samples(tiny_pipe, samples, seed=5)):
        assert torch.equal(one.target, capped.target)
        assert (one.condition is None) == (capped.condition is None)
        assert one.condition is None or torch.equal(one.condition, capped.condition)


def test_encoding_builds_condition_and_text_as_inference_does(tiny_pipe, tmp_path):
    samples = read_samples(make_data(tmp_path / "d"))
    encoded = encode_samples(tiny_pipe, samples, seed=5, batch=1)  # one picture a VAE call
    edit, t2i = encoded[0], encoded[3]
    assert edit.target.shape == (12, 64) and edit.condition.shape == (12, 64) and t2i.condition is None
    assert edit.img_shapes == [(1, 3, 4), (1, 3, 4)] and t2i.img_shapes == [(1, 3, 4)]
    # The condition: the pipeline's own preparation, with the posterior sampled from the seeded generator.
    generator = torch.Generator().manual_seed(5 * 1_000_003 + 0)
    prepared = tiny_pipe.prepare_condition(Image.open(samples[0].input), 64, 48, generator=generator)
    assert torch.equal(edit.condition, prepared.tokens[0])
    assert torch.equal(edit.prompt, tiny_pipe.encode_prompt("Make the circle red").embeds[0])
    # Encoded in batches (the VAE on several pictures at once, each condition's own noise): the same
    # tokens within float rounding, the conditions' posterior draws unchanged.
    batched = encode_samples(tiny_pipe, samples, seed=5, batch=3)
    for one, many in zip(encoded, batched):
        torch.testing.assert_close(many.target, one.target, rtol=1e-5, atol=1e-5)
        if one.condition is not None:
            torch.testing.assert_close(many.condition, one.condition, rtol=1e-5, atol=1e-5)
        assert torch.equal(many.prompt, one.prompt) and many.tag_ids == one.tag_ids
    # The target: what a run's output tokens are before they are decoded (VAE mean, normalised, packed).
    dist = tiny_pipe.vae.encode(torch.zeros(1, 3, 1, 48, 64)).latent_dist
    assert target_tokens(tiny_pipe, Image.new("RGB", (64, 48), (128, 128, 128))).shape == pack(dist.mode()).shape[1:]
    again = encode_samples(tiny_pipe, samples, seed=5)  # reproducible, in the default batches too
    assert torch.equal(again[0].condition, encode_samples(tiny_pipe, samples, seed=5)[0].condition)
    assert torch.equal(encode_samples(tiny_pipe, samples, seed=5, batch=1)[0].condition, edit.condition)


def _break(root, case: str) -> str:
    """Spoil a good data folder one way; the words its error must contain."""
    entries = [json.loads(line) for line in (root / "samples.jsonl").read_text().splitlines()]
    if case == "missing image":
        (root / "1_in.png").unlink()
        return "does not exist"
    if case == "unreadable image":
        (root / "2_out.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        return "cannot be read"
    if case == "mismatched sizes":
        scene((1, 2, 3), (48, 48)).save(root / "0_in.png")
        return "same size"
    if case == "not whole patches":
        scene((1, 2, 3), (60, 48)).save(root / "3.png")
        scene((1, 2, 3), (60, 48)).save(root / "3_in.png")
        entries.append({"input": "3_in.png", "target": "3.png", "instruction": "Make it red"})
    elif case == "empty instruction":
        entries[1]["instruction"] = "   "
        write_samples(root, entries)
        return "instruction is empty"
    elif case == "bad tags":
        entries[0]["tags"] = ["local editing", "global editing"]
        write_samples(root, entries)
        return "exactly one scope"
    elif case == "edit scope without input":
        entries[3]["tags"] = ["local editing"]
        write_samples(root, entries)
        return "text-to-image"
    elif case == "bad json":
        (root / "samples.jsonl").write_text((root / "samples.jsonl").read_text() + "{not json\n")
        return "not a JSON object"
    elif case == "no samples file":
        (root / "samples.jsonl").unlink()
        return "no samples.jsonl"
    write_samples(root, entries)
    return "multiple of 16"


CASES = ["missing image", "unreadable image", "mismatched sizes", "not whole patches", "empty instruction",
         "bad tags", "edit scope without input", "bad json", "no samples file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_one_line_before_training(case, tiny_bundle, tmp_path):
    root = make_data(tmp_path / "d")
    words = _break(root, case)
    steps = []
    config = TrainConfig(data=str(root), output=str(tmp_path / "out"), base=str(tiny_bundle.base),
                         tagmoe=str(tiny_bundle.tagmoe), steps=2, device="cpu")
    with pytest.raises(DataError) as info:
        train(config, progress=steps.append)
    message = str(info.value)
    assert words in message and "\n" not in message, message
    assert "samples.jsonl" in message or case == "missing image" or "1_in.png" in message
    assert steps == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, shape, error, words", [
    ("img_in.weight", (7, 64), ShapeMismatchError, "[32, 64]"),  # not the base model's size
    ("transformer_blocks.3.img_mlp.router.layer.weight", (4, 24), InconsistentExpertsError, "router"),
])
def test_a_checkpoint_of_the_wrong_shape_is_refused_before_training(key, shape, error, words, tiny_bundle, tmp_path):
    state = {}
    for shard in sorted((tiny_bundle.tagmoe / "transformer").glob("*.safetensors")):
        state.update(load_file(shard))
    state[key] = torch.zeros(shape)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    steps = []
    config = TrainConfig(data=str(make_data(tmp_path / "d")), output=str(tmp_path / "out"),
                         base=str(tiny_bundle.base), tagmoe=str(bad), steps=2, device="cpu")
    with pytest.raises(TagMoEError) as info:
        train(config, progress=steps.append)
    assert isinstance(info.value, error) and words in str(info.value) and "\n" not in str(info.value)
    assert steps == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, words", [(["--steps", "0"], "--steps"), (["--lr", "nan"], "--lr"),
                                          (["--lambda-align", "-1"], "--lambda-align"),
                                          (["--ema-decay", "1"], "--ema-decay"),
                                          (["--optimizer", "muon"], "--train whole"),
                                          (["--optimizer", "muon", "--train", "whole", "--muon-lr", "-1"],
                                           "--muon-lr")])
def test_bad_flags_are_one_line_errors(flags, words, tiny_bundle, tmp_path, capsys):
    code = main(["train", "--tiny", "--data", str(make_data(tmp_path / "d")), "--output", str(tmp_path / "o"),
                 "--device", "cpu", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and words in err and "\n" not in err, err


def test_cli_reports_bad_data_in_one_line(tiny_bundle, tmp_path, capsys):
    root = make_data(tmp_path / "d")
    _break(root, "mismatched sizes")
    code = main(["train", "--tiny", "--data", str(root), "--output", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "same size" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_config_checks_do_not_need_data(tmp_path):
    with pytest.raises(InputError, match="--train"):
        train(TrainConfig(data=str(tmp_path), output=str(tmp_path / "o"), base="b", tagmoe="t", train="experts"))
