"""Ranger = Lookahead(RAdam): fast weights, slow-weight sync, exact resume; the optimiser registry."""

from __future__ import annotations

import io

import pytest
import torch

from ctvlab.config import OptimConfig
from ctvlab.unet.optim import Lookahead, build_optimizer

A = torch.tensor([1.0, 3.0, 0.5, 2.0, 5.0])
B = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0])


def _params():
    """Two parameter tensors, so that ordering across tensors is exercised too."""
    return [torch.tensor([1.0, -2.0, 0.5], requires_grad=True), torch.tensor([3.0, -1.0], requires_grad=True)]


def _quadratic_step(opt, params):
    """One step on f(x) = ½ Σ a x² − b·x (minimum at x = b / a)."""
    opt.zero_grad()
    x = torch.cat(params)
    (0.5 * (A * x * x).sum() - (B * x).sum()).backward()
    opt.step()


def _radam(params):
    return torch.optim.RAdam(params, lr=0.1, betas=(0.95, 0.999), eps=1e-5)


def _flat(params):
    return torch.cat([p.detach().flatten() for p in params]).clone()


K, ALPHA = 5, 0.5


def test_fast_weights_equal_radam_until_the_first_sync():
    ref, ranger_params = _params(), _params()
    ref_opt, ranger = _radam(ref), Lookahead(_radam(ranger_params), k=K, alpha=ALPHA)
    for _ in range(K - 1):
        _quadratic_step(ref_opt, ref)
        _quadratic_step(ranger, ranger_params)
        assert torch.equal(_flat(ranger_params), _flat(ref))


def test_sync_moves_params_to_slow_plus_alpha_times_fast_minus_slow():
    ref, ranger_params = _params(), _params()
    initial = _flat(ref)
    ref_opt, ranger = _radam(ref), Lookahead(_radam(ranger_params), k=K, alpha=ALPHA)
    for _ in range(K):
        _quadratic_step(ref_opt, ref)
        _quadratic_step(ranger, ranger_params)
    fast = _flat(ref)
    expected = initial + ALPHA * (fast - initial)
    assert (fast - initial).abs().min() > 1e-3  # the check below can tell sync from no sync
    torch.testing.assert_close(_flat(ranger_params), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(
        torch.cat([s.flatten() for s in ranger.slow_weights()]), expected, rtol=0, atol=0
    )


def test_slow_weights_move_only_every_k_steps():
    params = _params()
    ranger = Lookahead(_radam(params), k=K, alpha=ALPHA)

    def slow_now():
        return torch.cat([s.flatten() for s in ranger.slow_weights()]).clone()

    slow = [slow_now()]
    for step in range(1, 3 * K + 1):
        _quadratic_step(ranger, params)
        slow.append(slow_now())
        moved = not torch.equal(slow[step], slow[step - 1])
        assert moved == (step % K == 0), f"step {step}"
        # At a sync the fast weights restart from the slow ones; between syncs they run ahead.
        assert torch.equal(_flat(params), slow[step]) == (step % K == 0), f"step {step}"


def test_state_dict_round_trip_resumes_exactly():
    params = _params()
    ranger = Lookahead(_radam(params), k=3, alpha=0.6)
    for _ in range(4):  # past one sync and into the next cycle
        _quadratic_step(ranger, params)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optim": ranger.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_params = [p.clone().requires_grad_() for p in saved["params"]]
    resumed = Lookahead(_radam(resumed_params), k=6, alpha=0.5)  # k and alpha come from the checkpoint
    resumed.load_state_dict(saved["optim"])
    assert (resumed.k, resumed.alpha, resumed.lookahead_steps) == (3, 0.6, 4)
    for _ in range(5):
        _quadratic_step(ranger, params)
        _quadratic_step(resumed, resumed_params)
        assert torch.equal(_flat(resumed_params), _flat(params))


def test_lr_scheduler_drives_the_inner_optimiser():
    ranger = Lookahead(_radam(_params()), k=K)
    scheduler = torch.optim.lr_scheduler.StepLR(ranger, step_size=1, gamma=0.5)
    ranger.step()
    scheduler.step()
    assert ranger.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("name", "inner", "check"),
    [
        ("ranger", torch.optim.RAdam, {"lr": 2e-4, "betas": (0.95, 0.999), "eps": 1e-5}),
        ("adam", torch.optim.Adam, {"lr": 2e-4, "betas": (0.95, 0.999), "eps": 1e-5}),
        ("sgd", torch.optim.SGD, {"lr": 2e-4, "momentum": 0.8}),
    ],
)
def test_build_optimizer(name, inner, check):
    opt = build_optimizer(_params(), OptimConfig(name=name, lr=2e-4, momentum=0.8, lookahead_k=4))
    if name == "ranger":
        assert isinstance(opt, Lookahead) and opt.k == 4
        opt = opt.optimizer
    assert type(opt) is inner
    assert {key: opt.param_groups[0][key] for key in check} == check


def test_ranger_minimises_the_quadratic():
    params = _params()
    ranger = build_optimizer(params, OptimConfig(lr=0.1))
    for _ in range(500):
        _quadratic_step(ranger, params)
    torch.testing.assert_close(_flat(params), B / A, rtol=0, atol=0.05)


def _move_model_after_building_the_optimiser(target: dict):
    """As Ray Train does: the optimiser is built on CPU float32 params, then the model moves."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    ranger = Lookahead(_radam(model.parameters()), k=2, alpha=0.5)
    model.to(**target)
    x = torch.randn(8, 3, **target)
    for _ in range(4):
        ranger.zero_grad()
        model(x).square().mean().backward()
        ranger.step()
    for p, slow in zip(model.parameters(), ranger.slow_weights(), strict=True):
        assert (slow.device, slow.dtype) == (p.device, p.dtype)
        assert torch.equal(p.detach(), slow)  # step 4 was a sync


def test_slow_weights_follow_a_moved_model():
    _move_model_after_building_the_optimiser({"dtype": torch.float64})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_slow_weights_follow_a_model_moved_to_cuda():
    _move_model_after_building_the_optimiser({"device": torch.device("cuda")})
