"""One fold of a voxel-wise progression model, pure (no Ray, no I/O): fit on the training patients' voxels,
score the test patients' voxels (Methods, "Voxel-wise predictions").

Every choice that could leak test information stays inside the training fold: the NAV-normal values
imputed for a random forest, stable-voxel subsampling and class weights are computed from training rows
only, and the test fold is scored as it is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ctvlab.config import VoxelModelConfig
from ctvlab.data.layout import DISTANCE_COLUMN
from ctvlab.voxel_models.labels import (
    label_rows,
)

# NAV-normal value of a feature when a training fold has no stable voxel with a value for it: the
# normalised maps are 1 in normal-appearing tissue, the indices 0.
_INDICES = ("CNI", "CCrI", "CrNI")
COUNT_FIELDS = (
    "n_train", "n_test", "n_train_patients", "n_test_patients", "train_pos", "train_neg",
    "test_pos", "test_neg", "n_train_dropped", "n_test_dropped",
)  # fmt: skip


@dataclass
class FoldResult:
    """One fold's test predictions, AUC and importances.

    Row counts are after the missing-value policy; `n_train` is also after subsampling. Importances
    are dicts feature → value: `impurity` is the forest's mean decrease in impurity or XGBoost's gain
    (each normalised to sum to 1); `permutation` is the mean drop in test AUC when the feature is shuffled.
    Times are wall-clock seconds, except `cpu_s`: CPU seconds of the process for the whole fold, which
    other load on the machine does not inflate.
    """

    fold: int
    auc: float
    reason: str | None
    n_train: int
    n_test: int
    n_train_patients: int
    n_test_patients: int
    train_pos: int
    train_neg: int
    test_pos: int
    test_neg: int
    n_train_dropped: int
    n_test_dropped: int
    y_test: np.ndarray
    scores: np.ndarray
    impurity: dict[str, float]
    permutation: dict[str, float]
    fit_s: float = 0.0
    predict_s: float = 0.0
    permutation_s: float = 0.0
    cpu_s: float = 0.0
    impute_values: dict[str, float] | None = None
    # The baseline on the same test rows: AUC of "the nearer the pre-RT T2L, the likelier progression"
    # (score = −distance); NaN where the test fold lacks a class or the rows carry no distance.
    auc_distance: float = float("nan")
    # The patient of each test row (for patient-level statistics; never written to a table or a run).
    test_patients: np.ndarray | None = None


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an ROC AUC (Hanley & McNeil 1982, Radiology 143:29), for independent samples.

    At AUC = 0.5 it equals the null standard deviation of the Mann–Whitney statistic,
    sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg)).
    """
    q1 = auc / (2 - auc)
    q2 = 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def fold_seed(seed: int, fold: int) -> int:
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def _matrix(df: pd.DataFrame, features: Sequence[str]) -> np.ndarray:
    """(n_rows, n_features) float32, NaN where a value is missing."""
    if not len(features):
        return np.empty((len(df), 0), np.float32)
    return np.column_stack([df[f].to_numpy(dtype=np.float32, na_value=np.nan) for f in features])


def _nav_values(x_train: np.ndarray, y_train: np.ndarray, features: Sequence[str]) -> dict[str, float]:
    """Median of each feature over the training fold's stable voxels (skipping missing values)."""
    stable = x_train[y_train == 0]
    out = {}
    for j, f in enumerate(features):
        col = stable[:, j]
        col = col[~np.isnan(col)]
        out[f] = float(np.median(col)) if col.size else (0.0 if f in _INDICES else 1.0)
    return out


def _make_model(cfg: VoxelModelConfig, y_train: np.ndarray, seed: int):
    n_pos = int(y_train.sum())
    n_neg = len(y_train) - n_pos
    balanced = cfg.class_balance == "balanced"
    if cfg.model == "xgboost":
        from xgboost import XGBClassifier

        x = cfg.xgboost
        return XGBClassifier(
            n_estimators=x.n_estimators,
            max_depth=x.max_depth,
            learning_rate=x.learning_rate,
            subsample=x.subsample,
            colsample_bytree=x.colsample_bytree,
            tree_method=x.tree_method,
            n_jobs=x.n_jobs,
            random_state=seed,
            scale_pos_weight=(n_neg / n_pos) if balanced else 1.0,
            importance_type="gain",
            missing=np.nan,
            eval_metric="logloss",
        )
    from sklearn.ensemble import RandomForestClassifier

    r = cfg.rf
    max_samples = r.max_samples
    if isinstance(max_samples, int):
        max_samples = min(max_samples, len(y_train))
    return RandomForestClassifier(
        n_estimators=r.n_estimators,
        max_depth=r.max_depth,
        max_samples=max_samples,
        min_samples_leaf=r.min_samples_leaf,
        max_features=r.max_features,
        n_jobs=r.n_jobs,
        random_state=seed,
        class_weight="balanced" if balanced else None,
    )


def empty_result(fold: int, reason: str, features: Sequence[str], **counts: int) -> FoldResult:
    base = dict.fromkeys(COUNT_FIELDS, 0)
    base.update(counts)
    nan = dict.fromkeys(features, float("nan"))
    return FoldResult(
        fold=fold,
        auc=float("nan"),
        reason=reason,
        y_test=np.empty(0, np.int8),
        scores=np.empty(0, np.float32),
        impurity=dict(nan),
        permutation=dict(nan),
        **base,
    )


def fit_predict_fold(
    train: pd.DataFrame,
    test: pd.DataFrame,
    features: list[str],
    target: str,
    cfg: VoxelModelConfig,
    seed: int,
    fold: int = 0,
) -> FoldResult:
    """Train on one fold's training patients, score its test patients.

    Args:
        train, test: voxel rows with `category`, the `features` columns (NaN/null where missing) and,
            when present, `patient_id` (used for patient counts only).
        features: feature columns, in model order.
        target: "nel", "cel" or "any" (see `labels.TARGETS`); other categories are dropped.
        cfg: model, missing-value policy, class balance and permutation settings.
        seed: seeds the model, the stable-voxel subsample and the permutations.
        fold: the fold's index, recorded in the result.

    Returns:
        FoldResult; its AUC is NaN with a `reason` when the test fold lacks a class (its predictions still
        count for the pooled ROC) or the training fold lacks one (nothing is fitted).
    """
    from sklearn.metrics import roc_auc_score

    cpu0 = time.process_time()
    tr, y_tr = label_rows(train, target)
    te, y_te = label_rows(test, target)
    x_tr, x_te = _matrix(tr, features), _matrix(te, features)
    d_te = te[DISTANCE_COLUMN].to_numpy(np.float32) if DISTANCE_COLUMN in te.columns else None
    pid_tr, pid_te = _patient_ids(tr), _patient_ids(te)
    dropped_tr = dropped_te = 0
    impute_values = None
    if cfg.model == "rf":
        if cfg.rf_missing == "covered_only":
            # Voxels with every study feature measured (MRSI coverage), whichever features this model uses:
            # an anatomical-only model is then compared on the same voxels as the full one.
            cover = [f for f in dict.fromkeys([*cfg.features, *features]) if f in tr.columns]
            keep_tr = ~np.isnan(_matrix(tr, cover)).any(axis=1)
            keep_te = ~np.isnan(_matrix(te, cover)).any(axis=1)
            dropped_tr, dropped_te = int((~keep_tr).sum()), int((~keep_te).sum())
            x_tr, y_tr, pid_tr = x_tr[keep_tr], y_tr[keep_tr], pid_tr[keep_tr]
            x_te, y_te, pid_te = x_te[keep_te], y_te[keep_te], pid_te[keep_te]
            d_te = d_te[keep_te] if d_te is not None else None
        else:
            impute_values = _nav_values(x_tr, y_tr, features)
            fill = np.array([impute_values[f] for f in features], np.float32)
            x_tr = np.where(np.isnan(x_tr), fill, x_tr)
            x_te = np.where(np.isnan(x_te), fill, x_te)

    rng = np.random.default_rng(seed)
    if cfg.class_balance == "subsample" and y_tr.sum() > 0:
        pos = np.flatnonzero(y_tr == 1)
        neg = np.flatnonzero(y_tr == 0)
        n_keep = min(len(neg), math.ceil(cfg.stable_ratio * len(pos)))
        keep = np.sort(np.concatenate([pos, rng.choice(neg, size=n_keep, replace=False)]))
        dropped_tr += len(y_tr) - len(keep)
        x_tr, y_tr, pid_tr = x_tr[keep], y_tr[keep], pid_tr[keep]

    counts = {
        "n_train": len(y_tr),
        "n_test": len(y_te),
        "n_train_patients": _count_patients(pid_tr),
        "n_test_patients": _count_patients(pid_te),
        "train_pos": int(y_tr.sum()),
        "train_neg": int(len(y_tr) - y_tr.sum()),
        "test_pos": int(y_te.sum()),
        "test_neg": int(len(y_te) - y_te.sum()),
        "n_train_dropped": dropped_tr,
        "n_test_dropped": dropped_te,
    }
    if counts["train_pos"] == 0 or counts["train_neg"] == 0:
        return empty_result(fold, "training fold lacks a class: nothing to fit", features, **counts)

    model = _make_model(cfg, y_tr, seed)
    t0 = time.perf_counter()
    model.fit(x_tr, y_tr)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = model.predict_proba(x_te)[:, 1].astype(np.float32) if len(y_te) else np.empty(0, np.float32)
    predict_s = time.perf_counter() - t0
    impurity = dict(zip(features, np.asarray(model.feature_importances_, float).tolist(), strict=True))

    both_classes = counts["test_pos"] > 0 and counts["test_neg"] > 0
    auc = float(roc_auc_score(y_te, scores)) if both_classes else float("nan")
    auc_distance = float(roc_auc_score(y_te, -d_te)) if both_classes and d_te is not None else float("nan")
    reason = None if both_classes else "test fold lacks a class: AUC undefined"
    t0 = time.perf_counter()
    permutation = (
        _permutation_importance(model, x_te, y_te, features, cfg, rng)
        if both_classes
        else dict.fromkeys(features, float("nan"))
    )
    return FoldResult(
        fold=fold,
        auc=auc,
        reason=reason,
        y_test=y_te,
        scores=scores,
        impurity=impurity,
        permutation=permutation,
        fit_s=fit_s,
        predict_s=predict_s,
        permutation_s=time.perf_counter() - t0,
        cpu_s=time.process_time() - cpu0,
        impute_values=impute_values,
        auc_distance=auc_distance,
        test_patients=pid_te,
        **counts,
    )


def _patient_ids(df: pd.DataFrame) -> np.ndarray:
    """Row-wise patient ids (None for every row when the frame has no patient_id column)."""
    if "patient_id" not in df.columns:
        return np.full(len(df), None, dtype=object)
    return df["patient_id"].to_numpy(dtype=object)


def _count_patients(ids: np.ndarray) -> int:
    return int(pd.Series(ids, dtype=object).nunique())  # missing ids (None) are not counted


def _permutation_importance(
    model: Any, x: np.ndarray, y: np.ndarray, features: Sequence[str], cfg: VoxelModelConfig, rng
) -> dict[str, float]:
    """Mean drop in test AUC over `cfg.permutation_repeats` shuffles of each feature.

    Runs on a random subset of at most `cfg.max_test_rows_for_permutation` test rows; if the subset has
    one class only, on all test rows.
    """
    from sklearn.inspection import permutation_importance

    n = len(y)
    if n > cfg.max_test_rows_for_permutation:
        idx = np.sort(rng.choice(n, size=cfg.max_test_rows_for_permutation, replace=False))
        if 0 < y[idx].sum() < len(idx):
            x, y = x[idx], y[idx]
    result = permutation_importance(
        model,
        x,
        y,
        scoring="roc_auc",
        n_repeats=cfg.permutation_repeats,
        random_state=int(rng.integers(2**31 - 1)),
        n_jobs=1,
    )
    return dict(zip(features, result.importances_mean.astype(float).tolist(), strict=True))
