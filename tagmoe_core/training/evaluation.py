"""Judging a model on synthetic task samples: one edit (or text-to-image) per sample, through the
pipeline as ``tagmoe edit`` runs it, checked by the task's pixel rule, with its routing analysed.

``judge_sample(pipe, spec, seed)`` is what ``scripts/train_tiny.py`` reports per task and what the
shipped tiny model's success check in the tests runs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .synthetic import TaskSpec
from .task_success import Verdict, check_task


@dataclass
class JudgedSample:
    spec: TaskSpec
    verdict: Verdict
    output: Image.Image
    alignment: float  # cos(router_head(g), s) of the sample's routing signature and its tags
    expert_share: np.ndarray  # top-1 expert shares over the MoE layers, [num_experts]

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    @property
    def input_objects(self) -> int:
        """Objects in the input picture (0: none, or no picture)."""
        return len(self.spec.source.objects) if self.spec.source is not None else 0


def judge_sample(pipe, spec: TaskSpec, seed: int, steps: int = 20, cfg: float = 1.0,
                 tag_guidance: float = 0.0) -> JudgedSample:
    """Run ``spec``'s instruction on its input picture (at the spec's size, with its tags, ``steps``
    Euler steps, true CFG ``cfg``, routing steered by ``tag_guidance``) and judge the output."""
    from ..intent.routing import RoutingRecorder, analyse

    source = spec.input_image()
    recorder = RoutingRecorder()
    out = pipe.sample(pipe.encode(spec.instruction, ""), source, width=spec.width, height=spec.height,
                      steps=steps, cfg=cfg, seed=seed, recorder=recorder, tags=spec.tags,
                      tag_guidance=tag_guidance)
    image = pipe.to_pil(pipe.decode(out.latents))[0]
    analysis = analyse(recorder.recording, pipe.transformer, spec.tags)
    return JudgedSample(spec, check_task(source, spec, image), image, float(analysis.alignment),
                        analysis.expert_share.numpy())
