"""The command line on the tiny model: the reference's flags, outputs and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagmoe_core.cli import main


def test_edit_with_reference_flags(tiny_bundle, photo, tmp_path, capsys):
    photo.save(tmp_path / "in.png")
    code = main(["edit", "--pretrained_model_path", str(tiny_bundle.base), "--transformer_model_path",
                 str(tiny_bundle.tagmoe), "--device", "cpu", "--image", str(tmp_path / "in.png"),
                 "--prompt", "Change the cloak to red color", "--width", "64", "--height", "32", "--steps", "2",
                 "--seed", "3", "--cfg", "4.0", "--output", str(tmp_path / "out.png")])
    assert code == 0
    assert Image.open(tmp_path / "out.png").size == (64, 32)
    assert "seed 3" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_edit_keeping_the_original_size(tiny_bundle, photo, tmp_path):
    photo.save(tmp_path / "p.png")
    assert main(["edit", "--tiny", "--prompt", "Make it night", "--image", str(tmp_path / "p.png"), "--steps", "1",
                 "--cfg", "1", "--keep-original-size", "--num-images", "2", "--output", str(tmp_path / "e.png")]) == 0
    assert {Image.open(tmp_path / f"e_{i}.png").size for i in range(2)} == {photo.size}


def test_tiny_edits_its_demo_picture_at_its_size(tmp_path):
    """--tiny without --image or a size: the trained tiny model's demo picture, at the 64x64 it knows."""
    from tagmoe_core.tiny import TRAINED_SIZE

    assert main(["edit", "--tiny", "--prompt", "Remove the circle", "--steps", "2", "--output",
                 str(tmp_path / "d.png")]) == 0
    assert Image.open(tmp_path / "d.png").size == (TRAINED_SIZE, TRAINED_SIZE)


def test_tiny_edit_generate_and_dashed_flags(tiny_bundle, tmp_path):
    assert main(["edit", "--tiny", "--prompt", "Make it night", "--width", "32", "--height", "48", "--steps", "1",
                 "--num-images", "2", "--use-vlm", "--output", str(tmp_path / "e.png")]) == 0
    assert {Image.open(tmp_path / f"e_{i}.png").size for i in range(2)} == {(32, 48)}
    assert main(["generate", "--tiny", "--prompt", "a cat", "--width", "48", "--height", "32", "--steps", "1",
                 "--seed", "1", "--output", str(tmp_path / "g")]) == 0
    assert Image.open(tmp_path / "g.png").size == (48, 32)


def test_region_flag(tiny_bundle, tmp_path):
    assert main(["edit", "--tiny", "--prompt", "Remove the sun", "--width", "64", "--height", "48", "--steps", "1",
                 "--region", "32,0,64,24", "--output", str(tmp_path / "r.png")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["edit", "--prompt", "x", "--output", "o.png"], "--pretrained_model_path"),
    (["edit", "--tiny", "--prompt", "x", "--image", "missing.png", "--output", "o.png"], "does not exist"),
    (["edit", "--tiny", "--prompt", "x", "--width", "33", "--output", "o.png"],
     "--width must be a positive multiple of 16"),
    (["edit", "--tiny", "--prompt", "x", "--steps", "0", "--output", "o.png"], "at least 1"),
    (["edit", "--tiny", "--prompt", "x", "--region", "1,2,3", "--output", "o.png"], "four numbers"),
    (["edit", "--tiny", "--prompt", "x", "--device", "7", "--output", "o.png"], "CUDA"),
    (["edit", "--pretrained_model_path", "/nonexistent/base", "--transformer_model_path", "/nonexistent/w",
      "--prompt", "x", "--image", "in.png", "--output", "o.png"], "does not exist"),
])
def test_errors_are_one_line_messages(tiny_bundle, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in err


NO_MODEL = ["--pretrained_model_path", "/nonexistent/base", "--transformer_model_path", "/nonexistent/w"]


@pytest.mark.parametrize("extra, message", [
    (["--cfg", "nan"], "--cfg must be a finite number"),
    (["--cfg", "inf"], "--cfg must be a finite number"),
    (["--cfg", "-1"], "--cfg must not be negative"),
    (["--region", "0,0,nan,20"], "must be four finite numbers"),
    (["--region", "0,0,inf,20"], "must be four finite numbers"),
    (["--region", "0,0,40,40"], "must lie inside the 32x24 image"),
])
def test_bad_numbers_are_refused_before_loading(tmp_path, monkeypatch, capsys, extra, message):
    """Checked before the model loads: the model paths here do not exist, so a check made after
    loading would report those instead."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 24)).save(tmp_path / "in.png")
    assert main(["edit", *NO_MODEL, "--prompt", "x", "--image", "in.png", "--output", "o.png", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err and "does not exist" not in err


def _read_only_folder(tmp_path):
    """A folder this process cannot write in: chmod 555, or (root may write there) a sysfs folder."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    return Path("/sys/kernel")


@pytest.mark.parametrize("output, message", [
    ("out.txt", "'.txt' is not an image format"),
    ("out.xbm", "'.xbm' is not an image format"),  # PIL writes XBM, but only 1-bit pictures
    ("a-file/out.png", "is a file, not a folder"),
    ("a-folder.png", "is a folder"),
    ("READ-ONLY/out.png", "cannot write in"),
])
def test_unwritable_outputs_are_refused_before_loading(tmp_path, monkeypatch, capsys, output, message):
    """They raised a traceback after the run, and the image was lost."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 24)).save(tmp_path / "in.png")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder.png").mkdir()
    output = output.replace("READ-ONLY", str(_read_only_folder(tmp_path)))
    assert main(["edit", *NO_MODEL, "--prompt", "x", "--image", "in.png", "--output", output]) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err and "does not exist" not in err


@pytest.mark.parametrize("extra, message", [
    (["--seed", str(2**64)], "seed must be -1 (random) or between 0 and"),
    (["--seed", "-2"], "seed must be -1 (random) or between 0 and"),
    (["--num-images", "0"], "at least 1"),
    (["--width", "40"], "--width must be a positive multiple of 16"),
])
def test_run_settings_are_checked_before_loading(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (32, 24)).save(tmp_path / "in.png")
    assert main(["edit", *NO_MODEL, "--prompt", "x", "--image", "in.png", "--output", "o.png", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err and "does not exist" not in err


@pytest.mark.parametrize("model", [NO_MODEL, ["--tiny"]], ids=["release-shapes", "tiny"])
@pytest.mark.parametrize("extra", [["--width", "32768", "--height", "32768"],
                                   ["--width", "1024", "--height", "1024", "--num-images", "100000"]])
def test_runs_that_cannot_fit_are_refused_before_loading(tiny_bundle, tmp_path, monkeypatch, capsys, model, extra):
    """Estimated from the configs (the release's shapes when the base is not at hand) before the
    weights are read: the release-shapes case names model paths that do not exist."""
    monkeypatch.chdir(tmp_path)
    assert main(["generate", *model, "--prompt", "a cat", "--output", "o.png", *extra]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "needs ~" in last and "would fit" in last and "Traceback" not in err and "does not exist" not in err
    assert "loaded in" not in err


def test_a_result_that_cannot_be_written_is_kept(tiny_bundle, tmp_path, capsys):
    """The disk fills up after the run (a link to /dev/full): the image goes to the temporary
    folder, and the error says where."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    (tmp_path / "full.png").symlink_to("/dev/full")
    code = main(["generate", "--tiny", "--prompt", "a cat", "--width", "32", "--height", "32", "--steps", "1",
                 "--seed", "5", "--output", str(tmp_path / "full.png")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: could not write") and "saved to " in last
    kept = Path(last.split("saved to ")[1].split(" instead")[0])
    assert Image.open(kept).size == (32, 32)
    kept.unlink()


def test_not_an_image(tiny_bundle, tmp_path, capsys):
    (tmp_path / "in.png").write_text("not an image")
    assert main(["edit", "--tiny", "--prompt", "x", "--image", str(tmp_path / "in.png"), "--output", "o.png"]) == 2
    assert "cannot be read as an image" in capsys.readouterr().err


def test_a_phone_photo_is_edited_upright(tiny_bundle, photo, tmp_path):
    """EXIF orientation 6 (stored sideways, "rotate 90 CW to view"): the same edit as the upright picture."""
    upright = photo.transpose(Image.Transpose.ROTATE_270)
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "phone.png", exif=exif)
    for name in ("upright", "phone"):
        assert main(["edit", "--tiny", "--prompt", "Make it night", "--image", str(tmp_path / f"{name}.png"),
                     "--width", "32", "--height", "48", "--steps", "1", "--seed", "2",
                     "--output", str(tmp_path / f"{name}-out.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "phone-out.png")),
                          np.asarray(Image.open(tmp_path / "upright-out.png")))


def test_module_entry_point_runs(tiny_bundle, tmp_path):
    """`tagmoe tiny` names the shipped trained model; `--random` builds (here: finds) the tests' random one."""
    from tagmoe_core.tiny import trained_tiny_bundle

    out = subprocess.run([sys.executable, "-m", "tagmoe_core", "tiny"], capture_output=True, text=True, check=True)
    assert str(trained_tiny_bundle().base) in out.stdout
    out = subprocess.run([sys.executable, "-m", "tagmoe_core", "tiny", "--random"], capture_output=True, text=True,
                         check=True)
    assert str(tiny_bundle.base) in out.stdout


@pytest.mark.parametrize("command", ["edit", "generate"])
def test_unexpected_keys_name_the_flag_that_ignores_them(command, tiny_bundle, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    state = {"ema.shadow.weight": torch.zeros(2)}
    for shard in sorted((tiny_bundle.tagmoe / "transformer").glob("*.safetensors")):
        state.update(load_file(shard))
    save_file(state, tmp_path / "extra.safetensors")
    argv = [command, "--pretrained_model_path", str(tiny_bundle.base), "--transformer_model_path",
            str(tmp_path / "extra.safetensors"), "--device", "cpu", "--prompt", "x", "--width", "32", "--height",
            "32", "--steps", "1", "--output", str(tmp_path / "out.png")]
    if command == "edit":
        Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
        argv += ["--image", str(tmp_path / "in.png")]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ema.shadow.weight" in last and "--ignore-unexpected-keys" in last and "strict=False" not in last
    assert main(argv + ["--ignore-unexpected-keys"]) == 0
    assert Image.open(tmp_path / "out.png").size == (32, 32)
    assert "ignored 1 unexpected key(s)" in capsys.readouterr().err


def test_missing_base_folder_is_reported_before_loading(tiny_bundle, tmp_path, capsys):
    code = main(["generate", "--pretrained_model_path", str(tmp_path / "Qwen-Image"), "--transformer_model_path",
                 str(tiny_bundle.tagmoe), "--device", "cpu", "--prompt", "x", "--output", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "internet" not in err
    assert err.strip().splitlines()[-1].startswith("error: the base model folder")
