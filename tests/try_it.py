"""The "00 Try it" workflow's pictures judged by the task set's pixel rule (training.task_success):
the drawn picture as text-to-image, each edit against the drawn picture it edited."""

from __future__ import annotations

import json

import numpy as np
from node_harness import REPO
from tagmoe_core.training.synthetic import Scene, Shape, TaskSpec
from tagmoe_core.training.task_success import Bounds, Verdict, check_task, objects_in

TRY_IT = REPO / "example_workflows" / "00 Try it - tiny shapes model, no download.json"


def try_it_prompts() -> tuple[str, ...]:
    """The workflow's Text Encode prompts in order (the drawn picture's, then each edit's), read from
    the shipped file so the judge follows it."""
    nodes = json.loads(TRY_IT.read_text())["nodes"]
    prompts = [n["widgets_values"][0] for n in nodes if n["type"] == "TagMoETextEncode"]
    return tuple(prompts)


def _scene(prompt: str) -> tuple[str, str, str]:
    words = prompt.split()  # "A yellow circle on a purple background"
    assert words[0] == "A" and words[3:5] == ["on", "a"] and words[6] == "background", prompt
    return words[1], words[2], words[5]


def judge(prompts: tuple[str, ...], drawn, edits: list) -> list[Verdict]:
    """Verdicts for the drawn picture (text-to-image of ``prompts[0]``) and each edit's output in
    ``edits`` (the prompts after the first, in order), each judged against ``drawn``."""
    colour, shape, background = _scene(prompts[0])
    spec = TaskSpec("text2image", prompts[0], Scene(background, (Shape(shape, colour, (0, 0, 1, 1)),)), None, 0,
                    colour, shape)
    verdicts = [check_task(None, spec, drawn)]
    if not verdicts[0].ok:
        return verdicts
    found = objects_in(np.asarray(drawn.convert("RGB"), dtype=np.float64), spec.result, spec.size, Bounds())
    source = Scene(background, (Shape(shape, colour, found[0].box),))
    for prompt, output in zip(prompts[1:], edits):
        if prompt.startswith("Remove"):
            edit = TaskSpec("remove", prompt, Scene(background, ()), source, 0, None, shape)
        elif "black and white" in prompt:
            edit = TaskSpec("grayscale", prompt, source, source)
        else:
            raise AssertionError(f"no rule for {prompt!r}")
        verdicts.append(check_task(drawn, edit, output))
    return verdicts
