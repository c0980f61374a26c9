"""Did an output do what a synthetic task (``training.synthetic``) asked? A pixel rule per task.

The rule reads the sample's structured :class:`~.synthetic.TaskSpec` (never the instruction's
text), the input picture (None for text-to-image) and the output, and makes named checks:

* recolour: the object's pixels have the asked colour (``cover`` of them within ``colour_tol``);
  the rest (outside the object, ``margin`` pixels wider) is the input's within ``psnr`` dB; the
  object count is the input's.
* add: one more object than the input; exactly one object where the input had none, of the asked
  colour (inside its one-pixel edge) and shape (read from how much of its bounding box it fills);
  the rest is the input's.
* remove: the object's pixels are the background now; the rest is the input's; one object fewer.
* background: the background (outside every object) has the asked colour (both tones of a
  two-tone one); the objects are the input's within ``psnr`` dB; the same count.
* grayscale / invert: the whole output is the input's grayscale (PIL's luma) / negative within
  ``psnr`` dB, with the input's object count.
* text2image: one object, of the asked colour (inside its one-pixel edge) and shape, its centre in
  the middle half of the picture; the background (outside it) has the asked colour.

Objects in an output are the connected groups (4-neighbours) of pixels farther than
``colour_tol`` from the expected background, of at least ``min_area`` pixels (smaller specks are
ignored). Colour distances are Euclidean in 0..255 RGB. ``task_success`` gives True / False;
:func:`check_task` the :class:`Verdict` with every check's value, for reports.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from ..images import to_rgb
from .synthetic import COLOURS, Scene, TaskSpec, apply_filter, render, render_background, shape_mask


@dataclass(frozen=True)
class Bounds:
    colour_tol: float = 40.0  # a pixel "has" a colour within this RGB distance (palette colours are >= 90 apart)
    cover: float = 0.8  # share of a region's pixels that must have the asked colour
    psnr: float = 25.0  # dB: what must stay unchanged (or the whole picture of a global edit)
    min_area: int = 12  # pixels: smaller groups are specks, not objects
    margin: int = 2  # pixels around an edited object that belong to neither region (edges may blur)


@dataclass
class Verdict:
    task: str
    checks: dict[str, tuple[bool, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(passed for passed, _ in self.checks.values())

    def __bool__(self) -> bool:
        return self.ok

    def add(self, name: str, passed: bool, value: float) -> None:
        self.checks[name] = (bool(passed), float(value))

    def failed(self) -> list[str]:
        return [name for name, (passed, _) in self.checks.items() if not passed]

    def summary(self) -> str:
        parts = [f"{name} {'ok' if passed else 'FAILED'} ({value:.3g})" for name, (passed, value) in
                 self.checks.items()]
        return f"{self.task}: {'success' if self.ok else 'failure'}: " + ", ".join(parts)


# -- pixels ---------------------------------------------------------------------------------------------
def _pixels(image) -> np.ndarray:
    """[H, W, 3] float64 in 0..255 from a PIL image, a uint8 array (0..255) or a float array or tensor
    (0..1, as the pipeline decodes; a leading batch of one is dropped)."""
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image), dtype=np.float64)
    if hasattr(image, "detach"):  # a torch tensor
        image = image.detach().cpu().float().numpy()
    array = np.asarray(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB picture [H, W, 3], got shape {tuple(array.shape)}")
    floating = array.dtype.kind == "f"
    array = array.astype(np.float64)
    return array * 255.0 if floating else array


def _distance(pixels: np.ndarray, colour) -> np.ndarray:
    """[H, W] RGB distance of each pixel to ``colour`` (an (r, g, b) or an [H, W, 3] picture)."""
    return np.sqrt(((pixels - np.asarray(colour, dtype=np.float64)) ** 2).sum(-1))


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB over ``mask`` (all pixels if None; an empty mask or equal pixels: infinity)."""
    diff = (a - b) ** 2
    if mask is not None:
        if not mask.any():
            return math.inf
        diff = diff[mask]
    mse = float(diff.mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0 ** 2 / mse)


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.array(image.filter(ImageFilter.MaxFilter(2 * pixels + 1))) > 0


def _shrink(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ~_grow(~mask, pixels)


def _interior(mask: np.ndarray) -> np.ndarray:
    """A found object without its outermost pixel ring: the edge, where its colour meets the background's,
    is judged by neither (as the recolour and remove checks judge the asked region shrunk by one pixel);
    an object too thin to have an interior is judged whole."""
    inner = _shrink(mask, 1)
    return inner if inner.any() else mask


def _share(mask: np.ndarray, region: np.ndarray) -> float:
    """Share of ``region`` that ``mask`` covers (1 for an empty region)."""
    total = int(region.sum())
    return 1.0 if total == 0 else float((mask & region).sum()) / total


@dataclass(frozen=True)
class Blob:
    mask: np.ndarray
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

    @property
    def centre(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()), float(ys.mean())

    def shape(self) -> str | None:
        """circle / square / triangle from how much of its bounding box it fills (None: none of them)."""
        w, h = self.box[2] - self.box[0], self.box[3] - self.box[1]
        if not 0.7 <= w / h <= 1.43:
            return None
        fill = self.area / (w * h)
        if fill >= 0.9:
            return "square"
        if fill >= 0.68:
            return "circle"
        if fill >= 0.38:
            return "triangle"
        return None


def blobs(foreground: np.ndarray, min_area: int) -> list[Blob]:
    """The 4-connected groups of ``foreground`` of at least ``min_area`` pixels, largest first."""
    seen = np.zeros_like(foreground, dtype=bool)
    height, width = foreground.shape
    found = []
    for y0, x0 in zip(*np.nonzero(foreground)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, members = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            members.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and foreground[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(members) >= min_area:
            ys, xs = np.array(members).T
            mask = np.zeros_like(foreground, dtype=bool)
            mask[ys, xs] = True
            found.append(Blob(mask, len(members), (int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                                    int(ys.max()) + 1)))
    return sorted(found, key=lambda b: -b.area)


def objects_in(output: np.ndarray, scene: Scene, size: tuple[int, int], bounds: Bounds) -> list[Blob]:
    """The objects of ``output`` on ``scene``'s background."""
    background = np.asarray(render_background(scene, size), dtype=np.float64)
    return blobs(_distance(output, background) > bounds.colour_tol, bounds.min_area)


# -- the rule -------------------------------------------------------------------------------------------
def check_task(source, spec: TaskSpec | dict, output, bounds: Bounds = Bounds()) -> Verdict:
    """The checks of ``spec.task`` on ``output`` (see the module's docstring)."""
    spec = spec if isinstance(spec, TaskSpec) else TaskSpec.from_dict(spec)
    verdict = Verdict(spec.task)
    out = _pixels(output)
    size = spec.size
    if out.shape[:2] != (spec.height, spec.width):
        verdict.add("size", False, out.shape[1] * 10_000 + out.shape[0])
        return verdict
    if spec.source is None:
        return _text2image(spec, out, bounds, verdict)
    if source is None:
        raise ValueError(f"a {spec.task} edit is judged against its input picture: pass it")
    inp = _pixels(source)
    if inp.shape != out.shape:
        raise ValueError(f"the input is {inp.shape[1]}x{inp.shape[0]} but the task is {spec.width}x{spec.height}")

    if spec.task in ("grayscale", "invert"):
        picture = Image.fromarray(inp.round().clip(0, 255).astype(np.uint8))
        expected = np.asarray(apply_filter(picture, spec.task), dtype=np.float64)
        value = psnr(out, expected)
        verdict.add(f"{spec.task} psnr", value >= bounds.psnr, value)
        background = np.asarray(apply_filter(render_background(spec.source, size), spec.task), dtype=np.float64)
        found = blobs(_distance(out, background) > bounds.colour_tol, bounds.min_area)
        verdict.add("object count", len(found) == len(spec.source.objects), len(found))
        return verdict

    expected = np.asarray(render(spec.result, size), dtype=np.float64)
    near_expected = _distance(out, expected) <= bounds.colour_tol
    found = objects_in(out, spec.result, size, bounds)
    verdict.add("object count", len(found) == len(spec.result.objects), len(found))

    if spec.task == "recolour":
        region = shape_mask(spec.source.objects[spec.subject], size)
        verdict.add("colour", _share(near_expected, _shrink(region, 1)) >= bounds.cover,
                    _share(near_expected, _shrink(region, 1)))
        rest = ~_grow(region, bounds.margin)
    elif spec.task == "remove":
        region = shape_mask(spec.source.objects[spec.subject], size)
        share = _share(near_expected, _shrink(region, 1))
        verdict.add("background where it was", share >= bounds.cover, share)
        rest = ~_grow(region, bounds.margin)
    elif spec.task == "background":
        objects = np.zeros((spec.height, spec.width), dtype=bool)
        for obj in spec.source.objects:
            objects |= shape_mask(obj, size)
        share = _share(near_expected, ~_grow(objects, bounds.margin))
        verdict.add("background colour", share >= bounds.cover, share)
        rest = _shrink(objects, 1)
    elif spec.task == "add":
        before = np.zeros((spec.height, spec.width), dtype=bool)
        for obj in spec.source.objects:
            before |= shape_mask(obj, size)
        new = [b for b in found if not (b.mask & _grow(before, bounds.margin)).any()]
        verdict.add("one new object", len(new) == 1, len(new))
        rest = np.ones_like(before)
        if new:
            blob = new[0]
            share = _share(_distance(out, COLOURS[spec.colour]) <= bounds.colour_tol, _interior(blob.mask))
            verdict.add("colour", share >= bounds.cover, share)
            verdict.add("shape", blob.shape() == spec.shape, blob.area / max(1, (blob.box[2] - blob.box[0]) *
                                                                               (blob.box[3] - blob.box[1])))
            rest = ~_grow(blob.mask, bounds.margin)
    else:
        raise ValueError(f"unknown task {spec.task!r}")
    value = psnr(out, inp, rest)
    verdict.add("rest unchanged psnr", value >= bounds.psnr, value)
    return verdict


def _text2image(spec: TaskSpec, out: np.ndarray, bounds: Bounds, verdict: Verdict) -> Verdict:
    found = objects_in(out, spec.result, spec.size, bounds)
    verdict.add("object count", len(found) == 1, len(found))
    if not found:
        return verdict
    blob = found[0]
    share = _share(_distance(out, COLOURS[spec.colour]) <= bounds.colour_tol, _interior(blob.mask))
    verdict.add("colour", share >= bounds.cover, share)
    fill = blob.area / max(1, (blob.box[2] - blob.box[0]) * (blob.box[3] - blob.box[1]))
    verdict.add("shape", blob.shape() == spec.shape, fill)
    x, y = blob.centre
    off = max(abs(x / spec.width - 0.5), abs(y / spec.height - 0.5))
    verdict.add("in the middle", off <= 0.25, off)
    share = _share(_distance(out, COLOURS[spec.result.background]) <= bounds.colour_tol,
                   ~_grow(blob.mask, bounds.margin))
    verdict.add("background colour", share >= bounds.cover, share)
    return verdict


def task_success(source, spec: TaskSpec | dict, output, bounds: Bounds = Bounds()) -> bool:
    """True when ``output`` does what ``spec`` asked of ``source`` (None for text-to-image)."""
    return check_task(source, spec, output, bounds).ok
