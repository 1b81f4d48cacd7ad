"""Losses against MONAI and against hand computations of the paper's Eq. 1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, TverskyLoss

from ctvlab.config import BetaSchedule, LossConfig
from ctvlab.unet.losses import (
    LOSSES,
    SMOOTH,
    bce_loss,
    beta_at,
    dice_loss,
    make_loss,
    pcc_alpha_beta,
    pcc_loss,
    tversky_loss,
)


def _random_case(seed=0, shape=(3, 1, 6, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 2
    target = (torch.rand(shape, generator=g) < 0.3).float()
    brain = (torch.rand(shape, generator=g) < 0.7).float()
    return logits, target * brain, brain


@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 0.5), (0.3, 0.7), (0.02, 0.98), (0.9, 0.1)])
def test_tversky_equals_monai(alpha, beta):
    logits, target, _ = _random_case()
    monai = TverskyLoss(sigmoid=True, alpha=alpha, beta=beta, batch=False, reduction="mean")
    torch.testing.assert_close(
        tversky_loss(logits, target, alpha, beta), monai(logits, target), rtol=0, atol=1e-6
    )


def test_dice_equals_monai():
    logits, target, _ = _random_case(1)
    monai = DiceLoss(sigmoid=True, batch=False)
    torch.testing.assert_close(dice_loss(logits, target), monai(logits, target), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["dice", "tversky", "pcc", "bce"])
def test_voxels_outside_the_brain_do_not_count(name):
    """With a brain mask, the loss equals the unmasked loss on the brain voxels alone (gathered into a
    (B, 1, N, 1, 1) volume per patient; here every patient has the same number of brain voxels)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 4, 4, 4, generator=g)
    brain = torch.zeros(2, 1, 4, 4, 4)
    brain[0, :, :2] = 1
    brain[1, :, :, 1:3] = 1
    target = (torch.rand(2, 1, 4, 4, 4, generator=g) < 0.4).float() * brain
    fns = {
        "dice": dice_loss,
        "tversky": lambda lo, t, m=None: tversky_loss(lo, t, 0.2, 0.8, m),
        "pcc": pcc_loss,
        "bce": bce_loss,
    }
    fn = fns[name]

    def gather(x):
        return x[brain.bool()].reshape(2, 1, 32, 1, 1)

    torch.testing.assert_close(fn(logits, target, brain), fn(gather(logits), gather(target)))
    # And changing the logits outside the brain changes nothing.
    shifted = logits + 10 * (1 - brain)
    torch.testing.assert_close(fn(shifted, target, brain), fn(logits, target, brain))


def _logit(p: float) -> float:
    return -math.inf if p == 0 else math.log(p / (1 - p))


def _patient(brain_n, target_idx, probs):
    """A 16-voxel patient as (1, 2, 2, 4): brain = first brain_n voxels, given probabilities."""
    logits = torch.tensor([_logit(p) for p in probs]).reshape(1, 2, 2, 4)
    target = torch.zeros(16)
    target[list(target_idx)] = 1
    brain = (torch.arange(16) < brain_n).float()
    return logits, target.reshape(1, 2, 2, 4), brain.reshape(1, 2, 2, 4)


def test_pcc_hand_computation():
    """Eq. 1 per patient, three lesion sizes, written out.

    A: brain 10 voxels, lesion 2 → f = 0.2, β = 1/1.2 = 5/6, α = 1/6.
       p = .75, .25 on the lesion; .75 on one healthy brain voxel; .75 on 6 voxels outside the brain
       (ignored). TP = 1, FP = .75, FN = .25 + .75 = 1. PCC = 1 / (1 + .75/6 + 5/6) = 0.510638.
    B: brain 16, lesion 8 → f = 0.5, β = 2/3, α = 1/3.
       p = .75 on 4 lesion voxels, .25 on the other 4; .75 on 4 healthy voxels.
       TP = 4, FP = 3, FN = 4. PCC = 4 / (4 + 1 + 8/3) = 0.521739.
    C: brain 16, lesion 1 → f = 1/16, β = 16/17, α = 1/17.
       p = .75 on the lesion, .25 on one healthy voxel. TP = .75, FP = .25, FN = .25.
       PCC = .75 / (.75 + .25/17 + 4/17) = 0.75.
    """
    a = _patient(10, [0, 1], [0.75, 0.25, 0.75] + [0.0] * 7 + [0.75] * 6)
    b = _patient(16, range(8), [0.75] * 4 + [0.25] * 4 + [0.75] * 4 + [0.0] * 4)
    c = _patient(16, [0], [0.75, 0.25] + [0.0] * 14)
    logits, target, brain = (torch.stack(parts) for parts in zip(a, b, c, strict=True))
    assert logits.shape == (3, 1, 2, 2, 4)

    alpha, beta = pcc_alpha_beta(target, brain)
    torch.testing.assert_close(beta, torch.tensor([5 / 6, 2 / 3, 16 / 17]))
    torch.testing.assert_close(alpha, torch.tensor([1 / 6, 1 / 3, 1 / 17]))

    s = SMOOTH
    pcc = [
        (1 + s) / (1 + 0.75 / 6 + 5 / 6 * 1 + s),
        (4 + s) / (4 + 3 / 3 + 2 / 3 * 4 + s),
        (0.75 + s) / (0.75 + 0.25 / 17 + 16 / 17 * 0.25 + s),
    ]
    assert pcc == pytest.approx([0.510638, 0.521739, 0.75], abs=1e-5)
    expected = sum(1 - v for v in pcc) / 3
    assert pcc_loss(logits, target, brain).item() == pytest.approx(expected, abs=1e-6)


def test_pcc_alpha_beta_without_mask_uses_all_voxels():
    target = torch.zeros(2, 1, 4, 4, 4)
    target[0, :, :2, :2, :2] = 1  # 8 of 64 voxels: f = 1/8, β = 8/9
    alpha, beta = pcc_alpha_beta(target)
    torch.testing.assert_close(beta, torch.tensor([8 / 9, 1.0]))
    torch.testing.assert_close(alpha, torch.tensor([1 / 9, 0.0]))


def test_bce_is_a_per_patient_mean_over_the_brain():
    logits, target, brain = _random_case(3)
    per_patient = [
        F.binary_cross_entropy_with_logits(logits[i][brain[i] > 0], target[i][brain[i] > 0]) for i in range(3)
    ]
    torch.testing.assert_close(bce_loss(logits, target, brain), torch.stack(per_patient).mean())


@pytest.mark.parametrize(
    ("kind", "epoch", "expected"),
    [
        ("constant", 0, 0.5),
        ("constant", 50, 0.5),
        ("linear", 0, 0.5),
        ("linear", 2, 0.6),
        ("linear", 5, 0.75),
        ("linear", 10, 1.0),
        ("linear", 30, 1.0),
        ("step", 0, 0.5),
        ("step", 3, 0.5),
        ("step", 4, 1.0),
        ("step", 9, 1.0),
    ],
)
def test_beta_at(kind, epoch, expected):
    schedule = BetaSchedule(kind=kind, start=0.5, end=1.0, ramp_epochs=10, step_epoch=4)
    assert beta_at(schedule, epoch) == pytest.approx(expected)


def test_make_loss_tversky_follows_the_schedule():
    logits, target, brain = _random_case(4)
    cfg = LossConfig(name="tversky", beta=BetaSchedule(kind="step", start=0.6, end=0.9, step_epoch=3))
    loss = make_loss(cfg)
    torch.testing.assert_close(loss(logits, target, brain, 2), tversky_loss(logits, target, 0.4, 0.6, brain))
    torch.testing.assert_close(loss(logits, target, brain, 3), tversky_loss(logits, target, 0.1, 0.9, brain))


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("dice", lambda lo, t, m: dice_loss(lo, t, m)),
        ("pcc", lambda lo, t, m: pcc_loss(lo, t, m)),
        ("pcc+bce", lambda lo, t, m: pcc_loss(lo, t, m) + bce_loss(lo, t, m)),
        ("pcc+0.5bce", lambda lo, t, m: pcc_loss(lo, t, m) + 0.5 * bce_loss(lo, t, m)),
    ],
)
def test_make_loss_by_name(name, reference):
    logits, target, brain = _random_case(5)
    torch.testing.assert_close(
        make_loss(LossConfig(name=name))(logits, target, brain, 7), reference(logits, target, brain)
    )


def test_registry_covers_the_config_names():
    from typing import get_args

    from ctvlab.config import LossName

    assert set(LOSSES) == set(get_args(LossName))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float32_under_bf16_autocast(name):
    logits, target, brain = _random_case(6)
    logits = logits.bfloat16().requires_grad_()
    loss = make_loss(LossConfig(name=name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits, target, brain, 0)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(logits.detach().float(), target, brain, 0))
    value.backward()
    assert torch.isfinite(logits.grad.float()).all()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        pcc_loss(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float32_under_cuda_bf16_autocast(name):
    logits, target, brain = (t.cuda() for t in _random_case(6))
    loss = make_loss(LossConfig(name=name))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = loss(logits.bfloat16(), target, brain, 0)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(logits.bfloat16().float(), target, brain, 0))
