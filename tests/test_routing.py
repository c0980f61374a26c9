"""Routing recording, the signature math, expert maps and tag-guided routing on the tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tagmoe_core.errors import InputError, TagMoEError
from tagmoe_core.intent.routing import (
    RoutingRecorder,
    analyse,
    optimal_gate_distribution,
    router_head_output,
    semantic_embedding,
)
from tagmoe_core.intent.routing_maps import parse_selection, render_expert_maps
from tagmoe_core.model.moe import moe_layers
from tagmoe_core.model.run_state import RoutingRun, current_routing
from tagmoe_core.taxonomy import TAG_NAMES, TaskTags

PROMPT = "Turn the photo into a watercolor painting"
STYLE = TaskTags.from_text("global editing, style transfer, structure preservation")


def run(pipe, photo, **kwargs):
    recorder = RoutingRecorder()
    args = {"width": 64, "height": 48, "steps": 2, "seed": 0} | kwargs
    out = pipe.sample(pipe.encode(PROMPT), photo, recorder=recorder, **args)
    return out, recorder.recording


def test_recording_shapes_and_layout(tiny_pipe, photo):
    _, rec = run(tiny_pipe, photo)
    assert rec.layers == [2, 3] and rec.steps == 2 and rec.num_experts == 4
    assert len(rec.records) == 2 * 2 * 2  # steps x (cond, uncond) x MoE layers
    assert rec.num_target == 12 and rec.target_grid == (3, 4) and rec.condition_grid == (3, 4)
    first = rec.records[0]
    assert first.experts.shape == (1, 24) and first.experts.dtype == torch.uint8
    assert first.scores.shape == (1, 24) and first.mean_scores.shape == (1, 4)
    torch.testing.assert_close(first.mean_scores.sum(-1), torch.ones(1))
    assert {r.pass_name for r in rec.records} == {"cond", "uncond"}
    assert current_routing() == RoutingRun()  # detached afterwards


def test_signature_is_the_mean_softmax_gate_score(tiny_pipe, photo):
    seen = []

    def hook(module, args, output):  # an independent look at the router logits of the conditional passes
        seen.append(output.detach().float().softmax(-1).mean(0))

    passes = []
    handles = [layer.router.layer.register_forward_hook(hook) for layer in moe_layers(tiny_pipe.transformer)]
    try:
        _, rec = run(tiny_pipe, photo, before_pass=lambda step, name: passes.append(name))
    finally:
        for h in handles:
            h.remove()
    per_pass = [seen[i:i + 2] for i in range(0, len(seen), 2)]  # two MoE layers per pass
    cond = [torch.stack(p).mean(0) for p, name in zip(per_pass, passes) if name == "cond"]
    torch.testing.assert_close(rec.signature()[0], torch.stack(cond).mean(0), rtol=1e-5, atol=1e-6)


def test_analysis_math(tiny_pipe, photo):
    _, rec = run(tiny_pipe, photo)
    result = analyse(rec, tiny_pipe.transformer, STYLE)
    g = rec.signature().mean(0)
    with torch.no_grad():
        want = tiny_pipe.transformer.router_head(g.to(tiny_pipe.dtype)).float()
    torch.testing.assert_close(result.s_hat, want, rtol=1e-5, atol=1e-5)
    s = tiny_pipe.transformer.tag_embedding.weight[torch.tensor(STYLE.ids)].sum(0).float()
    assert result.alignment == pytest.approx(float(F.cosine_similarity(want, s, dim=0)), abs=1e-5)
    assert [name for name, _ in result.ranking] != list(TAG_NAMES) and len(result.ranking) == 18
    scores = [score for _, score in result.ranking]
    assert scores == sorted(scores, reverse=True)
    assert result.expert_share.sum() == pytest.approx(1.0) and result.signature_per_step.shape == (2, 4)
    report = result.report()
    assert "routing signature g" in report and "alignment" in report and STYLE.to_text() in report


def test_expert_maps_and_selection(tiny_pipe, photo):
    _, rec = run(tiny_pipe, photo)
    target, condition = rec.expert_maps(layers=[3], steps=[1])
    assert target.shape == (4, 3, 4) and condition.shape == (4, 3, 4)
    torch.testing.assert_close(target.sum(0), torch.ones(3, 4))
    picture = render_expert_maps(rec, target_image=photo, condition_image=photo)
    assert picture.width == 5 * 256 and picture.height > 2 * 18
    assert parse_selection("all", [2, 3], "layers") is None
    assert parse_selection("2-3, 3", [2, 3], "layers") == [2, 3]
    assert parse_selection("-1", [0, 1], "steps") == [1]
    with pytest.raises(InputError, match="were not recorded"):
        parse_selection("50-59", [2, 3], "layers")
    with pytest.raises(InputError, match="numbers or ranges"):
        parse_selection("first", [2, 3], "layers")
    with pytest.raises(TagMoEError, match="no routing was recorded"):
        rec.select(layers=[0])


def test_region_condition_grid(tiny_pipe, photo):
    _, rec = run(tiny_pipe, photo, width=64, height=64, region=(1, 0, 2, 1))
    assert rec.condition_grid == (2, 2) and rec.expert_maps()[1].shape == (4, 2, 2)


def test_optimal_gate_distribution_is_on_the_simplex_and_beats_alternatives(tiny_pipe):
    g_star = optimal_gate_distribution(tiny_pipe.transformer, STYLE)
    assert g_star.shape == (4,) and g_star.min() >= 0 and g_star.sum() == pytest.approx(1.0)
    s = semantic_embedding(tiny_pipe.transformer, STYLE)

    def cos(g):
        return float(F.cosine_similarity(router_head_output(tiny_pipe.transformer, g), s, dim=0))

    samples = torch.distributions.Dirichlet(torch.ones(4)).sample((200,))
    best_sampled = max(cos(g) for g in samples)
    assert cos(g_star) >= cos(torch.full((4,), 0.25)) and cos(g_star) >= best_sampled - 1e-3


def test_zero_guidance_is_the_release_behaviour_bit_for_bit(tiny_pipe, photo):
    cond = tiny_pipe.encode(PROMPT)
    plain = tiny_pipe.sample(cond, photo, width=32, height=32, steps=2, seed=4)
    zero = tiny_pipe.sample(cond, photo, width=32, height=32, steps=2, seed=4, tags=STYLE, tag_guidance=0.0)
    assert torch.equal(plain.latents, zero.latents) and zero.g_star is None
    guided = tiny_pipe.sample(cond, photo, width=32, height=32, steps=2, seed=4, tags=STYLE, tag_guidance=1.0)
    assert not torch.equal(plain.latents, guided.latents)
    assert current_routing() == RoutingRun()
    after = tiny_pipe.sample(cond, photo, width=32, height=32, steps=2, seed=4)
    assert torch.equal(plain.latents, after.latents)  # nothing of the guided run is left behind


def test_guidance_moves_the_signature_toward_g_star_monotonically(tiny_pipe, photo):
    """With bias lambda * log g*, each token's gate distribution p becomes p * g*^lambda
    (renormalised): E_p[log g*] grows with lambda. Measured on the whole model: the
    cross-entropy of the routing signature to g* falls, and alignment does not drop."""
    closeness, alignment = [], []
    for strength in (0.0, 0.5, 1.0, 2.0, 4.0):
        out, rec = run(tiny_pipe, photo, tags=STYLE, tag_guidance=strength)
        g_star = optimal_gate_distribution(tiny_pipe.transformer, STYLE)
        g = rec.signature().mean(0)
        closeness.append(float((g * g_star.log()).sum()))
        alignment.append(analyse(rec, tiny_pipe.transformer, STYLE).alignment)
    assert all(b > a for a, b in zip(closeness, closeness[1:])), closeness
    assert all(b >= a - 1e-4 for a, b in zip(alignment, alignment[1:])), alignment
    assert alignment[-1] > alignment[0]


def test_guidance_bias_is_removed_after_a_cancelled_run(tiny_pipe, photo):
    def stop(step, name):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        tiny_pipe.sample(tiny_pipe.encode(PROMPT), photo, width=32, height=32, steps=2, seed=0, tags=STYLE,
                         tag_guidance=2.0, recorder=RoutingRecorder(), before_pass=stop)
    assert current_routing() == RoutingRun()


def test_guidance_without_tags_and_models_without_tag_modules(tiny_pipe, photo):
    with pytest.raises(TagMoEError, match="needs task tags"):
        tiny_pipe.sample(tiny_pipe.encode(PROMPT), photo, width=32, height=32, steps=1, tag_guidance=1.0)
    tiny_pipe.transformer.tagmoe_has_tag_modules = False
    try:
        with pytest.raises(TagMoEError, match="no tag_embedding/router_head"):
            optimal_gate_distribution(tiny_pipe.transformer, STYLE)
    finally:
        tiny_pipe.transformer.tagmoe_has_tag_modules = True


def test_concurrent_runs_on_one_pipeline_keep_their_own_routing(tiny_pipe, photo):
    """A guided, recorded run and a plain one in two threads at once give exactly what they give
    one after the other: the bias and the recorder belong to their run, not to the shared layers."""
    import threading

    cond = tiny_pipe.encode(PROMPT)
    kwargs = {"width": 32, "height": 32, "steps": 3, "seed": 5}

    def guided():
        recorder = RoutingRecorder()
        out = tiny_pipe.sample(cond, photo, tags=STYLE, tag_guidance=3.0, recorder=recorder, **kwargs)
        return out.latents, len(recorder.recording.records)

    def plain():
        return tiny_pipe.sample(cond, photo, **kwargs).latents

    want_guided, want_plain = guided(), plain()
    results: dict[str, list] = {"guided": [], "plain": []}
    barrier = threading.Barrier(2)

    def worker(name, fn):
        barrier.wait()
        for _ in range(3):
            results[name].append(fn())

    threads = [threading.Thread(target=worker, args=("guided", guided)),
               threading.Thread(target=worker, args=("plain", plain))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results["guided"]) == len(results["plain"]) == 3
    for latents, records in results["guided"]:
        assert torch.equal(latents, want_guided[0]) and records == want_guided[1]
    for latents in results["plain"]:
        assert torch.equal(latents, want_plain)
    assert not torch.equal(want_guided[0], want_plain)


def test_expert_maps_draw_the_first_condition_when_several_were_recorded():
    """A native run may carry two reference latents: the maps show the first, they do not crash."""
    from tagmoe_core.intent.routing import LayerRouting, RoutingRecording

    rec = RoutingRecording(num_experts=2, num_target=4, target_grid=(2, 2), condition_grid=(2, 2), steps=1)
    experts = torch.tensor([[0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.uint8)  # 4 + 4 + 6 tokens
    rec.records.append(LayerRouting(0, "cond", 5, experts, torch.ones(1, 14, dtype=torch.float16),
                                    torch.full((1, 2), 0.5)))
    target, condition = rec.expert_maps()
    assert target.shape == (2, 2, 2) and condition.shape == (2, 2, 2)
    assert torch.equal(condition[1], torch.ones(2, 2))  # the first condition's 4 tokens all chose expert 1


def test_one_recorder_fed_from_two_threads_labels_each_pass_by_its_own_thread(tiny_pipe):
    """Newer ComfyUI's multi-GPU split runs the conditional and the unconditional pass in two threads
    at once, through one recorder (``with_routing_recorder``'s apply_model wrapper: ``before_pass``,
    then the model under ``attached()``, on each thread): each layer's routing keeps its own thread's
    step and pass, not the one the other thread set last."""
    import threading

    layer = moe_layers(tiny_pipe.transformer)[0]
    recorder = RoutingRecorder()
    both_set = threading.Barrier(2)
    x = torch.randn(1, 6, layer.router.layer.in_features, generator=torch.Generator().manual_seed(0))
    errors = []

    def one_pass(step: int, name: str) -> None:
        try:
            recorder.before_pass(step, name)
            both_set.wait()  # both threads have told the recorder their pass before either runs
            with torch.no_grad(), recorder.attached():
                layer(x)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one_pass, args=(3, "cond")),
               threading.Thread(target=one_pass, args=(4, "uncond"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    labels = sorted((r.step, r.pass_name) for r in recorder.recording.records)
    assert labels == [(3, "cond"), (4, "uncond")]
    assert recorder.recording.steps == 5
    # both threads routed the same tokens through the same layer: the same choices, filed apart
    first, second = recorder.recording.records
    assert torch.equal(first.experts, second.experts)
