"""Figures of the voxel models and statistics (PNG, matplotlib's Agg canvas, written atomically).

ROC curves are drawn by `ctvlab.ctv.figures.plot_roc_curves(CVResult.roc_curves(), out, title)`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ctvlab.atomic import atomic_path
from ctvlab.statistics import VOXEL_STAR_LEVELS, stars

__all__ = ["plot_category_boxes", "plot_importances"]

CATEGORY_COLOURS = {
    "NAV->NAV": "#9e9e9e",
    "NAV->NEL": "#4c72b0",
    "NAV->CEL": "#c44e52",
    "NEL->CEL": "#dd8452",
}


def _figure(width_in: float, height_in: float):
    # A Figure with its own Agg canvas: no pyplot state, safe in Ray workers and threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out


def plot_importances(table: pd.DataFrame, out: str | Path, title: str = "Feature importance") -> Path:
    """Horizontal bars of impurity and permutation importance per feature (mean ± SD over folds).

    Args:
        table: `CVResult.importance_table()` (index or column `feature`; columns impurity, permutation and
            optionally impurity_sd, permutation_sd).
        out: PNG path.
    """
    t = table.set_index("feature") if "feature" in table.columns else table
    t = t.sort_values("permutation", ascending=True, na_position="first")
    fig = _figure(9, 0.35 * len(t) + 1.5)
    axes = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(t))
    for ax, col, label in zip(
        axes,
        ("impurity", "permutation"),
        ("impurity (or gain)", "permutation: drop in test AUC"),
        strict=True,
    ):
        err = t[f"{col}_sd"].to_numpy() if f"{col}_sd" in t.columns else None
        ax.barh(y, t[col].to_numpy(), xerr=err, color="#4c72b0", ecolor="#333333", capsize=2)
        ax.set_xlabel(label)
        ax.axvline(0, color="black", lw=0.6)
    axes[0].set_yticks(y, t.index.astype(str))
    fig.suptitle(title)
    return _save(fig, out)


def plot_category_boxes(
    medians: pd.DataFrame,
    out: str | Path,
    tests: pd.DataFrame | None = None,
    test: str = "wilcoxon",
    title: str | None = None,
) -> Path:
    """Box plots of per-patient medians per voxel category, one panel per feature (cf. Supplementary Fig. 1).

    Args:
        medians: `StatsResult.medians` (patient_id, category, feature, median, ...).
        out: PNG path.
        tests: `StatsResult.tests`; stars above each progressed category mark its Holm-adjusted p-value vs
            NAV→NAV (*, **, ***, **** below 0.05, 0.01, 0.001, 0.0001: the study's levels).
        test: which p-value gives the stars: "wilcoxon" or "mannwhitney".
        title: what the medians are of (e.g. one treatment cohort), put before the figure's title.
    """
    from ctvlab.voxel_models.stats import CATEGORY_ORDER

    features = list(dict.fromkeys(medians["feature"]))
    cats = [c for c in CATEGORY_ORDER if c in set(medians["category"])]
    ncols = min(4, max(1, len(features)))
    nrows = max(1, math.ceil(len(features) / ncols))
    fig = _figure(3.2 * ncols, 2.8 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    p_col = f"{test}_p_holm"
    rng = np.random.default_rng(0)
    for ax, f in zip(axes, features, strict=False):
        per = medians.loc[medians["feature"] == f]
        data = [per.loc[per["category"] == c, "median"].to_numpy(float) for c in cats]
        positions = np.arange(1, len(cats) + 1)
        box = ax.boxplot(data, positions=positions, widths=0.6, patch_artist=True, showfliers=False)
        for patch, c in zip(box["boxes"], cats, strict=True):
            patch.set_facecolor(CATEGORY_COLOURS.get(c, "#cccccc"))
        for x, values in zip(positions, data, strict=True):
            jitter = rng.uniform(-0.15, 0.15, size=len(values))
            ax.plot(x + jitter, values, ".", color="black", ms=2, alpha=0.5)
        finite = np.concatenate([v for v in data if v.size]) if any(v.size for v in data) else np.zeros(1)
        lo, hi = float(finite.min()), float(finite.max())
        span = (hi - lo) or 1.0
        ax.set_ylim(lo - 0.05 * span, hi + 0.18 * span)  # headroom for the stars
        if tests is not None and len(tests):
            for x, c in zip(positions, cats, strict=True):
                row = tests.loc[(tests["feature"] == f) & (tests["category"] == c)]
                if len(row):
                    ax.text(
                        x,
                        hi + 0.05 * span,
                        stars(float(row[p_col].iloc[0]), VOXEL_STAR_LEVELS, ns=""),
                        ha="center",
                        va="bottom",
                    )
        ax.set_xticks(positions, [c.replace("->", "→") for c in cats], rotation=30, fontsize=7)
        ax.set_title(f, fontsize=9)
    for ax in axes[len(features) :]:
        ax.set_visible(False)
    head = f"{title}: per-patient" if title else "Per-patient"
    fig.suptitle(f"{head} medians by voxel category (stars: {test} vs NAV→NAV)")
    return _save(fig, out)
