"""The MoE layer against an independent per-token implementation and MegaBlocks' layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tagmoe_core.errors import TagMoEError
from tagmoe_core.model.moe import MoESpec, TagMoEFeedForward, dropless_moe, grouped_matmul, set_backend
from tagmoe_core.model.run_state import routing_run

H, FFN = 16, 24


def make_layer(experts=4, top_k=1, seed=0) -> TagMoEFeedForward:
    layer = TagMoEFeedForward(H, MoESpec(num_experts=experts, top_k=top_k, ffn_hidden_size=FFN), backend="torch")
    layer.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.experts.bias.normal_(0, 1.0)  # a trained bias: must never be added
    return layer


def per_token_reference(layer: TagMoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Straightforward MegaBlocks dMoE eval semantics, one token at a time."""
    w1 = layer.experts.mlp.w1.detach()
    w2 = layer.experts.mlp.w2.detach()
    router = layer.router.layer.weight.detach()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ router.T, dim=-1)
        if layer.top_k == 1:
            order = [int(torch.argmax(probs))]  # first maximum, like torch.max
        else:
            order = torch.topk(probs, layer.top_k).indices.tolist()
        for e in order:
            w1_e = w1[e * FFN:(e + 1) * FFN]  # [F, H]
            w2_e = w2[e * FFN:(e + 1) * FFN]  # [F, H], applied untransposed
            h = F.gelu(x[t] @ w1_e.T, approximate="tanh")
            out[t] += probs[e] * (h @ w2_e)
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_matches_per_token_reference(top_k):
    layer = make_layer(top_k=top_k)
    x = torch.randn(2, 37, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer(x)
    want = per_token_reference(layer, x.reshape(-1, H)).reshape(x.shape)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_skewed_and_empty_experts():
    layer = make_layer()
    with torch.no_grad():  # route almost everything to expert 2; expert 0 and 3 get nothing
        layer.router.layer.weight.zero_()
        layer.router.layer.weight[2, 0] = 5.0
        layer.router.layer.weight[1, 0] = -5.0
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(2))
    x[:, 0] = x[:, 0].abs() + 0.5
    x[:5, 0] = -3.0  # a few tokens prefer expert 1
    with torch.no_grad():
        _, _, experts = layer.route(x)
        got = layer(x)
    counts = torch.bincount(experts.flatten(), minlength=4)
    assert counts[0] == 0 and counts[3] == 0 and counts[2] > 50 and counts[1] >= 1
    torch.testing.assert_close(got, per_token_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_all_tokens_to_one_expert_and_single_token():
    layer = make_layer()
    with torch.no_grad():
        layer.router.layer.weight.zero_()
        layer.router.layer.weight[3] = 1.0
    x = torch.rand(9, H) + 0.1
    with torch.no_grad():
        torch.testing.assert_close(layer(x), per_token_reference(layer, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x[:1]), per_token_reference(layer, x[:1]), rtol=1e-5, atol=1e-5)


def test_ties_go_to_lowest_expert_and_output_scaled_by_raw_probability():
    layer = make_layer()
    with torch.no_grad():
        layer.router.layer.weight.zero_()  # uniform scores: every expert ties at 0.25
        scores, weights, experts = layer.route(torch.randn(5, H))
    assert torch.all(experts == 0)
    torch.testing.assert_close(weights, torch.full((5, 1), 0.25))
    torch.testing.assert_close(scores.sum(-1), torch.ones(5))


def test_parameter_names_and_shapes_match_megablocks_dmoe():
    # MegaBlocks 0.10 dMoE (mlp_type="mlp", mlp_impl="grouped", bias=True): LearnedRouter.layer,
    # ParallelDroplessMLP.bias [H] and GroupedMLP.w1/w2 [E*F, H].
    layer = TagMoEFeedForward(3072, MoESpec(num_experts=4, top_k=1), device="meta")
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "router.layer.weight": (4, 3072),
        "experts.mlp.w1": (4 * 12288, 3072),
        "experts.mlp.w2": (4 * 12288, 3072),
        "experts.bias": (3072,),
    }


def test_trained_bias_is_never_added():
    layer = make_layer()
    x = torch.randn(11, H)
    with torch.no_grad():
        before = layer(x)
        layer.experts.bias.add_(100.0)
        after = layer(x)
    torch.testing.assert_close(before, after)


def test_grouped_matmul_and_the_expert_loop_agree():
    from tagmoe_core.model.moe import expert_loop

    counts = torch.tensor([3, 0, 5, 2])
    a = torch.randn(10, 16)
    b = torch.randn(4, 16, 8)
    explicit = torch.cat([a[:3] @ b[0], a[3:8] @ b[2], a[8:] @ b[3]])
    torch.testing.assert_close(grouped_matmul(a, b, counts), explicit, rtol=1e-5, atol=1e-5)
    w2 = torch.randn(4, 8, 16)
    want = torch.cat([F.gelu(a[:3] @ b[0]) @ w2[0], F.gelu(a[3:8] @ b[2]) @ w2[2], F.gelu(a[8:] @ b[3]) @ w2[3]])
    torch.testing.assert_close(expert_loop(a, b, w2, counts, F.gelu), want, rtol=1e-5, atol=1e-5)
    assert expert_loop(a[:0], b, w2, torch.zeros(4, dtype=torch.long), F.gelu).shape == (0, 16)


def test_dropless_moe_computes_each_routed_pair_once():
    calls = []
    x = torch.randn(20, H)
    w1 = torch.randn(4, H, FFN)
    w2 = torch.randn(4, FFN, H)
    experts = torch.randint(0, 4, (20, 2))
    weights = torch.rand(20, 2)

    def act(t):
        calls.append(t.shape[0])
        return F.gelu(t, approximate="tanh")

    dropless_moe(x, weights, experts, w1, w2, act)
    assert sum(calls) == 40  # tokens x top_k rows, not tokens x experts
    assert len(calls) == len(torch.unique(experts))  # one MLP call per expert that got tokens


def test_bf16_runs_and_stays_close_to_fp32():
    layer = make_layer()
    x = torch.randn(32, H)
    with torch.no_grad():
        ref = layer(x)
        out = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # Route-aware: only tokens whose top-1 expert is the same in both precisions are comparable.
    with torch.no_grad():
        same = layer.route(x.bfloat16())[2].flatten() == make_layer().route(x)[2].flatten()
    torch.testing.assert_close(out.float()[same], ref[same], rtol=0.05, atol=0.05)


def test_observer_sees_scores_only_inside_its_run():
    layer = make_layer()
    seen = []
    x = torch.randn(3, 7, H)
    with torch.no_grad():
        layer(x)
        assert seen == []
        with routing_run(observer=lambda index, scores, experts, weights, shape: seen.append((scores, experts, shape))):
            layer(x)
        layer(x)
    assert len(seen) == 1
    scores, experts, shape = seen[0]
    assert scores.shape == (21, 4) and experts.shape == (21, 1) and tuple(shape) == (3, 7, H)


def test_logit_bias_steers_routing():
    layer = make_layer()
    x = torch.randn(50, H)
    with torch.no_grad(), routing_run(logit_bias=torch.tensor([0.0, 0.0, 50.0, 0.0])):
        _, _, experts = layer.route(x)
    assert torch.all(experts == 2)
    assert not torch.all(layer.route(x)[2] == 2)  # the bias ended with its run


def test_backend_choices_and_clear_errors():
    layer = make_layer()
    set_backend(layer, "megablocks")
    with pytest.raises(TagMoEError, match="needs CUDA, bfloat16"):
        layer(torch.randn(2, H))  # no CUDA here, or no megablocks: a clear message, not an ImportError
    set_backend(layer, "auto")
    layer(torch.randn(2, H))  # auto falls back to the torch backend on the CPU
    with pytest.raises(TagMoEError, match="unknown MoE backend"):
        set_backend(layer, "cuda")


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, "top_k"), ({"top_k": 5}, "top_k"), ({"num_experts": 0}, "num_experts"),
    ({"activation": "relu6"}, "activation"),
])
def test_spec_validation(kwargs, message):
    with pytest.raises(TagMoEError, match=message):
        MoESpec(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_megablocks_backend_matches_torch_backend_on_gpu():
    from tagmoe_core.model.moe import megablocks_available

    if not megablocks_available():
        pytest.skip("megablocks is not importable")
    layer = TagMoEFeedForward(256, MoESpec(num_experts=4, top_k=1), backend="torch", device="cuda",
                              dtype=torch.bfloat16)
    layer.reset_parameters()
    x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = layer(x)
        set_backend(layer, "megablocks")
        out = layer(x)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("top_k", [1, 2])
def test_cuda_grouped_path_matches_the_per_token_reference(top_k):
    layer = make_layer(top_k=top_k)
    x = torch.randn(300, H)
    with torch.no_grad():
        want = per_token_reference(layer, x)
        got = layer.to("cuda")(x.cuda()).cpu()  # grouped_mm on CUDA (H=16, F=24: aligned in fp32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
