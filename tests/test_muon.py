"""``training.muon.MuonWithAdamW``: torch's Muon update for the marked groups, batched by shape, and
torch's AdamW for the rest, as one optimizer."""

from __future__ import annotations

import pytest
import torch

from tagmoe_core.training.muon import MuonWithAdamW, newton_schulz

SHAPES = [(32, 32), (96, 32), (16, 48), (32, 32)]


def _params(seed: int, shapes=SHAPES) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]


def _grads(step: int, params) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def test_muon_groups_take_torchs_muon_update_and_the_rest_torchs_adamw():
    ours, theirs = _params(0), _params(0)
    aux, aux_ref = _params(1, [(7,), (3, 5)]), _params(1, [(7,), (3, 5)])
    optimizer = MuonWithAdamW([{"params": ours, "muon": True, "lr": 2e-2}, {"params": aux}], lr=1e-2,
                              weight_decay=0.1, fused=True)
    muon = torch.optim.Muon(theirs, lr=2e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(aux_ref, lr=1e-2, weight_decay=0.1, fused=True)
    start = [p.detach().clone() for p in ours]
    for step in range(4):
        for group in (ours, theirs, aux, aux_ref):
            _grads(step, group)
        optimizer.step(), muon.step(), adamw.step()
    for a, b, s in zip(ours, theirs, start):
        # the same update; only bfloat16 rounding inside Newton-Schulz differs (batched vs one matrix, addmm)
        assert (a - b).norm() < 3e-2 * (b - s).norm()
    assert all(torch.equal(a, b) for a, b in zip(aux, aux_ref))  # AdamW's groups: AdamW, exactly


def test_stacked_matrices_are_orthogonalised_one_by_one():
    stacked = torch.nn.Parameter(torch.cat([p.detach() for p in _params(2, [(24, 16)] * 4)]))
    apart = _params(2, [(24, 16)] * 4)
    ours = MuonWithAdamW([{"params": [stacked], "muon": True, "matrices": 4}], lr=1e-2, weight_decay=0.0)
    theirs = torch.optim.Muon(apart, lr=1e-2, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    before = stacked.detach().clone()
    for step in range(3):
        _grads(step, apart)
        stacked.grad = torch.cat([p.grad for p in apart])
        ours.step(), theirs.step()
    expected = torch.cat([p.detach() for p in apart])
    assert (stacked - expected).norm() < 3e-2 * (expected - before).norm()
    # and not as one [96, 16] matrix: that update is another one
    joint = torch.nn.Parameter(before.clone())
    other = torch.optim.Muon([joint], lr=1e-2, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        _grads(step, apart)
        joint.grad = torch.cat([p.grad for p in apart])
        other.step()
    assert (joint - expected).norm() > 0.1 * (expected - before).norm()


def test_newton_schulz_flattens_the_spectrum():
    g = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 10, 32)
    singular = torch.linalg.svdvals(newton_schulz(g).float())
    assert singular.min() > 0.5 and singular.max() < 1.5  # Muon's US'V^T: S' within about (0.5, 1.5)
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 100


def test_a_state_dict_round_trip_continues_exactly():
    def run(steps, state=None, start=0):
        params, aux = _params(0), _params(1, [(7,)])
        opt = MuonWithAdamW([{"params": params, "muon": True}, {"params": aux}], lr=1e-2, weight_decay=0.1)
        if state is not None:
            weights, opt_state = state
            with torch.no_grad():
                for p, w in zip(params + aux, weights):
                    p.copy_(w)
            opt.load_state_dict(opt_state)
        for step in range(start, steps):
            _grads(step, params + aux)
            opt.step()
        return [p.detach().clone() for p in params + aux], opt.state_dict()

    whole, _ = run(5)
    half = run(2)
    resumed, _ = run(5, half, start=2)
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed))


def test_a_muon_group_refuses_what_is_not_a_stack_of_matrices():
    with pytest.raises(ValueError, match="2-D"):
        MuonWithAdamW([{"params": _params(0, [(8,)]), "muon": True}], lr=1e-2)
    with pytest.raises(ValueError, match="3 stacked"):
        MuonWithAdamW([{"params": _params(0, [(8, 4)]), "muon": True, "matrices": 3}], lr=1e-2)


def test_step_hooks_run_once_and_groups_can_be_added_later():
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])  # torch wraps the first optimizer class's step
    params, aux, later = _params(0), _params(1, [(7,)]), _params(2, [(16, 8)])
    optimizer = MuonWithAdamW([{"params": params, "muon": True}, {"params": aux}], lr=1e-2)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(len(opt.param_groups)))
    optimizer.add_param_group({"params": later, "muon": True, "lr": 3e-2})
    optimizer.add_param_group({"params": _params(3, [(5,)])})
    before = later[0].detach().clone()
    _grads(0, params + aux + later)
    optimizer.step()
    assert seen == [4]  # once, seeing every group
    assert optimizer.param_groups[2]["ns_steps"] == 5 and optimizer.param_groups[3]["muon"] is False
    assert not torch.equal(later[0], before)
    assert optimizer._step_supports_amp_scaling is False  # a GradScaler unscales for the Muon groups too
