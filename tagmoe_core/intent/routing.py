"""Routing analysis and tag-guided routing.

* :class:`RoutingRecorder` records, while attached to a run, every MoE layer's routing of every
  image-stream token (top-1 expert and its score, and the mean gate scores) per step and pass.
* :func:`analyse` turns a recording into the paper's routing signature ``g`` (mean softmax gate
  scores over MoE layers and image tokens), ``s_hat = router_head(g)``, its cosine to the tags'
  semantic embedding ``s`` (sum of ``tag_embedding`` rows), and the tags ranked by cosine to
  ``s_hat``.
* :func:`optimal_gate_distribution` finds ``g*`` on the simplex maximising
  ``cos(router_head(g), s)``; :func:`tag_guidance` adds ``strength * log(g*)`` to every MoE
  router's logits for the length of a run (strength 0 changes nothing at all).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import TagMoEError
from ..model.moe import TagMoEFeedForward
from ..model.moe_linear import LinearExpertsMoE
from ..model.run_state import routing_run
from ..taxonomy import TAG_NAMES, TaskTags


@dataclass
class LayerRouting:
    step: int
    pass_name: str  # "cond" or "uncond"
    layer: int  # transformer block index
    experts: torch.Tensor  # [B, N] top-1 expert of every image-stream token (uint8)
    scores: torch.Tensor  # [B, N] its softmax score (float16)
    mean_scores: torch.Tensor  # [B, E] gate scores averaged over the tokens (float32)


@dataclass
class RoutingRecording:
    """What a :class:`RoutingRecorder` kept. Token layout: ``num_target`` target tokens on a
    ``target_grid`` (rows, cols) patch grid, then the condition tokens on ``condition_grid``."""

    records: list[LayerRouting] = field(default_factory=list)
    num_experts: int = 0
    num_target: int = 0
    target_grid: tuple[int, int] = (0, 0)
    condition_grid: tuple[int, int] | None = None
    steps: int = 0

    @property
    def layers(self) -> list[int]:
        return sorted({r.layer for r in self.records})

    def select(self, layers=None, steps=None, pass_name: str = "cond") -> list[LayerRouting]:
        chosen = [r for r in self.records if r.pass_name == pass_name
                  and (layers is None or r.layer in layers) and (steps is None or r.step in steps)]
        if not chosen:
            raise TagMoEError(f"no routing was recorded for layers {layers or 'all'}, steps {steps or 'all'} "
                              f"(recorded layers {self.layers}, steps 0-{self.steps - 1})")
        return chosen

    def signature(self, layers=None, steps=None, pass_name: str = "cond") -> torch.Tensor:
        """g: mean gate scores over the chosen layers, steps and all image tokens, per sample [B, E]."""
        return torch.stack([r.mean_scores for r in self.select(layers, steps, pass_name)]).mean(0)

    def signature_per_step(self, pass_name: str = "cond") -> torch.Tensor:
        """g of every step (over all layers), [steps, B, E]."""
        return torch.stack([self.signature(steps=[s], pass_name=pass_name) for s in range(self.steps)
                            if any(r.step == s and r.pass_name == pass_name for r in self.records)])

    def expert_maps(self, layers=None, steps=None, sample: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Share of the chosen (layer, step) routings in which each token chose each expert:
        target maps [E, rows, cols] and condition maps (or None)."""
        chosen = self.select(layers, steps)
        onehot = torch.stack([F.one_hot(r.experts[sample].long(), self.num_experts).float() for r in chosen]).mean(0)
        rows, cols = self.target_grid
        target = onehot[:self.num_target].T.reshape(self.num_experts, rows, cols)
        condition = None
        if self.condition_grid is not None:
            crow, ccol = self.condition_grid
            tokens = onehot[self.num_target:self.num_target + crow * ccol]  # the first condition image's
            if tokens.shape[0] == crow * ccol:
                condition = tokens.T.reshape(self.num_experts, crow, ccol)
        return target, condition


class RoutingRecorder:
    """Records a run: ``with recorder.attached(): ...`` (the observer is set for that run only,
    through :func:`~tagmoe_core.model.run_state.routing_run`, so other runs never feed it).

    The sampler tells it which step and pass runs through :meth:`before_pass`: one pass name, or
    one per equal chunk of the batch when conditional and unconditional passes run batched (as
    ComfyUI's samplers do). That is kept per thread: a sampler that runs passes on several threads at
    once (newer ComfyUI's multi-GPU split: the conditional pass on one device, the unconditional on
    another, one recorder) labels each layer's routing with the pass of the thread that computed it.
    """

    def __init__(self) -> None:
        self.recording = RoutingRecording()
        self._pass = threading.local()
        self._lock = threading.Lock()

    @property
    def step(self) -> int:
        return getattr(self._pass, "step", 0)

    @property
    def passes(self) -> tuple[str, ...]:
        return getattr(self._pass, "passes", ("cond",))

    def before_pass(self, step: int, passes: str | Sequence[str]) -> None:
        self._pass.step, self._pass.passes = step, (passes,) if isinstance(passes, str) else tuple(passes)
        with self._lock:
            self.recording.steps = max(self.recording.steps, step + 1)

    def set_layout(self, num_target: int, target_grid: tuple[int, int],
                   condition_grid: tuple[int, int] | None) -> None:
        rec = self.recording
        rec.num_target, rec.target_grid, rec.condition_grid = num_target, target_grid, condition_grid

    def __call__(self, layer_index: int, scores: torch.Tensor, experts: torch.Tensor,
                 weights: torch.Tensor, input_shape: torch.Size) -> None:
        batch, tokens = input_shape[0], input_shape[1]
        self.recording.num_experts = scores.shape[-1]
        top = experts[:, 0].reshape(batch, tokens).to(torch.uint8).cpu()
        score = weights[:, 0].reshape(batch, tokens).to(torch.float16).cpu()
        mean = scores.float().reshape(batch, tokens, -1).mean(1).cpu()
        step, passes = self.step, self.passes
        chunk = batch // len(passes)
        for i, name in enumerate(passes):
            rows = slice(i * chunk, (i + 1) * chunk)
            with self._lock:
                self.recording.records.append(LayerRouting(step, name, layer_index, top[rows], score[rows],
                                                           mean[rows]))

    @contextlib.contextmanager
    def attached(self, transformer: torch.nn.Module | None = None):
        if transformer is not None and not any(isinstance(m, (TagMoEFeedForward, LinearExpertsMoE))
                                               for m in transformer.modules()):
            raise TagMoEError("this transformer has no MoE layers to record")
        with routing_run(observer=self):
            yield self


@dataclass
class RoutingCapture:
    """A recording that is filled later (by the sampling run of a patched ComfyUI model), with the
    tag modules (``tag_embedding``/``router_head``) that interpret it."""

    heads: torch.nn.Module
    recording: RoutingRecording | None = None
    runs: int = 0


# -- semantics ---------------------------------------------------------------------------------------------
def _require_tag_modules(transformer) -> None:
    if not getattr(transformer, "tagmoe_has_tag_modules", True) or not hasattr(transformer, "router_head"):
        raise TagMoEError("this checkpoint has no tag_embedding/router_head, which routing analysis and tag "
                          "guidance need (the TAG-MoE release has them)")


def semantic_embedding(transformer, tags: TaskTags) -> torch.Tensor:
    """s = the sum of the tags' ``tag_embedding`` rows [512] (float32, CPU)."""
    _require_tag_modules(transformer)
    weight = transformer.tag_embedding.weight.detach().float().cpu()
    return weight[torch.tensor(tags.ids)].sum(0)


def _head_params(transformer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    _require_tag_modules(transformer)
    # Fresh float32 copies made outside inference mode: ComfyUI loads weights under
    # inference_mode, and inference tensors cannot take part in autograd.
    with torch.inference_mode(False):
        return [(m.weight.detach().float().cpu().clone(), m.bias.detach().float().cpu().clone())
                for m in transformer.router_head.net if isinstance(m, torch.nn.Linear)]


def _head(params, g: torch.Tensor) -> torch.Tensor:
    x = g
    for i, (weight, bias) in enumerate(params):
        x = F.linear(x, weight, bias)
        if i < len(params) - 1:
            x = F.gelu(x)
    return x


def router_head_output(transformer, g: torch.Tensor) -> torch.Tensor:
    """s_hat = router_head(g) in float32 on the CPU."""
    with torch.inference_mode(False):
        return _head(_head_params(transformer), g.float().cpu())


@dataclass
class RoutingAnalysis:
    signature: torch.Tensor  # g [E], averaged over the batch
    signature_per_step: torch.Tensor  # [steps, E]
    s_hat: torch.Tensor  # [512]
    ranking: list[tuple[str, float]]  # every tag by cosine(tag embedding, s_hat), best first
    expert_share: torch.Tensor  # share of target tokens whose top-1 is each expert (chosen layers/steps)
    alignment: float | None = None  # cos(s_hat, s) for the given tags
    tags: TaskTags | None = None

    def report(self) -> str:
        lines = ["routing signature g (mean gate scores): "
                 + ", ".join(f"e{i} {v:.3f}" for i, v in enumerate(self.signature.tolist())),
                 "top-1 share of target tokens: "
                 + ", ".join(f"e{i} {v:.1%}" for i, v in enumerate(self.expert_share.tolist()))]
        if self.alignment is not None:
            lines.append(f"alignment cos(router_head(g), s) with [{self.tags.to_text()}]: {self.alignment:+.3f}")
        lines.append("what the router reads as the task (cos to router_head(g)): "
                     + ", ".join(f"{name} {score:+.2f}" for name, score in self.ranking[:6]))
        if self.signature_per_step.shape[0] > 1:
            first, last = self.signature_per_step[0], self.signature_per_step[-1]
            lines.append("g at the first step: " + ", ".join(f"{v:.3f}" for v in first.tolist())
                         + "; at the last: " + ", ".join(f"{v:.3f}" for v in last.tolist()))
        return "\n".join(lines)


def analyse(recording: RoutingRecording, transformer, tags: TaskTags | None = None, layers=None,
            steps=None) -> RoutingAnalysis:
    g = recording.signature(layers, steps).mean(0)
    s_hat = router_head_output(transformer, g)
    table = transformer.tag_embedding.weight.detach().float().cpu()
    cosines = F.cosine_similarity(table, s_hat[None], dim=-1).tolist()
    ranking = sorted(zip(TAG_NAMES, cosines), key=lambda item: -item[1])
    alignment = None
    if tags is not None:
        alignment = float(F.cosine_similarity(s_hat, semantic_embedding(transformer, tags), dim=0))
    chosen = recording.select(layers, steps)
    counts = torch.stack([torch.bincount(r.experts[:, :recording.num_target].flatten().long(),
                                         minlength=recording.num_experts) for r in chosen]).sum(0).float()
    return RoutingAnalysis(g, recording.signature_per_step().mean(1), s_hat, ranking, counts / counts.sum(),
                           alignment, tags)


# -- tag-guided routing --------------------------------------------------------------------------------------
def optimal_gate_distribution(transformer, tags: TaskTags, steps: int = 100, lr: float = 0.1) -> torch.Tensor:
    """g* on the simplex maximising cos(router_head(g), s): gradient ascent on E logits."""
    s = semantic_embedding(transformer, tags)
    params = _head_params(transformer)
    num_experts = params[0][0].shape[1]
    with torch.inference_mode(False), torch.enable_grad():
        logits = torch.zeros(num_experts, requires_grad=True)
        optimizer = torch.optim.Adam([logits], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = -F.cosine_similarity(_head(params, logits.softmax(-1)), s, dim=0)
            loss.backward()
            optimizer.step()
        return logits.detach().softmax(-1)


def guidance_bias(heads, tags: TaskTags | None, strength: float, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g*, strength * log g*)``: the gate distribution that best expresses ``tags`` and the bias
    that steers every router toward it (on ``device`` in ``dtype``, where the routers compute)."""
    if tags is None:
        raise TagMoEError("tag guidance needs task tags (connect a TAG-MoE Task Tags node)")
    g_star = optimal_gate_distribution(heads, tags)
    return g_star, (float(strength) * torch.log(g_star.clamp_min(1e-6))).to(device=device, dtype=dtype)


@contextlib.contextmanager
def tag_guidance(heads, tags: TaskTags | None, strength: float, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """Add ``strength * log(g*)`` to every MoE router's logits inside the ``with`` block, for
    this run only (``heads``: anything with ``tag_embedding``/``router_head``; ``device``/``dtype``:
    where and how the routers compute, so the bias is not copied per call).

    Yields g* (or None when ``strength`` is 0, which leaves routing untouched)."""
    if not strength:
        yield None
        return
    g_star, bias = guidance_bias(heads, tags, strength, device, dtype)
    with routing_run(logit_bias=bias):
        yield g_star
