"""The synthetic task set (training/synthetic.py) and its success rule (training/task_success.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from tagmoe_core.cli import main
from tagmoe_core.errors import DataError
from tagmoe_core.intent.tagging import rule_tags
from tagmoe_core.training.data import encode_samples, read_samples
from tagmoe_core.training.synthetic import (
    COLOURS, HELDOUT_ON_BACKGROUND, HELDOUT_SHAPE_COLOURS, SHAPES, TASK_TAGS, TASKS, TEMPLATES, is_heldout_pair,
    make_sample, make_samples, read_tasks, render, render_background, shape_mask, write_dataset)
from tagmoe_core.training.task_success import check_task, task_success

# Seven of each task per split: enough to cover every rule, fast (~1.5 ms a check).
SPECS = make_samples(49, seed=5, split="train") + make_samples(49, seed=5, split="heldout")


def _ids(spec):
    return f"{spec.split}-{spec.index}-{spec.task}"


def test_generation_is_deterministic_for_a_seed(tmp_path):
    first, again = make_samples(21, seed=3), make_samples(21, seed=3)
    assert [s.to_dict() for s in first] == [s.to_dict() for s in again]
    assert [s.to_dict() for s in make_samples(21, seed=4)] != [s.to_dict() for s in first]
    # Sample i depends on (seed, split, i) only, not on how many are drawn.
    assert make_sample(13, seed=3).to_dict() == first[13].to_dict()
    assert [s.task for s in first[:7]] == list(TASKS)
    write_dataset(tmp_path / "a", 14, seed=3)
    write_dataset(tmp_path / "b", 14, seed=3)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) == 3 + 14 + 12
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_later_range_of_the_train_split_is_new_samples_of_the_same_kind(tmp_path):
    """``start``: samples drawn as the training ones, after them (the script's unseen split)."""
    train = make_samples(70, seed=2)
    later = make_samples(28, seed=2, start=70)
    assert [s.index for s in later] == list(range(70, 98))
    assert [s.to_dict() for s in later] == [make_sample(i, seed=2).to_dict() for i in range(70, 98)]
    assert [s.task for s in later[:7]] == list(TASKS)  # 70 is a multiple of 7: the tasks in turn again
    seen = [{k: v for k, v in s.to_dict().items() if k != "index"} for s in train]
    assert not any({k: v for k, v in s.to_dict().items() if k != "index"} in seen for s in later)
    assert not any(map(is_heldout_pair, (p for s in later for p in s.all_pairs())))
    report = write_dataset(tmp_path, 7, seed=2, start=70)
    assert report.count == 7 and [s.index for s in read_tasks(tmp_path)] == list(range(70, 77))
    assert json.loads((tmp_path / "synthetic.json").read_text())["start"] == 70
    with pytest.raises(DataError, match="index must be 0 or more"):
        write_dataset(tmp_path / "bad", 7, start=-1)


def test_held_out_combinations_never_occur_in_the_train_split():
    train, heldout = make_samples(700, seed=0, split="train"), make_samples(140, seed=0, split="heldout")
    for spec in train:
        assert not any(map(is_heldout_pair, spec.all_pairs())), spec.to_dict()
        text = spec.instruction.lower()
        for shape, colour in HELDOUT_SHAPE_COLOURS:
            assert f"{colour} {shape}" not in text and f"{shape} {colour}" not in text and \
                f"{shape} to {colour}" not in text, text
    for spec in heldout:
        assert any(map(is_heldout_pair, spec.focus_pairs())), spec.to_dict()
    # The pixels agree: no train image holds a held-out pair (objects read back from the picture).
    for spec in train[:70]:
        for scene in filter(None, (spec.source, spec.result)):
            for obj in scene.objects:
                assert (obj.shape, obj.colour) not in HELDOUT_SHAPE_COLOURS
                assert (obj.colour, scene.background) not in HELDOUT_ON_BACKGROUND
                pixels = np.asarray(render(scene, spec.size))[shape_mask(obj, spec.size)]
                if scene.filter is None:
                    assert (pixels == COLOURS[obj.colour]).all()
    every = {p for s in heldout for p in s.focus_pairs() if is_heldout_pair(p)}
    assert every == set(HELDOUT_SHAPE_COLOURS) | set(HELDOUT_ON_BACKGROUND)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_sample_loads_through_the_training_data_checks(tmp_path, split):
    report = write_dataset(tmp_path, 35, seed=1, split=split, size=(96, 64))
    assert report.count == 35 and set(report.per_task.values()) == {5}
    samples, specs = read_samples(tmp_path), read_tasks(tmp_path)
    assert len(samples) == len(specs) == 35
    rows = [json.loads(line) for line in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    for sample, spec, row in zip(samples, specs, rows):
        assert sample.target.name == row["target"] and sample.tags == spec.tags and not sample.tags_from_rules
        assert (sample.width, sample.height) == (96, 64) and spec.split == split
        assert sample.instruction == spec.instruction
        if spec.task == "text2image":
            assert sample.input is None and row["input"] is None and spec.source is None
            assert sample.tags.scope == "image generation"
        else:
            assert sample.input is not None and sample.input.name == row["input"]
    assert specs == make_samples(35, seed=1, split=split, size=(96, 64))  # (the paths aside)
    manifest = json.loads((tmp_path / "synthetic.json").read_text())
    assert manifest["split"] == split and manifest["count"] == 35


def test_the_rule_tagger_reads_every_template_as_the_generator_tags_it():
    """Training tags and the tags ``tagmoe edit`` gives the same instruction agree."""
    for task, templates in TEMPLATES.items():
        for template in templates:
            for shape in SHAPES:
                for colour in COLOURS:
                    text = template.format(shape=shape, colour=colour, background="yellow")
                    assert rule_tags(text, has_image=task != "text2image") == TASK_TAGS[task], (task, text)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_the_generators_own_target_succeeds(spec):
    verdict = check_task(spec.input_image(), spec, spec.target_image())
    assert verdict.ok, verdict.summary()
    # As the pipeline decodes it too: floats in 0..1, [1, H, W, 3].
    floats = np.asarray(spec.target_image(), dtype=np.float32)[None] / 255.0
    assert task_success(spec.input_image(), spec.to_dict(), floats)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_clearly_wrong_outputs_fail(spec):
    source = spec.input_image()
    noise = np.random.default_rng(spec.index).integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8)
    assert not task_success(source, spec, noise)
    if source is not None:
        assert not task_success(source, spec, source), "the input unchanged"
    assert not task_success(source, spec, _with_extra_object(spec)), "an extra object"
    if spec.colour is not None:
        assert not task_success(source, spec, _wrong_colour(spec)), "a wrong colour"
    assert not task_success(source, spec, spec.target_image().resize((spec.width + 16, spec.height)))


def _with_extra_object(spec):
    """The target with a 12-pixel square of another colour where there is room."""
    picture = spec.target_image()
    taken = np.zeros((spec.height, spec.width), dtype=bool)
    for obj in spec.result.objects:
        taken |= shape_mask(obj, spec.size)
    for y in range(2, spec.height - 14, 2):
        for x in range(2, spec.width - 14, 2):
            if not taken[max(0, y - 3):y + 15, max(0, x - 3):x + 15].any():
                fill = (250, 0, 250) if spec.result.filter else _other(spec, {spec.result.background, spec.colour})
                ImageDraw.Draw(picture).rectangle((x, y, x + 11, y + 11), fill=fill)
                return picture
    pytest.skip("no room for another object")  # pragma: no cover


def _other(spec, avoid):
    return COLOURS[next(c for c in COLOURS if c not in avoid and c != "black")]


def _wrong_colour(spec):
    if spec.task == "background":
        avoid = {spec.colour, spec.source.background} | {o.colour for o in spec.result.objects}
        wrong = next(c for c in COLOURS if c not in avoid)
        return render(replace(spec.result, background=wrong), spec.size)
    avoid = {spec.colour, spec.result.background} | ({spec.source.background} if spec.source else set())
    wrong = next(c for c in COLOURS if c not in avoid)
    objects = list(spec.result.objects)
    objects[spec.subject] = replace(objects[spec.subject], colour=wrong)
    return render(replace(spec.result, objects=tuple(objects)), spec.size)


def test_a_wrong_shape_or_place_fails():
    t2i = next(s for s in SPECS if s.task == "text2image")
    obj = t2i.result.objects[0]
    other = next(s for s in SHAPES if s != obj.shape)
    verdict = check_task(None, t2i, render(replace(t2i.result, objects=(replace(obj, shape=other),)), t2i.size))
    assert verdict.failed() == ["shape"], verdict.summary()
    s = obj.box[2] - obj.box[0]
    corner = replace(obj, box=(2, 2, 2 + s, 2 + s))
    verdict = check_task(None, t2i, render(replace(t2i.result, objects=(corner,)), t2i.size))
    assert verdict.failed() == ["in the middle"], verdict.summary()
    add = next(s for s in SPECS if s.task == "add" and len(s.source.objects) < 2)
    new = add.result.objects[add.subject]
    unused = next(s for s in SHAPES if s != new.shape and s not in {o.shape for o in add.source.objects})
    drawn = render(replace(add.result, objects=add.source.objects + (replace(new, shape=unused),)), add.size)
    verdict = check_task(add.input_image(), add, drawn)
    assert verdict.failed() == ["shape"], verdict.summary()


def _blended_edge(spec):
    """The target with a one-pixel ring around the new object halfway between its colour and the
    background's: the soft edge a decoder draws."""
    picture = np.asarray(spec.target_image(), dtype=np.float64).copy()
    obj = shape_mask(spec.result.objects[spec.subject], spec.size)
    background = np.asarray(render_background(spec.result, spec.size), dtype=np.float64)
    ring = ~obj & (np.array(Image.fromarray(obj.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0)
    picture[ring] = (background[ring] + np.asarray(COLOURS[spec.colour], dtype=np.float64)) / 2
    return picture.round().astype(np.uint8), int(obj.sum()), int(ring.sum())


@pytest.mark.parametrize("task", ["add", "text2image"])
def test_a_soft_edge_around_a_drawn_object_is_not_judged_as_its_colour(task):
    # The ring is found as part of the object (it is farther than colour_tol from the background)
    # but is neither colour: judged whole, a small object's ring alone failed the colour check.
    spec = next(s for s in SPECS if s.task == task and _blended_edge(s)[2] > 0.25 * _blended_edge(s)[1])
    picture, _, _ = _blended_edge(spec)
    verdict = check_task(spec.input_image(), spec, picture)
    assert verdict.ok, verdict.summary()
    # The interior still decides: the right edge around a wrong colour fails.
    wrong = np.asarray(_wrong_colour(spec), dtype=np.float64)
    obj = shape_mask(spec.result.objects[spec.subject], spec.size)
    picture = picture.copy()
    picture[obj] = wrong[obj]
    assert "colour" in check_task(spec.input_image(), spec, picture).failed()


def test_synth_data_command(tmp_path, capsys):
    assert main(["synth-data", str(tmp_path / "set"), "--count", "7", "--seed", "2", "--split", "heldout"]) == 0
    assert "wrote 7 samples" in capsys.readouterr().out
    assert len(read_samples(tmp_path / "set")) == 7
    assert main(["synth-data", str(tmp_path / "set"), "--count", "7"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["synth-data", str(tmp_path / "odd"), "--count", "7", "--width", "40"]) == 2
    assert "multiple of 16" in capsys.readouterr().err and not (tmp_path / "odd").exists()
    with pytest.raises(DataError, match="split"):
        make_sample(0, split="test")


def test_samples_encode_as_training_encodes_them(tiny_pipe, tmp_path):
    """Edits and text-to-image of the set go through the pipeline's own conditioning (no training here)."""
    write_dataset(tmp_path, 7, seed=0)
    encoded = encode_samples(tiny_pipe, read_samples(tmp_path))
    assert [e.condition is None for e in encoded] == [t == "text2image" for t in TASKS]
    for e in encoded:
        assert e.target.shape[0] == (64 // 16) ** 2 and (e.condition is None or e.condition.shape == e.target.shape)
