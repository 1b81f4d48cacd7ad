"""Voxel-wise progression models with patient-grouped cross-validation (Methods, "Voxel-wise predictions").

A fold trains on the voxels of four folds' patients and tests on the fifth fold's patients, so no
patient's voxels are on both sides (the study's patient-wise split). `fit_predict_fold` is the pure core
(one fold, no Ray); `run_cv` reads the voxel table through Ray Data and runs the folds as Ray tasks.

Every choice that could leak test information stays inside the training fold: the NAV-normal values
imputed for a random forest, stable-voxel subsampling and class weights are computed from training rows
only, and the test fold is scored as it is.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctvlab.config import FEATURES, VoxelModelConfig
from ctvlab.data.layout import CATEGORY_CODES
from ctvlab.errors import DataError, LeakageError
from ctvlab.splits import check_disjoint
from ctvlab.voxel_models.labels import (
    label_rows,
    resolve_features,
    subgroup_patients,
    target_spec,
)

__all__ = [
    "CVResult",
    "FoldData",
    "FoldResult",
    "fit_predict_fold",
    "hanley_mcneil_se",
    "load_fold_data",
    "run_cv",
    "run_grid",
]

# Category labels of the voxel table, as a fixed pandas categorical so that fold frames concatenate
# without falling back to Python strings.
_CATEGORY_DTYPE = pd.CategoricalDtype([c for c in CATEGORY_CODES.values() if c != "outside"])
# NAV-normal value of a feature when a training fold has no stable voxel with a value for it: the
# normalised maps are 1 in normal-appearing tissue, the indices 0.
_INDICES = ("CNI", "CCrI", "CrNI")
_COUNT_FIELDS = (
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


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an ROC AUC (Hanley & McNeil 1982, Radiology 143:29), for independent samples.

    At AUC = 0.5 it equals the null standard deviation of the Mann–Whitney statistic,
    sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg)).
    """
    q1 = auc / (2 - auc)
    q2 = 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def _fold_seed(seed: int, fold: int) -> int:
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


def _empty_result(fold: int, reason: str, features: Sequence[str], **counts: int) -> FoldResult:
    base = dict.fromkeys(_COUNT_FIELDS, 0)
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
    pid_tr, pid_te = _patient_ids(tr), _patient_ids(te)
    dropped_tr = dropped_te = 0
    impute_values = None
    if cfg.model == "rf":
        if cfg.rf_missing == "covered_only":
            keep_tr = ~np.isnan(x_tr).any(axis=1)
            keep_te = ~np.isnan(x_te).any(axis=1)
            dropped_tr, dropped_te = int((~keep_tr).sum()), int((~keep_te).sum())
            x_tr, y_tr, pid_tr = x_tr[keep_tr], y_tr[keep_tr], pid_tr[keep_tr]
            x_te, y_te, pid_te = x_te[keep_te], y_te[keep_te], pid_te[keep_te]
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
        return _empty_result(fold, "training fold lacks a class: nothing to fit", features, **counts)

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


# --- reading folds -------------------------------------------------------------------------------


@dataclass
class FoldData:
    """The voxel rows of a fold map's patients, one compact frame per fold, read once and reused.

    Frames hold `patient_id` and `category` (pandas categoricals) and the feature columns (float32,
    NaN where missing). Rows of category "other" are dropped (no target uses them).
    """

    frames: dict[int, pd.DataFrame]
    features: list[str]
    folds: dict[str, int]
    read_s: float
    n_unassigned: int = 0
    _refs: dict[int, Any] | None = field(default=None, repr=False)

    def refs(self) -> dict[int, Any]:
        """The frames in Ray's object store (put once, shared by every run on this data)."""
        if self._refs is None:
            import ray

            self._refs = {k: ray.put(df) for k, df in self.frames.items()}
        return self._refs


def validate_fold_map(folds: Mapping[str, int] | pd.Series) -> dict[str, int]:
    """Patient → fold as a dict; LeakageError if a patient is listed twice or fewer than 2 folds are used."""
    items = list(folds.items())
    ids = [str(p) for p, _ in items]
    if len(set(ids)) != len(ids):
        dup = sorted({p for p in ids if ids.count(p) > 1})
        raise LeakageError(f"fold map lists patients in more than one fold: {', '.join(dup[:5])}")
    out = {}
    for pid, k in items:
        if isinstance(k, bool) or not float(k).is_integer() or k < 0:
            raise LeakageError(f"fold map: patient {pid} has fold {k!r}; folds are integers 0..k-1")
        out[str(pid)] = int(k)
    if len(set(out.values())) < 2:
        raise LeakageError("cross-validation needs patients in at least two folds")
    return out


def load_fold_data(
    prep: str | Path, folds: Mapping[str, int], features: Sequence[str] | None = None
) -> FoldData:
    """Read the voxel rows of every patient in `folds` through Ray Data (only the needed columns).

    Raises:
        LeakageError: the fold map lists a patient twice, uses one fold only, or names a patient that the
            prepared data does not hold (a split drawn for other data).
    """
    from ctvlab.data.layout import PrepPaths
    from ctvlab.data.readers import read_voxels

    fold_of = validate_fold_map(folds)
    features = resolve_features(features, FEATURES)
    paths = PrepPaths(prep)
    missing = sorted(p for p in fold_of if not paths.voxel_partition(p).is_dir())
    if missing:
        raise LeakageError(
            f"the fold map names {len(missing)} patient(s) without voxels in {paths.voxels}: "
            f"{', '.join(missing[:5])}. The split does not match this prepared dataset; draw it again "
            "(`ctvlab split`)."
        )
    on_disk = {p.name.split("=", 1)[1] for p in paths.voxels.glob("patient_id=*") if p.is_dir()}
    t0 = time.perf_counter()
    ids = sorted(fold_of)
    with _parquet_datasource_v1():
        table = _concat_arrow(read_voxels(prep, ids, columns=["voxel_index", "category", *features]))
    frame = _compact_frame(table, features, ids)
    # Ray Data returns blocks in completion order; a fixed row order keeps bootstraps, and so results,
    # identical from run to run.
    order = np.lexsort((table.column("voxel_index").to_numpy(), frame["patient_id"].cat.codes.to_numpy()))
    frame = frame.iloc[order]
    frame = frame.loc[frame["category"] != "other"]
    fold_col = frame["patient_id"].map(fold_of).astype(np.int64).to_numpy()
    frames = {k: frame.loc[fold_col == k].reset_index(drop=True) for k in sorted(set(fold_of.values()))}
    check_disjoint(**{f"fold {k}": df["patient_id"].unique().astype(str) for k, df in frames.items()})
    return FoldData(
        frames=frames,
        features=list(features),
        folds=fold_of,
        read_s=time.perf_counter() - t0,
        n_unassigned=len(on_disk - set(fold_of)),
    )


@contextlib.contextmanager
def _parquet_datasource_v1():
    """Read Parquet with Ray Data's V1 datasource for the duration of the block.

    Ray 2.60's default V2 Parquet reader cost a fixed 20–30 s per read on a loaded 2-core machine (its
    listing stage waits with almost no CPU time), against 4–7 s for V1 on the same 400k rows.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = previous


def _concat_arrow(ds):
    import pyarrow as pa
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        raise DataError("the voxel table holds no rows for the patients of the fold map")
    return pa.concat_tables(tables, promote_options="permissive")


def _compact_frame(table, features: Sequence[str], patient_ids: Sequence[str]) -> pd.DataFrame:
    """Arrow voxel rows → pandas with categoricals and float32 NumPy columns (NaN where null)."""
    category = _categorical(table.column("category"), _CATEGORY_DTYPE)
    if (category.codes < 0).any():
        bad = sorted(set(table.column("category").to_pandas()[category.codes < 0].astype(str)))
        raise DataError(
            f"voxel table has unknown categories {bad[:5]}; expected {list(_CATEGORY_DTYPE.categories)}"
        )
    data: dict[str, Any] = {
        "patient_id": _categorical(table.column("patient_id"), pd.CategoricalDtype(list(patient_ids))),
        "category": category,
    }
    for f in features:
        data[f] = table.column(f).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return pd.DataFrame(data)


def _categorical(column, dtype: pd.CategoricalDtype) -> pd.Categorical:
    """A pyarrow string column as a pandas categorical of `dtype` (code -1 for values outside it)."""
    import pyarrow as pa

    encoded = column.cast(pa.string()).combine_chunks().dictionary_encode()
    lookup = pd.Index(dtype.categories).get_indexer(encoded.dictionary.to_pylist())
    codes = lookup[encoded.indices.to_numpy(zero_copy_only=False)] if len(encoded) else np.empty(0, int)
    return pd.Categorical.from_codes(codes, dtype=dtype)


# --- cross-validation ----------------------------------------------------------------------------


def _run_fold(
    fold: int,
    target: str,
    features: list[str],
    cfg: VoxelModelConfig,
    patients: frozenset[str],
    test: pd.DataFrame,
    *train_parts: pd.DataFrame,
) -> FoldResult:
    """One fold: restrict to the run's patients, check the sides are disjoint, fit and score."""
    cpu0 = time.process_time()
    parts = [_only(p, patients) for p in train_parts]
    train = pd.concat(parts, ignore_index=True) if parts else test.iloc[:0]
    test = _only(test, patients)
    check_disjoint(
        train=train["patient_id"].unique().astype(str), test=test["patient_id"].unique().astype(str)
    )
    if not len(test):
        return _empty_result(
            fold, "no patient of this subgroup in the test fold", features, n_train=len(train)
        )
    result = fit_predict_fold(train, test, features, target, cfg, _fold_seed(cfg.seed, fold), fold=fold)
    result.cpu_s = time.process_time() - cpu0
    return result


def _only(df: pd.DataFrame, patients: frozenset[str]) -> pd.DataFrame:
    keep = df["patient_id"].isin(patients).to_numpy()
    return df if keep.all() else df.loc[keep]


def run_cv(
    prep: str | Path,
    folds: Mapping[str, int],
    cfg: VoxelModelConfig,
    target: str,
    subgroup: str = "all",
    features: list[str] | str | None = None,
    parallel: bool = True,
    data: FoldData | None = None,
    on_fold: Callable[[FoldResult], None] | None = None,
) -> CVResult:
    """Patient-grouped cross-validation of one voxel model.

    Fold k trains on the patients of every other fold and tests on fold k's patients; with a subgroup,
    only its patients take part (the fold map's folds, restricted to them).

    Args:
        prep: prepared dataset folder (voxels/ and patients.parquet).
        folds: patient_id → fold index, e.g. `Split.folds()`.
        cfg: the voxel-model settings.
        target: "nel", "cel" or "any".
        subgroup: "all", "early" or "late" (PFS below / at or above the threshold, see
            `labels.subgroup_patients`; `cfg.subgroup_threshold_months` or the fold map's median PFS).
        features: feature names or a `labels.FEATURE_SETS` name; default `cfg.features`.
        parallel: run the folds as concurrent Ray tasks (`cfg.cpus_per_fold` CPUs each); False runs them
            one after another in this process. Both give the same numbers.
        data: rows already read with `load_fold_data` for the same fold map (reused across a grid).
        on_fold: called with each fold's result as soon as it is done (progress reporting).

    Raises:
        LeakageError: see `load_fold_data`; or a patient on both sides of a fold.
    """
    from ctvlab.data.readers import read_patients

    t_start = time.perf_counter()
    target_spec(target)
    feats = resolve_features(features, cfg.features)
    if data is None:
        data = load_fold_data(prep, folds, feats)
    elif validate_fold_map(folds) != data.folds:
        raise LeakageError("run_cv: `data` was read for another fold map; read it again with load_fold_data")
    missing_cols = [f for f in feats if f not in data.features]
    if missing_cols:
        raise DataError(f"run_cv: `data` was read without the features {missing_cols}")
    patients = read_patients(prep)
    patients = patients.loc[patients["patient_id"].astype(str).isin(data.folds)]
    absent = sorted(set(data.folds) - set(patients["patient_id"].astype(str)))
    if absent:
        raise LeakageError(
            f"patients.parquet lacks {len(absent)} patient(s) of the fold map: {', '.join(absent[:5])}; the "
            "split does not match this prepared dataset"
        )
    chosen, threshold = subgroup_patients(patients, subgroup, cfg.subgroup_threshold_months)
    chosen_set = frozenset(chosen)
    fold_ids = sorted(data.frames)

    t0 = time.perf_counter()
    if parallel:
        import ray

        refs = data.refs()
        task = ray.remote(num_cpus=cfg.cpus_per_fold)(_run_fold)
        pending = {
            task.remote(k, target, feats, cfg, chosen_set, refs[k], *[refs[j] for j in fold_ids if j != k]): k
            for k in fold_ids
        }
        done: dict[int, FoldResult] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(ready[0])
            done[k] = ray.get(ready[0])
            if on_fold:
                on_fold(done[k])
        results = [done[k] for k in fold_ids]
    else:
        results = []
        for k in fold_ids:
            others = [data.frames[j] for j in fold_ids if j != k]
            results.append(_run_fold(k, target, feats, cfg, chosen_set, data.frames[k], *others))
            if on_fold:
                on_fold(results[-1])
    cv_s = time.perf_counter() - t0
    return CVResult(
        target=target,
        subgroup=subgroup,
        model=cfg.model,
        features=feats,
        threshold_months=threshold,
        n_patients=len(chosen),
        folds=list(results),
        parallel=parallel,
        read_s=data.read_s,
        cv_s=cv_s,
        wall_s=time.perf_counter() - t_start,
        n_unassigned=data.n_unassigned,
    )


def run_grid(
    prep: str | Path,
    folds: Mapping[str, int],
    cfg: VoxelModelConfig,
    targets: Sequence[str] = ("nel", "cel"),
    subgroups: Sequence[str] = ("all", "early", "late"),
    features: list[str] | str | None = None,
    parallel: bool = True,
    on_fold: Callable[[str, str, FoldResult], None] | None = None,
) -> dict[tuple[str, str], CVResult]:
    """The study's grid (targets × subgroups) on rows read once; keys are (target, subgroup).

    `on_fold(target, subgroup, fold_result)` is called as each fold finishes."""
    feats = resolve_features(features, cfg.features)
    data = load_fold_data(prep, folds, feats)
    out = {}
    for t in targets:
        for s in subgroups:
            report = (lambda r, t=t, s=s: on_fold(t, s, r)) if on_fold else None
            out[(t, s)] = run_cv(prep, folds, cfg, t, s, feats, parallel=parallel, data=data, on_fold=report)
    return out


@dataclass
class CVResult:
    """Cross-validation of one (model, target, subgroup): per-fold results and their summaries.

    `to_frames()` and `summary()` hold no patient identifiers.
    """

    target: str
    subgroup: str
    model: str
    features: list[str]
    threshold_months: float
    n_patients: int
    folds: list[FoldResult]
    parallel: bool
    read_s: float
    cv_s: float
    wall_s: float
    n_unassigned: int = 0
    _pooled: tuple[np.ndarray, np.ndarray, float] | None = field(default=None, repr=False)

    @property
    def cpu_s(self) -> float:
        """CPU seconds of all folds together (the work, whatever else ran on the machine)."""
        return float(sum(f.cpu_s for f in self.folds))

    @property
    def aucs(self) -> np.ndarray:
        return np.array([f.auc for f in self.folds], float)

    @property
    def auc_mean(self) -> float:
        valid = self.aucs[~np.isnan(self.aucs)]
        return float(valid.mean()) if valid.size else float("nan")

    @property
    def auc_std(self) -> float:
        """Sample standard deviation (ddof = 1) of the valid fold AUCs."""
        valid = self.aucs[~np.isnan(self.aucs)]
        return float(valid.std(ddof=1)) if valid.size > 1 else float("nan")

    def pooled_roc(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(fpr, tpr, auc) over the test predictions of every fold together."""
        if self._pooled is None:
            from sklearn.metrics import roc_auc_score, roc_curve

            y = np.concatenate([f.y_test for f in self.folds])
            s = np.concatenate([f.scores for f in self.folds])
            if y.size and 0 < y.sum() < y.size:
                fpr, tpr, _ = roc_curve(y, s)
                self._pooled = (fpr, tpr, float(roc_auc_score(y, s)))
            else:
                self._pooled = (np.array([0.0, 1.0]), np.array([0.0, 1.0]), float("nan"))
        return self._pooled

    def roc_curves(self) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
        """Per-fold and pooled ROC curves, the input of `ctvlab.ctv.figures.plot_roc_curves`."""
        from sklearn.metrics import roc_curve

        curves = {}
        for f in self.folds:
            if not math.isnan(f.auc):
                fpr, tpr, _ = roc_curve(f.y_test, f.scores)
                curves[f"fold {f.fold}"] = (fpr, tpr, f.auc)
        curves["pooled"] = self.pooled_roc()
        return curves

    def importance_table(self) -> pd.DataFrame:
        """Feature × {impurity, permutation} mean and SD over the folds that were fitted, by permutation."""
        imp = pd.DataFrame([f.impurity for f in self.folds], columns=self.features)
        perm = pd.DataFrame([f.permutation for f in self.folds], columns=self.features)
        table = pd.DataFrame(
            {
                "impurity": imp.mean(),
                "impurity_sd": imp.std(ddof=1),
                "permutation": perm.mean(),
                "permutation_sd": perm.std(ddof=1),
            }
        )
        table.index.name = "feature"
        return table.sort_values("permutation", ascending=False, na_position="last")

    def fold_table(self) -> pd.DataFrame:
        cols = ["fold", "auc", "reason", *_COUNT_FIELDS, "fit_s", "predict_s", "permutation_s", "cpu_s"]
        return pd.DataFrame([{c: getattr(f, c) for c in cols} for f in self.folds], columns=cols)

    def to_frames(self) -> dict[str, pd.DataFrame]:
        """Tables for artifacts: folds (per-fold AUC, counts, timings), importances, roc (pooled curve)."""
        fpr, tpr, _ = self.pooled_roc()
        return {
            "folds": self.fold_table(),
            "importances": self.importance_table().reset_index(),
            "roc": pd.DataFrame({"fpr": fpr, "tpr": tpr}),
        }

    def summary(self) -> dict[str, float]:
        """Flat numeric metrics (MLflow-safe names)."""
        out: dict[str, float] = {
            "auc_mean": self.auc_mean,
            "auc_std": self.auc_std,
            "auc_pooled": self.pooled_roc()[2],
            "n_folds_valid": float(np.sum(~np.isnan(self.aucs))),
            "n_patients": float(self.n_patients),
            "n_voxels_test": float(sum(f.n_test for f in self.folds)),
            "n_positive_test": float(sum(f.test_pos for f in self.folds)),
            "n_negative_test": float(sum(f.test_neg for f in self.folds)),
            "subgroup_threshold_months": self.threshold_months,
            "n_patients_unassigned": float(self.n_unassigned),
            "read_s": self.read_s,
            "cv_s": self.cv_s,
            "wall_s": self.wall_s,
            "fit_s_total": float(sum(f.fit_s for f in self.folds)),
            "cpu_s_total": self.cpu_s,
        }
        for f in self.folds:
            out[f"auc_fold{f.fold}"] = f.auc
        return out

    def params(self) -> dict[str, str]:
        return {
            "target": self.target,
            "subgroup": self.subgroup,
            "model": self.model,
            "features": ",".join(self.features),
            "parallel": str(self.parallel),
        }
