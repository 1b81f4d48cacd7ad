"""The study's CTV evaluation metrics, per patient, against the composite lesion target.

`pred`, `target` and `brain` are (X, Y, Z) masks on one grid (bool or 0/1); `spacing` is the voxel size
(sx, sy, sz) in mm. Overlap metrics count voxels within the brain (Methods, Model evaluation):
sensitivity, specificity, Dice, Tversky (α = 0.02 on false positives, β = 0.98 on false negatives) and
the PCC of Eq. 1. The 95th-percentile Hausdorff distance is MONAI's, spacing-aware, in mm.

Edge cases never divide by zero; each has a defined value:

| metric | no target voxels | no predicted voxels | neither |
|---|---|---|---|
| sensitivity TP/(TP+FN) | NaN | 0 | NaN |
| positive predictive value TP/(TP+FP) | 0 | NaN | NaN |
| specificity TN/(TN+FP) | NaN only when the target fills the brain | 1 | 1 |
| Dice, Tversky, PCC | 0 | 0 | 1 (perfect agreement) |
| hd95_mm | NaN | NaN | 0.0 |
| coverage of a region | NaN when the region is empty | 0 | — |

NaN means "undefined for this patient": tables report it as missing and means skip it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from ctvlab.study import TVERSKY_ALPHA, TVERSKY_BETA

__all__ = [
    "METRICS",
    "choose_threshold",
    "confusion",
    "coverage",
    "ctv_metrics",
    "ctv_wilcoxon",
    "dice",
    "hd95",
    "overlap_metrics",
    "pcc",
    "pcc_weights",
    "sensitivity",
    "specificity",
    "tversky",
]

# The six metrics of the study's Fig. 3 and Supplementary Table 1, in their order.
METRICS: tuple[str, ...] = ("sensitivity", "specificity", "dice", "hd95_mm", "tversky", "pcc")


def confusion(pred: np.ndarray, target: np.ndarray, brain: np.ndarray) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) voxel counts within the brain."""
    pred, target, brain = (np.asarray(a, dtype=bool) for a in (pred, target, brain))
    p = pred & brain
    t = target & brain
    tp = int(np.count_nonzero(p & t))
    n_p = int(np.count_nonzero(p))
    n_t = int(np.count_nonzero(t))
    n_b = int(np.count_nonzero(brain))
    fp = n_p - tp
    fn = n_t - tp
    return tp, fp, fn, n_b - tp - fp - fn


def sensitivity(pred: np.ndarray, target: np.ndarray, brain: np.ndarray) -> float:
    """TP / (TP + FN) within the brain; NaN without target voxels."""
    tp, _, fn, _ = confusion(pred, target, brain)
    return _ratio(tp, tp + fn, empty=math.nan)


def specificity(pred: np.ndarray, target: np.ndarray, brain: np.ndarray) -> float:
    """TN / (TN + FP) within the brain; NaN when the target covers the whole brain."""
    _, fp, _, tn = confusion(pred, target, brain)
    return _ratio(tn, tn + fp, empty=math.nan)


def dice(pred: np.ndarray, target: np.ndarray, brain: np.ndarray) -> float:
    """2TP / (2TP + FP + FN) within the brain; 1.0 when both are empty."""
    tp, fp, fn, _ = confusion(pred, target, brain)
    return _ratio(2 * tp, 2 * tp + fp + fn, empty=1.0)


def tversky(
    pred: np.ndarray,
    target: np.ndarray,
    brain: np.ndarray,
    alpha: float = TVERSKY_ALPHA,
    beta: float = TVERSKY_BETA,
) -> float:
    """TP / (TP + α·FP + β·FN) within the brain; 1.0 when both are empty.

    α weighs false positives and β false negatives, as in MONAI's `TverskyLoss` (1 − loss). The study
    selected models with α = 0.02, β = 0.98 (Methods, Hyperparameter search); α = β = 0.5 is Dice.
    """
    tp, fp, fn, _ = confusion(pred, target, brain)
    return _tversky_index(tp, fp, fn, alpha, beta)


def pcc_weights(n_target: int, n_brain: int) -> tuple[float, float]:
    """(α, β) of the Progression Coverage Coefficient, Eq. 1: β = 1/(f+1), α = 1 − β, f = target/brain.

    Smaller lesions give a larger β, so false negatives weigh more. An empty brain gives f = 0 (β = 1).
    """
    f = n_target / n_brain if n_brain > 0 else 0.0
    beta = 1.0 / (f + 1.0)
    return 1.0 - beta, beta


def pcc(pred: np.ndarray, target: np.ndarray, brain: np.ndarray) -> float:
    """Progression Coverage Coefficient (Eq. 1), per patient: TP / (TP + α·FP + β·FN), α and β from the
    patient's target fraction of the brain (`pcc_weights`); 1.0 when both are empty."""
    tp, fp, fn, tn = confusion(pred, target, brain)
    alpha, beta = pcc_weights(tp + fn, tp + fp + fn + tn)
    return _tversky_index(tp, fp, fn, alpha, beta)


def overlap_metrics(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Sensitivity, specificity, Dice, Tversky (α = 0.02, β = 0.98) and PCC from confusion counts within
    the brain: the same values (and edge cases) as the mask functions above give for those counts."""
    alpha, beta = pcc_weights(tp + fn, tp + fp + fn + tn)
    return {
        "tversky": _tversky_index(tp, fp, fn, TVERSKY_ALPHA, TVERSKY_BETA),
        "pcc": _tversky_index(tp, fp, fn, alpha, beta),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, empty=1.0),
        "sensitivity": _ratio(tp, tp + fn, empty=math.nan),
        "specificity": _ratio(tn, tn + fp, empty=math.nan),
    }


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float], percentile: float = 95.0) -> float:
    """Percentile Hausdorff distance between the two mask surfaces, in mm (MONAI's definition).

    `monai.metrics.compute_hausdorff_distance(percentile=95, spacing=spacing)`:
    - The surface of a mask is its voxels with a face-neighbour outside it (mask XOR its erosion by
      the 6-connected cross; voxels on the array border count as surface).
    - For each surface voxel of `pred`, the Euclidean distance (voxel centres, scaled by `spacing`) to
      the nearest surface voxel of `target`, and the same from `target` to `pred`.
    - The 95th percentile of each of the two directed distance sets (linear interpolation, as
      `torch.quantile`), and the larger of the two.

    Empty masks: both empty → 0.0 (identical); exactly one empty → NaN (undefined; MONAI would say inf).

    Args:
        pred, target: (X, Y, Z) masks.
        spacing: voxel size (sx, sy, sz) in mm.
        percentile: 95 for HD95; 100 gives the classical (maximum) Hausdorff distance.
    """
    pred = np.asarray(pred, dtype=bool)
    target = np.asarray(target, dtype=bool)
    has_pred, has_target = bool(pred.any()), bool(target.any())
    if not has_pred and not has_target:
        return 0.0
    if has_pred != has_target:
        return math.nan
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        # MONAI 1.6 warns about an argument that its own edge finder passes; nothing for us to change.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_hausdorff_distance(
            pred[None, None],
            target[None, None],
            include_background=True,  # one foreground channel, no background channel to skip
            percentile=percentile,
            spacing=[float(s) for s in spacing],
        )
    return float(value.item())


def coverage(pred: np.ndarray, region: np.ndarray) -> float:
    """|pred ∧ region| / |region|: the fraction of a region inside the CTV; NaN when the region is empty.

    The caller chooses the region, e.g. the progression that lies outside the pre-RT lesion.
    """
    region = np.asarray(region, dtype=bool)
    n = int(np.count_nonzero(region))
    return _ratio(int(np.count_nonzero(np.asarray(pred, dtype=bool) & region)), n, empty=math.nan)


def ctv_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    brain: np.ndarray,
    spacing: Sequence[float],
    alpha: float = TVERSKY_ALPHA,
    beta: float = TVERSKY_BETA,
) -> dict[str, float]:
    """Every per-patient metric of one CTV against the target.

    Returns:
        {"sensitivity", "specificity", "ppv", "dice", "hd95_mm", "tversky", "pcc", "volume_cm3"}: the
        overlap metrics within the brain (ppv: the positive predictive value, the share of the CTV that
        progressed); hd95_mm between the brain-restricted masks; volume_cm3 of the whole
        `pred` (voxel count × voxel volume).
    """
    pred, target, brain = (np.asarray(a, dtype=bool) for a in (pred, target, brain))
    tp, fp, fn, tn = confusion(pred, target, brain)
    pcc_alpha, pcc_beta = pcc_weights(tp + fn, tp + fp + fn + tn)
    voxel_cm3 = float(np.prod([float(s) for s in spacing])) / 1000.0
    return {
        "sensitivity": _ratio(tp, tp + fn, empty=math.nan),
        "specificity": _ratio(tn, tn + fp, empty=math.nan),
        "ppv": _ratio(tp, tp + fp, empty=math.nan),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, empty=1.0),
        "hd95_mm": hd95(pred & brain, target & brain, spacing),
        "tversky": _tversky_index(tp, fp, fn, alpha, beta),
        "pcc": _tversky_index(tp, fp, fn, pcc_alpha, pcc_beta),
        "volume_cm3": int(np.count_nonzero(pred)) * voxel_cm3,
    }


def choose_threshold(
    probs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    brains: Sequence[np.ndarray],
    grid: Sequence[float],
    alpha: float = TVERSKY_ALPHA,
    beta: float = TVERSKY_BETA,
    *,
    lesions: Sequence[np.ndarray] | None = None,
    criticals: Sequence[np.ndarray] | None = None,
) -> tuple[float, dict[float, float]]:
    """The probability threshold with the highest mean per-patient Tversky over (validation) patients.

    The study selected its model by the validation Tversky at α = 0.02, β = 0.98 (Methods); the same
    criterion picks the threshold. Each patient's prediction is `prob ≥ t`, or, with `lesions` (pre-RT
    CEL ∪ T2L) given, the full model CTV of `ctvlab.ctv.construct.model_ctv`, so that the threshold is
    chosen on what is evaluated (`criticals` defaults to none).

    Ties (within 1e-12) go to the smaller threshold: the larger CTV, the side the study's β favours.

    Returns:
        (best threshold, {threshold: mean Tversky}) in grid order.
    """
    if not (len(probs) == len(targets) == len(brains)) or not probs:
        raise ValueError(
            f"choose_threshold needs one target and brain per probability map and at least one patient; "
            f"got {len(probs)} probabilities, {len(targets)} targets, {len(brains)} brains"
        )
    if not grid:
        raise ValueError("choose_threshold needs a non-empty threshold grid")
    if lesions is not None and len(lesions) != len(probs):
        raise ValueError(f"got {len(lesions)} lesions for {len(probs)} patients")
    from ctvlab.ctv.construct import model_ctv

    table: dict[float, float] = {}
    for t in grid:
        scores = []
        for i, (prob, target, brain) in enumerate(zip(probs, targets, brains, strict=True)):
            if lesions is None:
                pred = np.asarray(prob) >= t
            else:
                critical = criticals[i] if criticals is not None else np.zeros(np.shape(prob), dtype=bool)
                pred = model_ctv(prob, t, lesions[i], brain, critical)
            scores.append(tversky(pred, target, brain, alpha, beta))
        table[float(t)] = float(np.mean(scores))
    best = max(table.values())
    chosen = min(t for t, v in table.items() if v >= best - 1e-12)
    return chosen, table


WILCOXON_COLUMNS = ["metric", "reference", "other", "n", "n_zero", "median_difference", "p_value", "p_holm"]


def ctv_wilcoxon(
    per_patient,
    reference: str = "model",
    metrics: Iterable[str] = METRICS,
):
    """Wilcoxon signed-rank tests between CTVs, paired by patient (Methods, Model evaluation), with Holm's
    adjustment over the whole table (`ctvlab.statistics`).

    Args:
        per_patient: pandas DataFrame with columns "patient", "ctv" and one column per metric.
        reference: the CTV compared with each other CTV.
        metrics: metric columns to test.

    Returns:
        A DataFrame with `WILCOXON_COLUMNS`, one row per (metric, other CTV). Patients with a missing value
        in either CTV are left out of that test; `n` pairs were ranked after dropping `n_zero` zero
        differences; with no non-zero difference left, p is NaN (no test is possible).
    """
    import pandas as pd

    from ctvlab.statistics import holm, paired_wilcoxon

    rows = []
    ctvs = [c for c in dict.fromkeys(per_patient["ctv"]) if c != reference]
    for metric in metrics:
        if metric not in per_patient.columns:
            continue
        wide = per_patient.pivot_table(index="patient", columns="ctv", values=metric, dropna=False)
        for other in ctvs:
            if reference not in wide.columns or other not in wide.columns:
                continue
            t = paired_wilcoxon(wide[reference].to_numpy(), wide[other].to_numpy())
            rows.append({"metric": metric, "reference": reference, "other": other, "n": t.n, "n_zero": t.n_zero,
                         "median_difference": t.median_difference, "p_value": t.p})  # fmt: skip
    table = pd.DataFrame(rows, columns=WILCOXON_COLUMNS[:-1])
    table["p_holm"] = holm(table["p_value"].to_numpy())
    return table


def _ratio(num: float, den: float, empty: float) -> float:
    return float(num) / float(den) if den > 0 else empty


def _tversky_index(tp: int, fp: int, fn: int, alpha: float, beta: float) -> float:
    den = tp + alpha * fp + beta * fn
    if tp == 0 and fp == 0 and fn == 0:
        return 1.0
    return float(tp) / den if den > 0 else 0.0
