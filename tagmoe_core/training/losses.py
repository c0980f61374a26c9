"""The paper's training objective: ``L = L_flow + lambda_lbl * L_lbl + lambda_align * L_align``.

* ``L_flow``: flow matching on Qwen-Image's model-space tokens. ``x_t = (1 - sigma) x0 + sigma n``
  (the scheduler's ``scale_noise``), the transformer predicts the velocity ``v = n - x0`` (what
  its Euler step ``x + (sigma_next - sigma) v`` integrates) at timestep ``sigma``; mean squared
  error over the target tokens. ``sigma`` is drawn uniformly from the reference scheduler's own
  schedule at ``num_train_timesteps`` (1000) steps for the sample's size
  (``pipeline.schedule.shifted_sigmas``: dynamic shift, terminal stretch), so training sees the
  noise levels where sampling spends its steps.
* ``L_lbl``: MegaBlocks' load-balancing loss over the MoE layers of one forward,
  ``E / (L * T * k) * sum_l dot(counts_l, mean_t scores_l)`` (counts: tokens per expert, scores: the
  routers' softmax), here without MegaBlocks' ``moe_loss_weight`` so that it is exactly 1 under
  uniform routing (uniform scores or balanced counts) and ``lambda_lbl`` = 0.01 gives MegaBlocks'
  value (the release's ``moe_loss_weight``).
* ``L_align``: ``1 - cos(router_head(g), s)`` with ``g`` the routing signature (mean softmax
  gate scores over the MoE layers and every image-stream token, per sample: what
  ``intent.routing`` computes from a recording) and ``s`` the sum of the sample's
  ``tag_embedding`` rows; mean over the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..model.run_state import routing_run
from ..pipeline.schedule import QWEN_IMAGE_SCHEDULER, shifted_sigmas


# -- L_flow -----------------------------------------------------------------------------------------------
def training_sigmas(image_seq_len: int, scheduler_config: Mapping[str, Any] = QWEN_IMAGE_SCHEDULER) -> torch.Tensor:
    """The sigmas of the reference's schedule at ``num_train_timesteps`` steps for a target of
    ``image_seq_len`` tokens (float32, from 1 down to the terminal 0.02)."""
    steps = int(scheduler_config.get("num_train_timesteps", 1000))
    return torch.from_numpy(shifted_sigmas(steps, image_seq_len, scheduler_config))


def draw_sigmas(batch: int, image_seq_len: int, generator: torch.Generator,
                scheduler_config: Mapping[str, Any] = QWEN_IMAGE_SCHEDULER) -> torch.Tensor:
    """[batch] sigmas drawn uniformly from :func:`training_sigmas` (on the CPU, from ``generator``)."""
    table = training_sigmas(image_seq_len, scheduler_config)
    return table[torch.randint(len(table), (batch,), generator=generator)]


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x0 + sigma noise`` for tokens [B, N, C] and sigmas [B] (the scheduler's ``scale_noise``)."""
    s = sigma.view(-1, 1, 1).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def flow_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted velocity against ``noise - x0`` (float32)."""
    return F.mse_loss(prediction.float(), (noise - x0).float())


# -- routing of one forward --------------------------------------------------------------------------------
@dataclass
class LayerScores:
    layer: int
    scores: torch.Tensor  # [B, N, E] softmax gate scores, with their graph
    experts: torch.Tensor  # [B*N, k] chosen experts


@dataclass
class RoutingTape:
    """Every MoE layer's routing of one forward, kept with its graph (so the losses reach the routers).

    An observer of :func:`~tagmoe_core.model.run_state.routing_run`, like the analysis's recorder;
    calls after the forward (gradient checkpointing recomputes it during backward) are ignored."""

    layers: list[LayerScores] = field(default_factory=list)
    closed: bool = False

    def __call__(self, layer_index: int, scores: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                 input_shape: torch.Size) -> None:
        if self.closed:
            return
        batch, tokens = input_shape[0], input_shape[1]
        self.layers.append(LayerScores(layer_index, scores.reshape(batch, tokens, -1), experts))

    @contextlib.contextmanager
    def recording(self) -> Iterator["RoutingTape"]:
        with routing_run(observer=self):
            yield self
        self.closed = True


def load_balancing_loss(tape: RoutingTape, top_k: int = 1) -> torch.Tensor:
    """MegaBlocks' ``batched_load_balancing_loss`` with weight 1 (1 under uniform routing)."""
    if not tape.layers:
        raise ValueError("no MoE layer was recorded")
    num_experts = tape.layers[0].scores.shape[-1]
    total = None
    tokens = tape.layers[0].scores.shape[0] * tape.layers[0].scores.shape[1]
    for layer in tape.layers:
        scores = layer.scores.float().reshape(-1, num_experts)
        flat = layer.experts.reshape(-1)
        counts = torch.zeros(num_experts, dtype=torch.float32, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
        term = torch.dot(counts, scores.mean(0))
        total = term if total is None else total + term
    return num_experts / (len(tape.layers) * tokens * top_k) * total


def routing_signature(tape: RoutingTape) -> torch.Tensor:
    """g [B, E]: mean gate scores over the image-stream tokens of each layer, then over the layers
    (``intent.routing.RoutingRecording.signature`` of one forward, with its graph)."""
    return torch.stack([layer.scores.float().mean(1) for layer in tape.layers]).mean(0)


# -- L_align ----------------------------------------------------------------------------------------------
def semantic_embeddings(tag_embedding: torch.nn.Embedding, tag_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """s [B, D]: each sample's sum of ``tag_embedding`` rows (``intent.routing.semantic_embedding``, with its graph)."""
    device = tag_embedding.weight.device
    return torch.stack([tag_embedding(torch.tensor(list(ids), device=device)).float().sum(0) for ids in tag_ids])


def alignment_loss(s_hat: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``1 - cos(s_hat, s)`` per sample [B, D] x [B, D], averaged over the batch."""
    return (1.0 - F.cosine_similarity(s_hat.float(), s.float(), dim=-1)).mean()


def predicted_semantics(router_head: torch.nn.Module, g: torch.Tensor) -> torch.Tensor:
    """s_hat = router_head(g), in the head's dtype."""
    weight = next(router_head.parameters())
    return router_head(g.to(weight.dtype))


@dataclass
class LossTerms:
    total: torch.Tensor
    flow: float
    lbl: float
    align: float

    def as_dict(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "flow": self.flow, "lbl": self.lbl, "align": self.align}


def objective(flow: torch.Tensor, lbl: torch.Tensor, align: torch.Tensor, lambda_lbl: float,
              lambda_align: float) -> LossTerms:
    """``L_flow + lambda_lbl * L_lbl + lambda_align * L_align``; a term whose weight is 0 is only reported."""
    total = flow
    if lambda_lbl:
        total = total + lambda_lbl * lbl
    if lambda_align:
        total = total + lambda_align * align
    return LossTerms(total, float(flow.detach()), float(lbl.detach()), float(align.detach()))
