"""The "00 Try it" workflow's pictures judged by the task set's pixel rule (training.task_success):
the drawn picture as text-to-image, each saved edit against the picture it edited. Which prompt made
which picture is read from the workflow's links, and each prompt is read by the task set's own
instruction templates, so the judge follows the shipped file."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
from node_harness import REPO
from tagmoe_core.training.synthetic import TEMPLATES, Scene, Shape, TaskSpec
from tagmoe_core.training.task_success import Bounds, Verdict, check_task, objects_in

TRY_IT = REPO / "example_workflows" / "00 Try it - tiny shapes model, no download.json"
GLOBAL_EDITS = ("grayscale", "invert")


def read_instruction(text: str) -> tuple[str, dict[str, str]]:
    """(task, {colour, shape, background: value}) of an instruction one of the task set's templates wrote."""
    for task, templates in TEMPLATES.items():
        for template in templates:
            pattern = re.escape(template)
            for name in ("colour", "shape", "background"):
                pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\w+)")
            match = re.fullmatch(pattern, text)
            if match:
                return task, match.groupdict()
    raise AssertionError(f"{text!r} is none of the task set's instructions")


class TryIt:
    """The workflow's graph: what feeds what."""

    def __init__(self, workflow: dict | None = None):
        self.workflow = workflow if workflow is not None else json.loads(TRY_IT.read_text())
        self.nodes = {n["id"]: n for n in self.workflow["nodes"]}
        self.links = {link[0]: link for link in self.workflow["links"]}

    def origin(self, node: dict, input_name: str) -> dict:
        link = next(i["link"] for i in node["inputs"] if i["name"] == input_name)
        return self.nodes[self.links[link][1]]

    def prompt_of(self, decode: dict) -> str:
        return self.origin(self.origin(decode, "latent"), "conditioning")["widgets_values"][0]

    def edits(self) -> list[tuple[dict, dict, dict]]:
        """(save node, its edit's sampler, the decode node of the picture it edited) per saved edit."""
        out = []
        for save in (n for n in self.nodes.values() if n["type"] == "SaveImage"):
            sampler = self.origin(self.origin(save, "images"), "latent")
            out.append((save, sampler, self.origin(sampler, "image")))
        return out

    def shown(self, decode: dict) -> dict:
        """The preview node showing ``decode``'s picture."""
        return next(n for n in self.nodes.values() if n["type"] == "PreviewImage"
                    and self.origin(n, "images")["id"] == decode["id"])

    def judge(self, picture_of) -> list[tuple[str, Verdict]]:
        """(prompt, verdict) for the drawn picture and each edit; ``picture_of(node)``: the RGB PIL
        picture a preview or save node received."""
        (_, _, drawn_by), *others = self.edits()
        assert all(d["id"] == drawn_by["id"] for _, _, d in others), "every edit edits the one drawn picture"
        prompt = self.prompt_of(drawn_by)
        task, named = read_instruction(prompt)
        assert task == "text2image", prompt
        drawn = picture_of(self.shown(drawn_by))
        scene = Scene(named["background"], (Shape(named["shape"], named["colour"], (0, 0, 1, 1)),))
        spec = TaskSpec(task, prompt, scene, None, 0, named["colour"], named["shape"])
        verdicts = [(prompt, check_task(None, spec, drawn))]
        if not verdicts[0][1].ok:
            return verdicts
        found = objects_in(np.asarray(drawn, dtype=np.float64), scene, spec.size, Bounds())
        source = Scene(scene.background, (Shape(named["shape"], named["colour"], found[0].box),))
        for save, sampler, _ in self.edits():
            prompt = self.prompt_of(self.origin(save, "images"))
            task, fields = read_instruction(prompt)
            if task == "remove":
                assert fields["shape"] == named["shape"], f"{prompt!r} names no object of the drawn picture"
                edit = TaskSpec(task, prompt, Scene(scene.background, ()), source, 0, None, fields["shape"])
            elif task in GLOBAL_EDITS:
                edit = TaskSpec(task, prompt, replace(source, filter=task), source)
            else:
                raise AssertionError(f"the try-it judge has no rule for {task} ({prompt!r})")
            verdicts.append((prompt, check_task(drawn, edit, picture_of(save))))
        return verdicts
