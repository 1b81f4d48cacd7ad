"""Voxel-wise progression models with patient-grouped cross-validation (Methods, "Voxel-wise predictions").

A fold trains on the voxels of four folds' patients and tests on the fifth fold's patients, so no
patient's voxels are on both sides (the study's patient-wise split). `ctvlab.voxel_models.fold` is the
pure core (one fold, no Ray); `ctvlab.voxel_models.folddata` reads the voxel table through Ray Data;
`run_cv` runs the folds as Ray tasks (or one after another) and collects a `CVResult`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctvlab.config import VoxelModelConfig
from ctvlab.errors import DataError, LeakageError
from ctvlab.splits import check_disjoint
from ctvlab.voxel_models.fold import COUNT_FIELDS, FoldResult, empty_result, fit_predict_fold, fold_seed
from ctvlab.voxel_models.folddata import FoldData, load_fold_data, validate_fold_map
from ctvlab.voxel_models.labels import (
    resolve_features,
    subgroup_patients,
    target_spec,
)

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
        return empty_result(
            fold, "no patient of this subgroup in the test fold", features, n_train=len(train)
        )
    result = fit_predict_fold(train, test, features, target, cfg, fold_seed(cfg.seed, fold), fold=fold)
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


def missing_policy_check(
    prep: str | Path,
    folds: Mapping[str, int],
    cfg: VoxelModelConfig,
    targets: Sequence[str],
    done: Mapping[tuple[str, str], CVResult] | None = None,
    parallel: bool = True,
    on_fold: Callable[[str, str, FoldResult], None] | None = None,
) -> pd.DataFrame:
    """The random forest's missing-MRSI policies side by side (all patients, each target): AUC with every
    feature and with the anatomical ones only, under `impute_nav` (every voxel) and `covered_only` (voxels
    with MRSI; its anatomical model is fitted on those same voxels). `gain` = AUC(all) − AUC(anatomical):
    on a `--null` cohort, whose diffusion and MRSI carry nothing, a policy that adds signal of its own (e.g.
    "MRSI is missing here" encoding position) shows a gain above zero.

    `done`: results already computed with `cfg` (all features, subgroup "all"), reused instead of rerun.
    """
    from ctvlab.voxel_models.labels import FEATURE_SETS

    feats = list(cfg.features)
    anat = [f for f in FEATURE_SETS["anat"] if f in feats]
    data = load_fold_data(prep, folds, feats)
    rows = []
    for t in targets:
        for policy in ("impute_nav", "covered_only"):
            pcfg = cfg.model_copy(update={"rf_missing": policy})
            auc: dict[str, CVResult] = {}
            for name, fs in (("all", feats), ("anat", anat)):
                reuse = done.get((t, "all")) if done and policy == cfg.rf_missing and name == "all" else None
                report = (lambda r, t=t: on_fold(t, "all", r)) if on_fold and reuse is None else None
                auc[name] = reuse or run_cv(prep, folds, pcfg, t, "all", fs, parallel=parallel, data=data,
                                            on_fold=report)  # fmt: skip
            rows.append({
                "target": t, "policy": policy, "chosen": policy == cfg.rf_missing,
                "auc_all": auc["all"].auc_mean, "auc_all_std": auc["all"].auc_std,
                "auc_anat": auc["anat"].auc_mean, "auc_anat_std": auc["anat"].auc_std,
                "gain": auc["all"].auc_mean - auc["anat"].auc_mean,
                "auc_distance": auc["all"].auc_distance,
                "n_voxels_test": int(sum(f.n_test for f in auc["all"].folds)),
            })  # fmt: skip
    return pd.DataFrame(rows)


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
    _intervals: tuple[Any, Any] | None = field(default=None, repr=False)

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
    def auc_distance(self) -> float:
        """Mean over the valid folds of the distance-to-T2L baseline's AUC on the same test rows."""
        d = np.array([f.auc_distance for f in self.folds], float)
        d = d[~np.isnan(d)]
        return float(d.mean()) if d.size else float("nan")

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
        cols = ["fold", "auc", "auc_distance", "reason", *COUNT_FIELDS, "fit_s", "predict_s", "permutation_s",
                "cpu_s"]  # fmt: skip
        return pd.DataFrame([{c: getattr(f, c) for c in cols} for f in self.folds], columns=cols)

    def to_frames(self) -> dict[str, pd.DataFrame]:
        """Tables for artifacts: folds (per-fold AUC, counts, timings), importances, roc (pooled curve)."""
        fpr, tpr, _ = self.pooled_roc()
        return {
            "folds": self.fold_table(),
            "importances": self.importance_table().reset_index(),
            "roc": pd.DataFrame({"fpr": fpr, "tpr": tpr}),
        }

    def auc_intervals(self, n_boot: int = 1000, seed: int = 0):
        """The pooled AUC and the mean per-patient AUC over every fold's test voxels, each with a
        patient-level bootstrap 95% interval (`ctvlab.statistics.auc_with_patient_ci`); None without
        patient ids or resamples. Computed once per result."""
        from ctvlab.statistics import auc_with_patient_ci

        if self._intervals is None and n_boot > 0:
            folds = [f for f in self.folds if f.test_patients is not None and len(f.y_test)]
            if folds and all(f.test_patients[0] is not None for f in folds):
                self._intervals = auc_with_patient_ci(
                    np.concatenate([f.y_test for f in folds]), np.concatenate([f.scores for f in folds]),
                    np.concatenate([f.test_patients for f in folds]).astype(str), n_boot=n_boot, seed=seed,
                )  # fmt: skip
        return self._intervals

    def summary(self) -> dict[str, float]:
        """Flat numeric metrics (MLflow-safe names)."""
        out: dict[str, float] = {
            "auc_mean": self.auc_mean,
            "auc_std": self.auc_std,
            "auc_pooled": self.pooled_roc()[2],
            "auc_distance": self.auc_distance,
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
        if self._intervals is not None:
            pooled, per_patient = self._intervals
            out.update({"auc_pooled_ci_low": pooled.low, "auc_pooled_ci_high": pooled.high,
                        "auc_per_patient": per_patient.estimate, "auc_per_patient_ci_low": per_patient.low,
                        "auc_per_patient_ci_high": per_patient.high})  # fmt: skip
        return out

    def params(self) -> dict[str, str]:
        return {
            "target": self.target,
            "subgroup": self.subgroup,
            "model": self.model,
            "features": ",".join(self.features),
            "parallel": str(self.parallel),
        }
