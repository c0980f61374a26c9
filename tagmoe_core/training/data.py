"""The training data folder, checked before training, and its samples encoded as inference encodes them.

Layout: ``DIR/samples.jsonl``, one JSON object a line (blank lines and lines starting with ``#``
are skipped), image paths relative to ``DIR``::

    {"target": "0001_out.png", "input": "0001_in.png", "instruction": "Make the circle red",
     "tags": ["local editing", "attribute editing", "background preservation"]}
    {"target": "0002.png", "instruction": "A blue square on a yellow background"}

* ``target`` (required): the image the model should produce; width and height multiples of 16.
* ``input`` (optional; absent or null: text-to-image): the image to edit, the target's size.
* ``instruction`` (required, not empty): the edit instruction or the description.
* ``tags`` (optional): task tags as a list of names, a comma-separated string or an object
  ``{"scope": ..., "type": [...], "preservation": [...]}``; absent: the rule tagger's tags
  (``intent.tagging.rule_tags``). Text-to-image samples have the "image generation" scope, edits another.

Every problem (no file, bad JSON, missing or unreadable image, wrong sizes, empty instruction,
bad tags) is a :class:`~tagmoe_core.errors.DataError` of one line naming the sample, raised by
:func:`read_samples` before any model is loaded.

:func:`encode_samples` then builds, with the frozen VAE and text encoder, what every training step
needs: the target's model-space tokens (VAE mean, normalised, packed: what a run's output
latents are before they are decoded), the condition tokens as the pipeline's own
``prepare_condition`` builds them (``condition_pixels``: bucket snap, resize to the target size;
``encode_condition``: VAE posterior sample, normalise, pack) and the prompt through its
``encode_prompt`` (the reference's template and drop).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, TagMoEError
from ..images import open_image, to_rgb
from ..intent.tagging import rule_tags
from ..pipeline.checks import check_size
from ..pipeline.condition import condition_pixels
from ..pipeline.latents import PIXELS_PER_TOKEN
from ..pipeline.text_encoding import EMPTY_NEGATIVE
from ..taxonomy import IMAGE_GENERATION, TaskTags

SAMPLES_FILE = "samples.jsonl"
KEYS = ("target", "input", "instruction", "tags")


@dataclass(frozen=True)
class TrainSample:
    target: Path
    instruction: str
    tags: TaskTags
    input: Path | None = None
    width: int = 0
    height: int = 0
    tags_from_rules: bool = False
    line: int = 0

    @property
    def is_edit(self) -> bool:
        return self.input is not None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def read_samples(folder: str | os.PathLike) -> list[TrainSample]:
    """Every sample of ``folder``, checked (see the module's docstring); :class:`DataError` otherwise."""
    root = Path(os.path.expanduser(str(folder)))
    if not root.is_dir():
        raise DataError(f"the data folder '{root}' does not exist (expected a folder with {SAMPLES_FILE})")
    index = root / SAMPLES_FILE
    if not index.is_file():
        raise DataError(f"the data folder '{root}' has no {SAMPLES_FILE} (one JSON object a line: target, "
                        "instruction, optional input and tags)")
    try:
        lines = index.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"'{index}' cannot be read: {_one_line(exc)}") from exc
    samples = [_sample(root, index, number, text) for number, text in enumerate(lines, 1)
               if text.strip() and not text.lstrip().startswith("#")]
    if not samples:
        raise DataError(f"'{index}' holds no samples")
    return samples


def _sample(root: Path, index: Path, number: int, text: str) -> TrainSample:
    where = f"{index}:{number}"
    try:
        entry = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{where}: not a JSON object ({_one_line(exc)})") from exc
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(KEYS)})")
    instruction = entry.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: the instruction is empty" if isinstance(instruction, str) or instruction is None
                        else f"{where}: the instruction must be text, got {type(instruction).__name__}")
    if not isinstance(entry.get("target"), str) or not entry["target"].strip():
        raise DataError(f"{where}: no target image (give \"target\": a path relative to {root})")
    target_path = root / entry["target"]
    target = _image(where, "target", target_path)
    width, height = target.size
    try:
        check_size("the target's width", width)
        check_size("the target's height", height)
    except TagMoEError as exc:
        raise DataError(f"{where}: target '{target_path.name}' is {width}x{height}: {_one_line(exc)}") from exc
    input_path = None
    if entry.get("input") is not None:
        if not isinstance(entry["input"], str) or not entry["input"].strip():
            raise DataError(f"{where}: \"input\" must be a path relative to {root} (or null for text-to-image)")
        input_path = root / entry["input"]
        source = _image(where, "input", input_path)
        if source.size != target.size:
            raise DataError(f"{where}: input '{input_path.name}' is {source.width}x{source.height} but target "
                            f"'{target_path.name}' is {width}x{height}; an edit's input and target must have the "
                            "same size")
    tags, from_rules = _tags(where, entry.get("tags"), instruction, input_path is not None)
    return TrainSample(target_path, instruction.strip(), tags, input_path, width, height, from_rules, number)


def _image(where: str, role: str, path: Path) -> Image.Image:
    try:
        return open_image(path)
    except TagMoEError as exc:
        message = _one_line(exc).removeprefix("input image ")  # open_image's wording
        raise DataError(f"{where}: {role} image {message}") from exc


def _tags(where: str, value, instruction: str, has_input: bool) -> tuple[TaskTags, bool]:
    if value is None:
        return rule_tags(instruction, has_image=has_input), True
    try:
        if isinstance(value, str):
            tags = TaskTags.from_text(value)
        elif isinstance(value, list):
            tags = TaskTags.from_names([str(v) for v in value])
        elif isinstance(value, dict):
            tags = TaskTags.from_dict(value)
        else:
            raise DataError(f"tags must be a list, a string or an object, got {type(value).__name__}")
    except TagMoEError as exc:
        raise DataError(f"{where}: {_one_line(exc)}") from exc
    if has_input and tags.scope == IMAGE_GENERATION:
        raise DataError(f"{where}: the tags say '{IMAGE_GENERATION}' but the sample has an input image")
    if not has_input and tags.scope != IMAGE_GENERATION:
        raise DataError(f"{where}: a sample without an input image is text-to-image: its scope must be "
                        f"'{IMAGE_GENERATION}', not '{tags.scope}'")
    return tags, False


# -- encoding -----------------------------------------------------------------------------------------
@dataclass
class EncodedSample:
    """One sample as the transformer sees it (float32, on the CPU; moved to the device per batch)."""

    target: torch.Tensor  # [N, 64] model-space tokens of the target image
    condition: torch.Tensor | None  # [M, 64] condition tokens (None: text-to-image)
    prompt: torch.Tensor  # [L, D] the instruction's text embeddings
    tag_ids: list[int]
    width: int
    height: int

    @property
    def img_shapes(self) -> list[tuple[int, int, int]]:
        grid = (1, self.height // PIXELS_PER_TOKEN, self.width // PIXELS_PER_TOKEN)
        return [grid, grid] if self.condition is not None else [grid]

    @property
    def group(self) -> tuple[int, int, bool]:
        """Samples of one group batch together (same token counts)."""
        return self.width, self.height, self.condition is not None


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor (the pipeline encodes under inference mode) in float32 on the CPU."""
    with torch.inference_mode(False):
        return tensor.detach().float().cpu().clone()


ENCODE_BATCH = 32  # pictures of one size per VAE call when a data set is encoded ...
ENCODE_PIXELS = ENCODE_BATCH * 64 * 64  # ... and at most this many pixels in all (1024x1024: one at a time)


def _pixels(image: Image.Image) -> torch.Tensor:
    """[H, W, 3] float32 in 0..1."""
    return torch.from_numpy(np.array(to_rgb(image)).astype(np.float32) / 255.0)


@torch.inference_mode()
def _target_batch(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] target pictures -> [B, N, 64] model-space tokens: a condition's encoding with the
    posterior's mean (VAE mean, normalised, packed; the VAE computes in the pipeline's dtype)."""
    return pipe.encode_condition(pixels, posterior="mode")


def target_tokens(pipe, image: Image.Image) -> torch.Tensor:
    """[N, 64]: the target image as the model-space tokens a run would decode into it (VAE mean)."""
    return _target_batch(pipe, _pixels(image)[None])[0]


def _pictures(sample: TrainSample, target: Image.Image,
              source: Image.Image | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A sample's target pixels and its condition's (``condition_pixels``: bucket snap, resize), [H, W, 3]."""
    condition = None if source is None else condition_pixels(source, sample.width, sample.height)[0]
    return _pixels(target), condition


def encode_samples(pipe, samples: list[TrainSample], seed: int = 0,
                   batch: int = ENCODE_BATCH) -> list[EncodedSample]:
    """Encode every sample once with the pipeline's frozen VAE and text encoder. The condition's
    VAE posterior is sampled as the reference samples it, from a generator seeded by ``seed`` and the
    sample's position (the same data and seed give the same tensors).

    The pictures are read and prepared on as many threads as torch computes with (PIL's decoding and
    resizing release the GIL: the condition's bucket snap, up to the preferred bucket and back down, is
    most of a tiny model's encoding) and go through the VAE ``batch`` of one size at a time (fewer
    where that is over :data:`ENCODE_PIXELS`: a 1024x1024 data set one picture a call, as before; within
    float rounding the tokens one at a time gives; each condition's noise still drawn from its own
    generator); each distinct instruction is encoded once."""
    groups: dict[tuple[int, int, bool], list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault((sample.width, sample.height, sample.input is not None), []).append(i)
    prompts: dict[str, torch.Tensor] = {}
    encoded: list[EncodedSample | None] = [None] * len(samples)
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for (width, height, edit), members in groups.items():
            size = max(1, min(batch, ENCODE_PIXELS // (width * height)))
            for begin in range(0, len(members), size):
                chunk = members[begin:begin + size]
                # opened here (open_image's warning filter is not thread-safe), prepared on the threads
                opened = [(samples[i], open_image(samples[i].target),
                           None if samples[i].input is None else open_image(samples[i].input)) for i in chunk]
                pictures = list(pool.map(_pictures, *zip(*opened)))
                targets = _target_batch(pipe, torch.stack([target for target, _ in pictures]))
                conditions = None
                if edit:
                    generators = [torch.Generator(device=pipe.device).manual_seed(seed * 1_000_003 + i) for i in chunk]
                    conditions = pipe.encode_condition(torch.stack([c for _, c in pictures]), generators, "sample")
                for row, i in enumerate(chunk):
                    sample = samples[i]
                    if sample.instruction not in prompts:
                        prompts[sample.instruction] = _plain(pipe.encode_prompt(sample.instruction).embeds[0])
                    encoded[i] = EncodedSample(_plain(targets[row]),
                                               None if conditions is None else _plain(conditions[row]),
                                               prompts[sample.instruction], sample.tags.ids, sample.width,
                                               sample.height)
    assert all(e is not None for e in encoded)
    return encoded  # type: ignore[return-value]


def encode_empty_prompt(pipe) -> torch.Tensor:
    """[L, D]: the empty prompt as the reference encodes it (a single space), for text dropout."""
    return _plain(pipe.encode_prompt(EMPTY_NEGATIVE).embeds[0])
