"""Segmentation losses of the study (Methods, Loss functions), chosen by name.

Every loss takes logits (B, 1, X, Y, Z), a binary target (B, 1, X, Y, Z) and a brain mask of the same
shape or None. Statistics are per patient (sums over the spatial axes), restricted to the brain when a
mask is given (a voxel outside the brain is neither a false positive nor a true negative), then
averaged over the batch. Reductions run in float32, also under bf16 autocast.

Tversky index TI = TP / (TP + α·FP + β·FN): α weights false positives, β false negatives, as in MONAI's
`TverskyLoss` and the paper's PCC. Tversky training uses α = 1 − β, β from a schedule over epochs.

When the network sees a box of the brain (`ctvlab.unet.inputs`, region "ring"), two whole-brain terms keep
the loss the study's: PCC's lesion fraction f comes from the whole brain (`fraction`), and target voxels
outside the box count as false negatives (`extra_fn`: the probability there is 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ctvlab.config import BetaSchedule, LossConfig
from ctvlab.errors import ConfigError

# MONAI's defaults (smooth_nr = smooth_dr = 1e-5), so that dice/tversky equal MONAI's losses.
SMOOTH = 1e-5
_SPATIAL = (2, 3, 4)


def _float32(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.float() for t in tensors]


def _no_autocast(device: torch.device):
    # Sums over ~10⁵ voxels lose digits in bf16; run the statistics in float32 whatever the context.
    return torch.autocast(device_type=device.type, enabled=False)


def tp_fp_fn(
    prob: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    extra_fn: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft true positives, false positives and false negatives per patient, each (B,).

    Args:
        prob: (B, 1, X, Y, Z) probabilities.
        target: (B, 1, X, Y, Z) in {0, 1}.
        mask: (B, 1, X, Y, Z) brain mask or None; voxels outside it do not count.
        extra_fn: (B,) target voxels the network did not see (outside its box), added to FN; or None.
    """
    with _no_autocast(prob.device):
        prob, target, mask = _float32(prob, target, mask)
        if mask is not None:
            prob, target = prob * mask, target * mask
        tp = (prob * target).sum(_SPATIAL).flatten()
        fp = (prob * (1 - target)).sum(_SPATIAL).flatten()
        fn = ((1 - prob) * target).sum(_SPATIAL).flatten()
        if extra_fn is not None:
            fn = fn + extra_fn.float().flatten()
    return tp, fp, fn


def tversky_index(
    prob: torch.Tensor,
    target: torch.Tensor,
    alpha: float | torch.Tensor,
    beta: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    smooth: float = SMOOTH,
    extra_fn: torch.Tensor | None = None,
) -> torch.Tensor:
    """TI = (TP + s) / (TP + α·FP + β·FN + s) per patient, (B,); α, β scalars or (B,) tensors."""
    tp, fp, fn = tp_fp_fn(prob, target, mask, extra_fn)
    return (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)


def _check(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> None:
    if logits.ndim != 5 or logits.shape[1] != 1:
        raise ValueError(f"losses expect logits (B, 1, X, Y, Z), got {tuple(logits.shape)}")
    if target.shape != logits.shape or (mask is not None and mask.shape != logits.shape):
        shapes = (tuple(logits.shape), tuple(target.shape), None if mask is None else tuple(mask.shape))
        raise ValueError(f"logits, target and mask shapes differ: {shapes}")


def _prob(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits.float())


def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float | torch.Tensor,
    beta: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    extra_fn: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean over patients of 1 − TI (α weights FP, β weights FN); a float32 scalar."""
    _check(logits, target, mask)
    return (1 - tversky_index(_prob(logits), target, alpha, beta, mask, extra_fn=extra_fn)).mean()


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    extra_fn: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean over patients of 1 − (2·TP + s) / (2·TP + FP + FN + s); MONAI's `DiceLoss(sigmoid=True)`."""
    _check(logits, target, mask)
    tp, fp, fn = tp_fp_fn(_prob(logits), target, mask, extra_fn)
    return (1 - (2 * tp + SMOOTH) / (2 * tp + fp + fn + SMOOTH)).mean()


def pcc_alpha_beta(
    target: torch.Tensor, mask: torch.Tensor | None = None, fraction: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patient Tversky weights of the PCC (Eq. 1): β = 1/(f+1), α = 1 − β.

    f = lesion voxels / brain voxels of each patient (all voxels when `mask` is None), or `fraction`
    (B,) when given (the whole brain's, for a network that sees a box of it). Small lesions give β near 1:
    missing lesion voxels costs the most where there are few of them.

    Returns:
        (alpha, beta), each float32 (B,).
    """
    if fraction is not None:
        beta = 1.0 / (fraction.float().flatten() + 1.0)
        return 1.0 - beta, beta
    with _no_autocast(target.device):
        target, mask = _float32(target, mask)
        if mask is None:
            lesion = target.sum(_SPATIAL).flatten()
            brain = torch.full_like(lesion, float(target[0].numel()))
        else:
            lesion = (target * mask).sum(_SPATIAL).flatten()
            brain = mask.sum(_SPATIAL).flatten().clamp_min(1.0)
        beta = 1.0 / (lesion / brain + 1.0)
    return 1.0 - beta, beta


def pcc_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    fraction: torch.Tensor | None = None,
    extra_fn: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean over patients of 1 − PCC, PCC = TP / (TP + α·FP + β·FN) with each patient's α, β (Eq. 1)."""
    _check(logits, target, mask)
    alpha, beta = pcc_alpha_beta(target, mask, fraction)
    return (1 - tversky_index(_prob(logits), target, alpha, beta, mask, extra_fn=extra_fn)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy averaged over each patient's brain voxels, then over patients."""
    _check(logits, target, mask)
    with _no_autocast(logits.device):
        logits, target, mask = _float32(logits, target, mask)
        voxelwise = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if mask is None:
            return voxelwise.mean(_SPATIAL).mean()
        per_patient = (voxelwise * mask).sum(_SPATIAL) / mask.sum(_SPATIAL).clamp_min(1.0)
        return per_patient.mean()


def beta_at(schedule: BetaSchedule, epoch: int) -> float:
    """Tversky β at an epoch (counted from 0); see `BetaSchedule`."""
    if schedule.kind == "constant":
        return schedule.start
    if schedule.kind == "linear":
        t = min(max(epoch, 0) / schedule.ramp_epochs, 1.0)
        return schedule.start + t * (schedule.end - schedule.start)
    if schedule.kind == "step":
        return schedule.start if epoch < schedule.step_epoch else schedule.end
    raise ConfigError(f"unknown β schedule {schedule.kind!r}; choose constant, linear or step.")


# A registered loss: (logits, target, brain mask or None, Tversky β of the epoch, whole-brain f or None,
# target voxels outside the box or None) → scalar. Only "tversky" uses β; the PCC losses derive α, β per
# patient (Eq. 1). BCE averages over the voxels the network sees.
LossFn = Callable[..., torch.Tensor]


def _dice(logits, target, mask, beta, fraction, extra_fn):
    return dice_loss(logits, target, mask, extra_fn)


def _tversky(logits, target, mask, beta, fraction, extra_fn):
    # α = 1 − β: the study swept β with α + β = 1 (Results; optimum α = 0.02, β = 0.98).
    return tversky_loss(logits, target, 1.0 - beta, beta, mask, extra_fn)


def _pcc(logits, target, mask, beta, fraction, extra_fn):
    return pcc_loss(logits, target, mask, fraction, extra_fn)


def _pcc_bce(logits, target, mask, beta, fraction, extra_fn):
    return pcc_loss(logits, target, mask, fraction, extra_fn) + bce_loss(logits, target, mask)


def _pcc_half_bce(logits, target, mask, beta, fraction, extra_fn):
    return pcc_loss(logits, target, mask, fraction, extra_fn) + 0.5 * bce_loss(logits, target, mask)


LOSSES: dict[str, LossFn] = {
    "dice": _dice,
    "tversky": _tversky,
    "pcc": _pcc,
    "pcc+bce": _pcc_bce,
    "pcc+0.5bce": _pcc_half_bce,
}


def make_loss(cfg: LossConfig) -> Callable[..., torch.Tensor]:
    """The configured loss as `loss(logits, target, brain, epoch, fraction=None, outside_fn=None) -> scalar`
    (float32); `fraction` and `outside_fn` are the batch's whole-brain terms (`batches.loss_extras`).

    Raises:
        ConfigError: unknown loss name.
    """
    if cfg.name not in LOSSES:
        raise ConfigError(f"unknown loss {cfg.name!r}; choose one of: {', '.join(LOSSES)}.")
    fn = LOSSES[cfg.name]
    schedule = cfg.beta

    def loss(
        logits: torch.Tensor,
        target: torch.Tensor,
        brain: torch.Tensor | None,
        epoch: int,
        fraction: torch.Tensor | None = None,
        outside_fn: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fn(logits, target, brain, beta_at(schedule, epoch), fraction, outside_fn)

    return loss
