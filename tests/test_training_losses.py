"""The training objective's terms against their documented values (SPEC 3 and 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tagmoe_core.intent.routing import RoutingRecorder, semantic_embedding
from tagmoe_core.model.moe import MoESpec, TagMoEFeedForward
from tagmoe_core.pipeline.schedule import QWEN_IMAGE_SCHEDULER, shifted_sigmas
from tagmoe_core.taxonomy import TaskTags
from tagmoe_core.training.losses import (LayerScores, RoutingTape, alignment_loss, draw_sigmas, flow_loss,
                                         load_balancing_loss, noised, objective, routing_signature,
                                         semantic_embeddings, training_sigmas)

E = 4


def _layers(count: int, hidden: int = 16, spec: MoESpec = MoESpec(num_experts=E, top_k=1)) -> list[TagMoEFeedForward]:
    layers = []
    for i in range(count):
        layer = TagMoEFeedForward(hidden, spec, backend="torch", layer_index=i)
        layer.reset_parameters(torch.Generator().manual_seed(i))
        layers.append(layer)
    return layers


def _tape(layers, x: torch.Tensor) -> RoutingTape:
    tape = RoutingTape()
    with tape.recording():
        for layer in layers:
            x = x + layer(x)
    return tape


def test_load_balancing_loss_is_one_under_uniform_scores_and_lambda_gives_megablocks_weight():
    layers = _layers(3)
    for layer in layers:
        torch.nn.init.zeros_(layer.router.layer.weight)  # every gate score 1/E (top-1 then ties to expert 0)
    tape = _tape(layers, torch.randn(2, 10, 16))
    assert len(tape.layers) == 3 and tape.closed
    lbl = load_balancing_loss(tape)
    assert float(lbl.detach()) == pytest.approx(1.0, abs=1e-6)
    # MegaBlocks' batched_load_balancing_loss with moe_loss_weight w equals w under uniform routing.
    terms = objective(torch.tensor(0.0), lbl, torch.tensor(0.0), lambda_lbl=0.01, lambda_align=0.0)
    assert float(terms.total.detach()) == pytest.approx(0.01, abs=1e-8)


def test_load_balancing_loss_balanced_counts_and_collapsed_routing():
    tokens = 8
    scores = torch.rand(1, tokens, E).softmax(-1)
    balanced = torch.arange(tokens).remainder(E)[:, None]  # 2 tokens per expert
    tape = RoutingTape([LayerScores(50, scores, balanced)])
    assert float(load_balancing_loss(tape)) == pytest.approx(1.0, abs=1e-6)  # dot(T/E * 1, mean scores) = T/E
    collapsed = torch.zeros(tokens, 1, dtype=torch.long)  # every token on expert 0
    tape = RoutingTape([LayerScores(50, scores, collapsed)])
    assert float(load_balancing_loss(tape)) == pytest.approx(E * float(scores[0, :, 0].mean()), rel=1e-6)


def test_load_balancing_loss_trains_the_routers_toward_balance():
    layers = _layers(2)
    params = [layer.router.layer.weight for layer in layers]
    for p in params:
        p.requires_grad_(True)
        with torch.no_grad():
            p[0] += 0.5  # expert 0 takes almost every token
    x = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0)) + 1.0
    optimizer = torch.optim.SGD(params, lr=0.5)
    before = float(load_balancing_loss(_tape(layers, x)).detach())
    for _ in range(20):
        optimizer.zero_grad()
        load_balancing_loss(_tape(layers, x)).backward()
        optimizer.step()
    after = float(load_balancing_loss(_tape(layers, x)).detach())
    assert before > 2.0 and after < 0.9 * before, (before, after)


def test_alignment_loss_is_zero_when_s_hat_is_parallel_to_s():
    s = torch.randn(3, 512)
    assert float(alignment_loss(2.5 * s, s)) == pytest.approx(0.0, abs=1e-6)
    assert float(alignment_loss(-s, s)) == pytest.approx(2.0, abs=1e-6)
    orthogonal = torch.zeros(1, 512)
    orthogonal[0, 0], other = 1.0, torch.zeros(1, 512)
    other[0, 1] = 1.0
    assert float(alignment_loss(orthogonal, other)) == pytest.approx(1.0, abs=1e-6)


def test_signature_and_semantics_are_the_routing_analysis_ones(tiny_pipe):
    """g and s as ``intent.routing`` computes them, on one real forward of the tiny TAG-MoE."""
    transformer = tiny_pipe.transformer
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 12 + 12, 64, generator=generator)
    text = torch.randn(2, 5, 32, generator=generator)
    tape, recorder = RoutingTape(), RoutingRecorder()

    def forward():
        transformer(hidden_states=hidden, timestep=torch.tensor([0.5, 0.5]), encoder_hidden_states=text,
                    img_shapes=[[(1, 3, 4), (1, 3, 4)]] * 2, return_dict=False)

    with torch.no_grad():
        with tape.recording():
            forward()
        with recorder.attached(transformer):  # one observer a run: the same forward again
            recorder.before_pass(0, "cond")
            forward()
    assert [layer.layer for layer in tape.layers] == [2, 3]
    torch.testing.assert_close(routing_signature(tape), recorder.recording.signature(), rtol=0, atol=1e-7)
    tags = [TaskTags("local editing", ("attribute editing",), ("background preservation",)),
            TaskTags("image generation")]
    s = semantic_embeddings(transformer.tag_embedding, [t.ids for t in tags])
    for row, t in zip(s, tags):
        torch.testing.assert_close(row, semantic_embedding(transformer, t))


def test_training_sigmas_are_the_reference_schedule_at_its_training_steps():
    table = training_sigmas(12)
    assert torch.equal(table, torch.from_numpy(shifted_sigmas(1000, 12, QWEN_IMAGE_SCHEDULER)))
    assert float(table[0]) == pytest.approx(1.0) and float(table[-1]) == pytest.approx(0.02, abs=1e-6)
    drawn = draw_sigmas(256, 12, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) <= set(table.tolist()) and len(set(drawn.tolist())) > 200
    # The larger the image, the more the shift moves the noise levels up (as sampling does).
    assert float(training_sigmas(4096).median()) > float(table.median())


def test_the_velocity_target_is_what_the_reference_scheduler_integrates():
    """One Euler step of diffusers' FlowMatch scheduler with v = noise - x0 lands on x0."""
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 12, 64, generator=generator), torch.randn(1, 12, 64, generator=generator)
    sigma = torch.tensor([0.7])
    x_t = noised(x0, noise, sigma)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=np.array([0.7], dtype=np.float32))
    torch.testing.assert_close(scheduler.scale_noise(x0, scheduler.timesteps[:1], noise), x_t)
    stepped = scheduler.step(noise - x0, scheduler.timesteps[0], x_t, return_dict=False)[0]
    torch.testing.assert_close(stepped, x0, rtol=0, atol=1e-5)
    assert float(flow_loss(noise - x0, x0, noise)) == 0.0
