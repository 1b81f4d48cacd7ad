"""What the voxel models learn: targets (voxel categories → labels), subgroups and feature sets.

The study trained two random forests (Methods, "Voxel-wise predictions"): NEL progression (NAV→NEL vs
NAV→NAV) and CEL progression (NAV→CEL or NEL→CEL vs NAV→NAV); its Fig. 5a adds a third, CEL plus NEL.
Voxels of the category "other" (lesion that stays lesion, cavity, ventricles) are in no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from ctvlab.data.layout import DIFFUSION_FEATURES, MRSI_FEATURES
from ctvlab.errors import ConfigError, DataError
from ctvlab.study import FEATURES

__all__ = [
    "ANATOMICAL_FEATURES",
    "FEATURE_SETS",
    "PROGRESSED",
    "STABLE",
    "SUBGROUPS",
    "TARGETS",
    "TargetSpec",
    "label_rows",
    "resolve_features",
    "subgroup_patients",
]

STABLE = "NAV->NAV"
PROGRESSED: tuple[str, ...] = ("NAV->NEL", "NAV->CEL", "NEL->CEL")


class TargetSpec(NamedTuple):
    """Voxel categories labelled 1 (positive) and 0 (negative); every other category is left out."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]


TARGETS: dict[str, TargetSpec] = {
    "nel": TargetSpec(("NAV->NEL",), (STABLE,)),
    "cel": TargetSpec(("NAV->CEL", "NEL->CEL"), (STABLE,)),
    "any": TargetSpec(PROGRESSED, (STABLE,)),
}

SUBGROUPS: tuple[str, ...] = ("all", "early", "late")

ANATOMICAL_FEATURES: tuple[str, ...] = ("nT1c", "nT1", "nFLAIR")

# Feature sets chosen by name (the study's 13 features and the ablations used in the science checks).
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "all": FEATURES,
    "anat": ANATOMICAL_FEATURES,
    "anat_diff": ANATOMICAL_FEATURES + DIFFUSION_FEATURES,
    "anat_mrsi": ANATOMICAL_FEATURES + MRSI_FEATURES,
}


def target_spec(target: str) -> TargetSpec:
    try:
        return TARGETS[target]
    except KeyError:
        raise ConfigError(f"unknown voxel-model target {target!r}; choose one of {sorted(TARGETS)}") from None


def label_rows(df: pd.DataFrame, target: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows of `df` that belong to `target`'s two classes, and their labels.

    Args:
        df: voxel rows with a `category` column.
        target: a key of TARGETS.

    Returns:
        (subset of `df` in the original row order, y as int8: 1 = progressed, 0 = stable).
    """
    spec = target_spec(target)
    category = df["category"]  # isin works on strings and categoricals alike, without copying to str
    keep = category.isin(spec.positive + spec.negative).to_numpy()
    subset = df.loc[keep]
    y = subset["category"].isin(spec.positive).to_numpy().astype(np.int8)
    return subset, y


def subgroup_patients(
    patients_df: pd.DataFrame, subgroup: str, threshold_months: float | None = None
) -> tuple[list[str], float]:
    """The patients of a time-to-progression subgroup, and the PFS threshold used.

    The study split at the cohort's median PFS (7.0 months): early = PFS < median, late = PFS ≥ median.
    A patient whose PFS equals the threshold is a late progressor; with 101 patients this gives the
    study's 50 early and 51 late (Results, "Voxel-wise predictions").

    Args:
        patients_df: one row per patient with `patient_id` and `pfs_months`.
        subgroup: "all", "early" or "late".
        threshold_months: split here instead of at the median of `patients_df` (e.g. 7.0 to reuse the
            study's threshold on another cohort).

    Returns:
        (sorted patient ids, threshold in months). For "all" the threshold is still the one an
        early/late split would use, so that it can be logged alongside.

    Raises:
        ConfigError: unknown subgroup.
        DataError: a patient has no PFS (it cannot be placed in a subgroup).
    """
    if subgroup not in SUBGROUPS:
        raise ConfigError(f"unknown subgroup {subgroup!r}; choose one of {list(SUBGROUPS)}")
    pfs = pd.to_numeric(patients_df["pfs_months"], errors="coerce").to_numpy(dtype=float)
    ids = patients_df["patient_id"].astype(str).to_numpy()
    if np.isnan(pfs).any():
        missing = sorted(ids[np.isnan(pfs)])
        raise DataError(
            f"patients without pfs_months cannot be split into early/late progressors: "
            f"{', '.join(missing[:5])}; fill pfs_months in the manifest and run `ctvlab preprocess` again"
        )
    threshold = float(np.median(pfs)) if threshold_months is None else float(threshold_months)
    if subgroup == "early":
        chosen = ids[pfs < threshold]
    elif subgroup == "late":
        chosen = ids[pfs >= threshold]
    else:
        chosen = ids
    return sorted(chosen.tolist()), threshold


def resolve_features(features: Sequence[str] | str | None, default: Sequence[str]) -> list[str]:
    """A feature list from explicit names, a FEATURE_SETS name, or the default; unknown names fail."""
    if features is None:
        chosen = list(default)
    elif isinstance(features, str):
        if features not in FEATURE_SETS:
            raise ConfigError(f"unknown feature set {features!r}; choose one of {sorted(FEATURE_SETS)}")
        chosen = list(FEATURE_SETS[features])
    else:
        chosen = list(features)
    unknown = [f for f in chosen if f not in FEATURES]
    if unknown or not chosen:
        raise ConfigError(
            f"voxel-model features {unknown or chosen} are not voxel-table columns; choose from {list(FEATURES)}"
        )
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"voxel-model features list a column twice: {chosen}")
    return chosen
