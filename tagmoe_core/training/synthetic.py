"""A procedurally generated multi-task editing set: shapes on backgrounds, no downloads, seeded.

Every sample is drawn from a structured description (:class:`TaskSpec`): a source scene (none for
text-to-image), the scene the instruction asks for, and what the instruction names. Scenes are
small RGB pictures (64x64 by default; any multiples of 16) of up to :data:`MAX_OBJECTS` objects of
different shapes (circle, square, triangle) in named colours (:data:`COLOURS`) on a plain background
or (a :data:`TWO_TONE` share of scenes) a two-tone one (below a horizontal split the
background's darker :func:`shade`), drawn without anti-aliasing so that every pixel is a palette
colour. Objects are 28-38% of the picture's short side: at Qwen-Image's 8x VAE downsampling that is
2-3 latent pixels a side (version 1's 22-34% and three objects came back from a tiny VAE as blobs
that merged, which capped every task's success whatever the transformer did).

The tasks cover the paper's scopes, one of :data:`TASKS` per sample in turn (sample ``i`` has task
``TASKS[i % 7]``), each with fixed tags that the rule tagger (``intent.tagging.rule_tags``) also
reads from every instruction template, so training and ``tagmoe edit`` tag alike:

=============  =======================================  =========================================
task           instruction (one of a few templates)     tags (scope; types; preservations)
=============  =======================================  =========================================
recolour       "Make the circle red"                    local; attribute; background, identity,
                                                        style
add            "Add a blue square"                      local; object; background, identity, style
remove         "Remove the triangle"                    local; object; background, identity, style
background     "Make the background green"              local; attribute, background; identity,
                                                        style
grayscale      "Turn the whole image black and white"   global; style transfer; structure, identity
invert         "Invert the colours of the whole image"  global; attribute; structure, identity
text2image     "A blue square on a yellow background"   image generation (no input image)
=============  =======================================  =========================================

Held-out split (for evaluation; never in training): the shape-colour pairs :data:`HELDOUT_SHAPE_COLOURS`
(a green circle, a purple square, a yellow triangle) and the object-on-background colour pairs
:data:`HELDOUT_ON_BACKGROUND` (a red object on a blue background, a white one on a black
background). No image of the ``train`` split (input or target, any object) holds one of them;
every ``heldout`` sample holds one in what its instruction acts on (the recoloured, added or
removed object, the objects on a new background, the whole picture of a global edit, the
text-to-image picture), so success there measures composition of what training taught separately.

Sample ``i`` of a split depends only on (seed, split, i), not on how many are written, so a later
range of ``train`` (``start``) is unseen pictures of the combinations training sees. A data
folder (:func:`write_dataset`, ``tagmoe synth-data``) holds ``samples.jsonl`` as ``tagmoe train``
reads it (``training.data``, which refuses unknown keys) and, line for line, ``tasks.jsonl``: each
sample's :class:`TaskSpec`, which ``training.task_success`` judges an output against.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ..errors import DataError
from ..taxonomy import TaskTags

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
# Grayscale of a white/black picture is itself: a global edit's background is a chromatic colour
# (and a grayscale edit's objects differ in grey level from it, so they stay objects).
CHROMATIC = ("red", "green", "blue", "yellow", "purple")
SPLITS = ("train", "heldout")
HELDOUT_SHAPE_COLOURS: frozenset[tuple[str, str]] = frozenset({("circle", "green"), ("square", "purple"),
                                                               ("triangle", "yellow")})
HELDOUT_ON_BACKGROUND: frozenset[tuple[str, str]] = frozenset({("red", "blue"), ("white", "black")})
TASKS = ("recolour", "add", "remove", "background", "grayscale", "invert", "text2image")
EDITS = TASKS[:-1]

_KEEP_LOCAL = ("background preservation", "identity preservation", "style preservation")
_KEEP_GLOBAL = ("structure preservation", "identity preservation")
TASK_TAGS: dict[str, TaskTags] = {
    "recolour": TaskTags("local editing", ("attribute editing",), _KEEP_LOCAL),
    "add": TaskTags("local editing", ("object editing",), _KEEP_LOCAL),
    "remove": TaskTags("local editing", ("object editing",), _KEEP_LOCAL),
    "background": TaskTags("local editing", ("attribute editing", "background editing"),
                           ("identity preservation", "style preservation")),
    "grayscale": TaskTags("global editing", ("style transfer",), _KEEP_GLOBAL),
    "invert": TaskTags("global editing", ("attribute editing",), _KEEP_GLOBAL),
    "text2image": TaskTags("image generation"),
}
TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": ("Make the {shape} {colour}", "Turn the {shape} {colour}", "Change the {shape} to {colour}",
                 "Recolour the {shape} {colour}", "Paint the {shape} {colour}"),
    "add": ("Add a {colour} {shape}", "Put a {colour} {shape} in the picture", "Draw a {colour} {shape}"),
    "remove": ("Remove the {shape}", "Delete the {shape}", "Erase the {shape}", "Take away the {shape}",
               "Get rid of the {shape}"),
    "background": ("Make the background {colour}", "Change the background to {colour}",
                   "Turn the background {colour}", "Paint the background {colour}",
                   "Change the background colour to {colour}"),
    "grayscale": ("Turn the whole image black and white", "Convert the image to black and white",
                  "Make the whole image black and white"),
    "invert": ("Invert the colours of the whole image", "Make the whole image a colour negative"),
    "text2image": ("A {colour} {shape} on a {background} background",
                   "Draw a {colour} {shape} on a {background} background"),
}
MAX_OBJECTS = 2  # in any picture, input or target
OBJECT_SIZE = (0.28, 0.375)  # an object's side, as a share of the picture's short side
TWO_TONE = 0.2  # the share of scenes with a two-tone background
MIN_GREY_GAP = 32  # grey levels between a grayscale edit's objects and background (~55 in RGB distance)
DEFAULT_SIZE = (64, 64)
GAP = 4  # pixels between objects' boxes (and from the border), so objects never touch
TASKS_FILE = "tasks.jsonl"
MANIFEST_FILE = "synthetic.json"
VERSION = 2  # 2: at most two objects, larger, fewer two-tone backgrounds


def shade(colour: str) -> tuple[int, int, int]:
    """The second tone of a two-tone background of ``colour`` (a darker one; dark grey for black)."""
    if colour == "black":
        return (80, 80, 80)
    return tuple(round(c * 0.72) for c in COLOURS[colour])  # type: ignore[return-value]


# -- scenes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "box": list(self.box)}

    @classmethod
    def from_dict(cls, data: dict) -> "Shape":
        return cls(data["shape"], data["colour"], tuple(int(v) for v in data["box"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Shape, ...] = ()
    split: int | None = None  # two-tone: rows from ``split`` down are ``shade(background)``
    filter: str | None = None  # None, "grayscale" or "invert": applied to the drawn picture

    def to_dict(self) -> dict:
        return {"background": self.background, "split": self.split, "filter": self.filter,
                "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        return cls(data["background"], tuple(Shape.from_dict(o) for o in data.get("objects", ())),
                   data.get("split"), data.get("filter"))

    def pairs(self) -> set[tuple[str, str]]:
        """Its (shape, colour) and (object colour, background colour) pairs."""
        found = {(o.shape, o.colour) for o in self.objects}
        return found | {(o.colour, self.background) for o in self.objects}


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Shape, fill) -> None:
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r} (known: {', '.join(SHAPES)})")


def render_background(scene: Scene, size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, COLOURS[scene.background])
    if scene.split is not None:
        ImageDraw.Draw(image).rectangle((0, scene.split, size[0] - 1, size[1] - 1), fill=shade(scene.background))
    return image


def render(scene: Scene, size: tuple[int, int] = DEFAULT_SIZE) -> Image.Image:
    """The scene as an RGB picture of ``size`` (width, height)."""
    image = render_background(scene, size)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj, COLOURS[obj.colour])
    return apply_filter(image, scene.filter)


def apply_filter(image: Image.Image, name: str | None) -> Image.Image:
    if name is None:
        return image
    if name == "grayscale":
        return image.convert("L").convert("RGB")  # ITU-R 601-2 luma, as PIL computes it
    if name == "invert":
        return ImageOps.invert(image.convert("RGB"))
    raise ValueError(f"unknown filter {name!r}")


def shape_mask(obj: Shape, size: tuple[int, int]) -> np.ndarray:
    """[H, W] bool: the pixels ``obj`` covers when drawn."""
    mask = Image.new("L", size, 0)
    _draw_shape(ImageDraw.Draw(mask), obj, 255)
    return np.array(mask) > 0


# -- task descriptions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """What one sample asks for, structured: the rule in ``task_success`` reads this, never the text.

    ``subject``: the index of the object acted on (recolour, remove: in ``source``; add, text2image:
    in ``result``), None for background and global edits. ``colour`` / ``shape``: what the
    instruction names (the new colour, the added or drawn object's shape, the removed shape)."""

    task: str
    instruction: str
    result: Scene
    source: Scene | None = None
    subject: int | None = None
    colour: str | None = None
    shape: str | None = None
    width: int = DEFAULT_SIZE[0]
    height: int = DEFAULT_SIZE[1]
    split: str = "train"
    index: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def tags(self) -> TaskTags:
        return TASK_TAGS[self.task]

    @property
    def is_edit(self) -> bool:
        return self.source is not None

    def input_image(self) -> Image.Image | None:
        return None if self.source is None else render(self.source, self.size)

    def target_image(self) -> Image.Image:
        return render(self.result, self.size)

    def focus_pairs(self) -> set[tuple[str, str]]:
        """The pairs (see :meth:`Scene.pairs`) in what the instruction acts on."""
        if self.task in ("recolour", "add", "text2image"):
            obj = self.result.objects[self.subject]
            return {(obj.shape, obj.colour), (obj.colour, self.result.background)}
        if self.task == "remove":
            obj = self.source.objects[self.subject]
            return {(obj.shape, obj.colour), (obj.colour, self.source.background)}
        if self.task == "background":
            return {(o.colour, self.result.background) for o in self.result.objects}
        return self.source.pairs()  # global edits act on the whole picture

    def all_pairs(self) -> set[tuple[str, str]]:
        return self.result.pairs() | (self.source.pairs() if self.source is not None else set())

    def to_dict(self) -> dict:
        return {"task": self.task, "instruction": self.instruction, "split": self.split, "index": self.index,
                "width": self.width, "height": self.height, "subject": self.subject, "colour": self.colour,
                "shape": self.shape, "source": None if self.source is None else self.source.to_dict(),
                "result": self.result.to_dict(), **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> "TaskSpec":
        known = {"task", "instruction", "split", "index", "width", "height", "subject", "colour", "shape",
                 "source", "result"}
        return cls(data["task"], data["instruction"], Scene.from_dict(data["result"]),
                   None if data.get("source") is None else Scene.from_dict(data["source"]), data.get("subject"),
                   data.get("colour"), data.get("shape"), int(data["width"]), int(data["height"]),
                   data.get("split", "train"), int(data.get("index", 0)),
                   {k: v for k, v in data.items() if k not in known})


def is_heldout_pair(pair: tuple[str, str]) -> bool:
    return pair in HELDOUT_SHAPE_COLOURS or pair in HELDOUT_ON_BACKGROUND


# -- sampling -------------------------------------------------------------------------------------------
class _Retry(Exception):
    """This draw does not fit (no room, or the wrong split): draw again."""


def _place(rng: random.Random, size: tuple[int, int], taken: list[tuple[int, int, int, int]],
           centred: bool = False) -> tuple[int, int, int, int]:
    w, h = size
    short = min(w, h)
    lo, hi = max(8, round(short * OBJECT_SIZE[0])), max(9, round(short * OBJECT_SIZE[1]))
    for _ in range(50):
        s = rng.randint(lo, hi)
        if centred:
            jitter = max(1, short // 16)
            x0 = (w - s) // 2 + rng.randint(-jitter, jitter)
            y0 = (h - s) // 2 + rng.randint(-jitter, jitter)
        else:
            x0, y0 = rng.randint(GAP, w - GAP - s), rng.randint(GAP, h - GAP - s)
        box = (x0, y0, x0 + s, y0 + s)
        if all(box[2] + GAP <= t[0] or t[2] + GAP <= box[0] or box[3] + GAP <= t[1] or t[3] + GAP <= box[1]
               for t in taken):
            return box
    raise _Retry


def luma(rgb: tuple[int, int, int]) -> float:
    """The grey level PIL's grayscale gives ``rgb`` (ITU-R 601-2)."""
    return rgb[0] * 0.299 + rgb[1] * 0.587 + rgb[2] * 0.114


def _grey_apart(colour: str, background: str) -> bool:
    """Still an object on its background once grayscale: grey levels apart from both tones."""
    return all(abs(luma(COLOURS[colour]) - luma(tone)) >= MIN_GREY_GAP for tone in (COLOURS[background],
                                                                                     shade(background)))


def _scene(rng: random.Random, size: tuple[int, int], count: int, backgrounds=tuple(COLOURS),
           grey_apart: bool = False) -> Scene:
    background = rng.choice(backgrounds)
    split = rng.randint(size[1] // 4, 3 * size[1] // 4) if rng.random() < TWO_TONE else None
    objects: list[Shape] = []
    colours = [c for c in COLOURS if c != background and (not grey_apart or _grey_apart(c, background))]
    if not colours:
        raise _Retry
    for shape in rng.sample(list(SHAPES), count):
        colour = rng.choice(colours)
        objects.append(Shape(shape, colour, _place(rng, size, [o.box for o in objects])))
    return Scene(background, tuple(objects), split)


def _colour_for(rng: random.Random, avoid: set[str]) -> str:
    return rng.choice([c for c in COLOURS if c not in avoid])


def _draw_task(task: str, rng: random.Random, size: tuple[int, int]) -> TaskSpec:
    template = rng.choice(TEMPLATES[task])
    if task == "text2image":
        background = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        colour = _colour_for(rng, {background})
        result = Scene(background, (Shape(shape, colour, _place(rng, size, [], centred=True)),))
        text = template.format(colour=colour, shape=shape, background=background)
        return TaskSpec(task, text, result, None, 0, colour, shape, *size)
    if task == "recolour":
        source = _scene(rng, size, rng.randint(1, MAX_OBJECTS))
        k = rng.randrange(len(source.objects))
        old = source.objects[k]
        colour = _colour_for(rng, {old.colour, source.background})
        objects = list(source.objects)
        objects[k] = replace(old, colour=colour)
        return TaskSpec(task, template.format(shape=old.shape, colour=colour), replace(source, objects=tuple(objects)),
                        source, k, colour, old.shape, *size)
    if task == "add":
        source = _scene(rng, size, rng.randint(0, MAX_OBJECTS - 1))
        shape = rng.choice([s for s in SHAPES if s not in {o.shape for o in source.objects}])
        colour = _colour_for(rng, {source.background})
        new = Shape(shape, colour, _place(rng, size, [o.box for o in source.objects]))
        result = replace(source, objects=source.objects + (new,))
        return TaskSpec(task, template.format(shape=shape, colour=colour), result, source, len(source.objects),
                        colour, shape, *size)
    if task == "remove":
        source = _scene(rng, size, rng.randint(1, MAX_OBJECTS))
        k = rng.randrange(len(source.objects))
        result = replace(source, objects=source.objects[:k] + source.objects[k + 1:])
        return TaskSpec(task, template.format(shape=source.objects[k].shape), result, source, k, None,
                        source.objects[k].shape, *size)
    if task == "background":
        source = _scene(rng, size, rng.randint(1, MAX_OBJECTS))
        colour = _colour_for(rng, {source.background} | {o.colour for o in source.objects})
        return TaskSpec(task, template.format(colour=colour), replace(source, background=colour), source, None,
                        colour, None, *size)
    if task in ("grayscale", "invert"):
        source = _scene(rng, size, rng.randint(1, MAX_OBJECTS), backgrounds=CHROMATIC, grey_apart=task == "grayscale")
        return TaskSpec(task, template, replace(source, filter=task), source, None, None, None, *size)
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def instructions() -> list[str]:
    """Every instruction the templates can write (each template with every colour, shape and background):
    a corpus for a tokenizer that should know the task set's words as whole tokens."""
    texts = []
    for templates in TEMPLATES.values():
        for template in templates:
            texts.extend(sorted({template.format(colour=c, shape=s, background=b)
                                 for c in COLOURS for s in SHAPES for b in COLOURS}))
    return texts


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value < 48 or value % 16:
            raise DataError(f"the synthetic images' {name} must be a multiple of 16 of at least 48, got {value}")


def make_sample(index: int, seed: int = 0, split: str = "train", size: tuple[int, int] = DEFAULT_SIZE,
                task: str | None = None) -> TaskSpec:
    """Sample ``index`` of ``split`` (its task ``TASKS[index % 7]`` unless ``task`` is given)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    check_size(*size)
    task = task or TASKS[index % len(TASKS)]
    rng = random.Random(f"tagmoe-synthetic:{VERSION}:{seed}:{split}:{index}")  # str seeds hash with SHA-512
    for _ in range(10_000):
        try:
            spec = _draw_task(task, rng, size)
        except _Retry:
            continue
        if split == "train" and any(map(is_heldout_pair, spec.all_pairs())):
            continue
        if split == "heldout" and not any(map(is_heldout_pair, spec.focus_pairs())):
            continue
        return replace(spec, split=split, index=index)
    raise DataError(f"no {split} {task} sample of {size[0]}x{size[1]} could be drawn")  # pragma: no cover


def make_samples(count: int, seed: int = 0, split: str = "train", size: tuple[int, int] = DEFAULT_SIZE,
                 tasks: tuple[str, ...] | None = None, start: int = 0) -> list[TaskSpec]:
    """``count`` samples, ``start`` to ``start + count - 1`` (a later range of ``train`` is drawn as
    the training samples are and holds none of them: unseen pictures of seen combinations); with
    ``tasks``, only those tasks, in turn."""
    indices = range(start, start + count)
    if tasks is None:
        return [make_sample(i, seed, split, size) for i in indices]
    return [make_sample(i, seed, split, size, tasks[i % len(tasks)]) for i in indices]


# -- the data folder ------------------------------------------------------------------------------------
@dataclass
class WriteReport:
    folder: Path
    count: int
    per_task: dict[str, int]
    seconds: float

    def summary(self) -> str:
        tasks = ", ".join(f"{k} {v}" for k, v in self.per_task.items())
        return f"wrote {self.count} samples to {self.folder} in {self.seconds:.1f}s ({tasks})"


def write_dataset(folder: str | os.PathLike, count: int, seed: int = 0, split: str = "train",
                  size: tuple[int, int] = DEFAULT_SIZE, overwrite: bool = False, start: int = 0) -> WriteReport:
    """Write ``count`` samples of ``split`` (from index ``start``) as a data folder ``tagmoe train`` reads:
    ``samples.jsonl`` and PNGs (``NNNNN_in.png`` / ``NNNNN_out.png``), ``tasks.jsonl`` (each line the :class:`TaskSpec`
    of the same line of samples.jsonl, with its ``target`` and ``input``) and ``synthetic.json``."""
    if count < 1:
        raise DataError(f"--count must be at least 1, got {count}")
    if start < 0:
        raise DataError(f"the first sample's index must be 0 or more, got {start}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    check_size(*size)
    began = time.perf_counter()
    root = Path(os.path.expanduser(str(folder)))
    if (root / "samples.jsonl").exists() and not overwrite:
        raise DataError(f"'{root}' already holds a samples.jsonl (pass --overwrite to replace it)")
    root.mkdir(parents=True, exist_ok=True)
    samples, tasks = [], []
    per_task = dict.fromkeys(TASKS, 0)
    for spec in make_samples(count, seed, split, size, start=start):
        stem = f"{spec.index:05d}"
        entry = {"target": f"{stem}_out.png", "input": None, "instruction": spec.instruction,
                 "tags": spec.tags.to_dict()}
        if spec.source is not None:
            entry["input"] = f"{stem}_in.png"
            spec.input_image().save(root / entry["input"])
        spec.target_image().save(root / entry["target"])
        samples.append(entry)
        tasks.append({"target": entry["target"], "input": entry["input"], **spec.to_dict()})
        per_task[spec.task] += 1
    (root / "samples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in samples), encoding="utf-8")
    (root / TASKS_FILE).write_text("".join(json.dumps(t) + "\n" for t in tasks), encoding="utf-8")
    manifest = {"generator": "tagmoe_core.training.synthetic", "version": VERSION, "seed": seed, "split": split,
                "count": count, "start": start, "width": size[0], "height": size[1], "per_task": per_task,
                "heldout_shape_colours": sorted(map(list, HELDOUT_SHAPE_COLOURS)),
                "heldout_on_background": sorted(map(list, HELDOUT_ON_BACKGROUND))}
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return WriteReport(root, count, per_task, time.perf_counter() - began)


def read_tasks(folder: str | os.PathLike) -> list[TaskSpec]:
    """The :class:`TaskSpec` of every sample of a folder :func:`write_dataset` wrote, in its order."""
    path = Path(os.path.expanduser(str(folder))) / TASKS_FILE
    if not path.is_file():
        raise DataError(f"'{path.parent}' has no {TASKS_FILE} (write the folder with tagmoe synth-data)")
    specs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            specs.append(TaskSpec.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}:{number}: not a task description ({exc})") from exc
    return specs
