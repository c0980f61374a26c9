"""Pack a finished ``scripts/train_tiny.py`` run as the trained tiny model the package ships.

    python scripts/pack_tiny.py OUT --demo heldout:16 --commit COMMIT [--pictures docs] [--target DIR]

Writes OUT/bundle with its weights in fp16 (``training.bundle.pack_bundle``; the dense base
transformer's weights left out: the TAG-MoE checkpoint is complete), the input picture of one of the
run's samples (``--demo SPLIT:INDEX``, a split of OUT/data) as ``demo.png`` (what ``tagmoe edit --tiny``
edits when no picture is given), and a ``README.md`` card from OUT/report.json: what the model is, the
command that made it, and its measured success per task. With ``--pictures DIR`` it then draws the
README's pictures with the packed model: ``tiny_demo.png`` (the demo picture and what the README's demo
command makes of it) and ``tiny_tasks.png`` (the first held-out sample of each task: input, output,
the rule's verdict). Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tagmoe_core.tiny import TRAINED_ROOT, TinyBundle, trained_tiny_bundle  # noqa: E402
from tagmoe_core.training import synthetic  # noqa: E402
from tagmoe_core.training.bundle import pack_bundle  # noqa: E402

SPLITS = {"eval": "held-out (pairs training never drew)", "eval_unseen": "unseen pictures of trained pairs",
          "eval_train": "training samples"}


def command_of(args: dict) -> str:
    """The train_tiny.py flags a run's report records that differ from the script's defaults (those
    whose default is derived from others, and the evaluation's, left out)."""
    import train_tiny  # scripts/ is on the path when this file runs

    defaults = vars(train_tiny.build_parser().parse_args(["OUT"]))
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in args.items()
             if k in defaults and k not in ("output", "threads", "log_every", "vae_decoder_steps")
             and not k.startswith("eval") and str(defaults[k]) != str(v)]
    return " ".join(["python scripts/train_tiny.py OUT", *flags])


def card(report: dict, demo: synthetic.TaskSpec, commit: str) -> str:
    lines = [
        "# The trained tiny TAG-MoE (synthetic shapes)",
        "",
        "A tiny TAG-MoE (Qwen-Image's transformer at 4 layers x 4 heads x 32, the last 2 image FFNs 4-expert",
        "top-1 MoE layers with the task-tag heads; 3.5 M parameters) with a tiny Qwen-Image VAE, trained on the",
        "CPU by `scripts/train_tiny.py` on 64x64 pictures of circles, squares and triangles",
        "(`tagmoe_core/training/synthetic.py`): recolour an object, add or remove one, change the background,",
        "grayscale, invert, and text-to-image. It is a model for checking the machinery (loading, routing,",
        "tags, the nodes) on pictures that mean something, not a sample of TAG-MoE's quality; its text",
        "encoder is the random tiny one, frozen.",
        "",
        f"Made by `{command_of(report['args'])}` at commit {commit}, packed by `scripts/pack_tiny.py`",
        "(weights stored in fp16). Success by the task set's pixel rule (`training/task_success.py`), 20 Euler",
        "steps, cfg 1, one sample each:",
        "",
        "| task | " + " | ".join(SPLITS[k] for k in SPLITS if k in report) + " |",
        "| --- |" + " ---: |" * sum(k in report for k in SPLITS),
    ]
    tasks = report["eval"]["tasks"]
    for task in tasks:
        cells = []
        for key in SPLITS:
            if key in report:
                row = report[key]["tasks"].get(task)
                cells.append(f"{row['success']:.0%} of {row['n']}" if row else "")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **all** | " + " | ".join(f"**{report[k]['success']:.1%}** of {report[k]['n']}"
                                           for k in SPLITS if k in report) + " |")
    lines += ["", f"`demo.png` is the input of a held-out sample: \"{demo.instruction}\" is the instruction it was",
              "drawn for. `tagmoe edit --tiny` edits it when no picture is given.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished train_tiny.py OUT folder")
    parser.add_argument("--demo", default="heldout:16",
                        help="SPLIT:INDEX of the sample whose input is demo.png (16: the shipped one, a green circle)")
    parser.add_argument("--target", type=Path, default=TRAINED_ROOT)
    parser.add_argument("--commit", default="(not recorded)", help="the commit the run's script was at")
    parser.add_argument("--pictures", type=Path, default=None,
                        help="then draw the README's pictures of the packed model into this folder")
    args = parser.parse_args(argv)
    if args.pictures is not None and args.target.resolve() != TRAINED_ROOT:
        parser.error("--pictures draws what `tagmoe edit --tiny` makes, so it needs the package's --target")
    report = json.loads((args.run / "report.json").read_text())
    split, _, index = args.demo.partition(":")
    spec = synthetic.read_tasks(args.run / "data" / split)[int(index)]
    picture = spec.input_image()
    if picture is None:
        raise SystemExit(f"--demo {args.demo}: that sample ({spec.task}) has no input picture")
    pack_bundle(TinyBundle(args.run / "bundle"), args.target, demo_picture=picture,
                card=card(report, spec, args.commit))
    bundle = trained_tiny_bundle(args.target)
    size = sum(p.stat().st_size for p in bundle.root.rglob("*") if p.is_file())
    print(f"packed {args.run} into {bundle.root} ({size / 1e6:.1f} MB)")
    if args.pictures is not None:
        draw_pictures(bundle, args.pictures)
    return 0


DEMO_ARGS = ("--prompt", "Remove the circle", "--steps", "20", "--seed", "0")  # the README's demo command
SCALE = 3  # the pictures are 64x64: drawn at 192x192, pixels kept sharp


def _big(image):
    from PIL import Image

    return image.resize((image.width * SCALE, image.height * SCALE), Image.Resampling.NEAREST)


def _captioned(images: list, captions: list[str], rows: int, path: Path) -> None:
    from PIL import Image, ImageDraw

    side, text_height = 64 * SCALE, 48
    columns = len(images) // rows
    sheet = Image.new("RGB", (columns * (side + 8) + 8, rows * side + (rows + 1) * 8 + text_height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        x, y = 8 + column * (side + 8), 8 + row * (side + 8)
        if image is not None:
            sheet.paste(_big(image), (x, y))
        else:
            draw.rectangle([x, y, x + side - 1, y + side - 1], outline=(200, 200, 200))
    y = 8 + rows * (side + 8)
    for column, caption in enumerate(captions):
        draw.multiline_text((8 + column * (side + 8), y), "\n".join(textwrap.wrap(caption, 30)), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    print(f"wrote {path}")


def draw_pictures(bundle: TinyBundle, folder: Path) -> None:
    import tempfile

    import torch
    from PIL import Image

    from tagmoe_core.cli import main as tagmoe
    from tagmoe_core.pipeline.builder import load_pipeline
    from tagmoe_core.tiny import trained_tiny_demo_picture
    from tagmoe_core.training.evaluation import judge_sample

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "demo.png"
        if tagmoe(["edit", "--tiny", *DEMO_ARGS, "--output", str(out)]) != 0:
            raise SystemExit("the README's demo command failed")
        demo = Image.open(out).convert("RGB")
    _captioned([trained_tiny_demo_picture(), demo], ["input (demo.png)", f"\"{DEMO_ARGS[1]}\", seed 0"], 1,
               folder / "tiny_demo.png")
    pipe = load_pipeline(bundle.base, bundle.tagmoe, device="cpu", dtype=torch.float32, backend="torch",
                         placement="single")
    inputs, outputs, captions = [], [], []
    for index, task in enumerate(synthetic.TASKS):
        spec = synthetic.make_sample(index, split="heldout")
        judged = judge_sample(pipe, spec, seed=index)
        inputs.append(spec.input_image())
        outputs.append(judged.output)
        captions.append(f"{task}: \"{spec.instruction}\" {'success' if judged.ok else 'FAILED'}")
    _captioned(inputs + outputs, captions, 2, folder / "tiny_tasks.png")


if __name__ == "__main__":
    sys.exit(main())
