"""The evaluation figures as PNG files, readable without the MLflow UI.

- `plot_metric_boxes`: per-patient metrics per CTV with Wilcoxon significance stars (the study's Fig. 3).
- `plot_contours`: axial slices with the CTV contours over T1c and FLAIR, model red, EORTC green,
  RTOG yellow, the progression white and hatched (Fig. 4).
- `plot_roc_curves`: ROC curves of the voxel-wise models with the chance line (Fig. 1).
- `plot_reliability`: the reliability diagram of the voxel probability, with its expected calibration error.
- `plot_coverage_volume`: the share of the new progression covered against CTV volume, the model (its
  threshold swept) beside the uniform margin (its width swept), with RTOG, EORTC and the coverage CTVs.

Figures are drawn on the Agg canvas directly (no pyplot state, safe in worker threads) and written
atomically. Each has a fixed size in inches, documented per function, so its pixel size is
inches × `dpi`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ctvlab.atomic import atomic_path
from ctvlab.ctv.metrics import METRICS
from ctvlab.statistics import stars
from ctvlab.study import CTV_NAMES

__all__ = [
    "CTV_COLOURS",
    "CTV_LABELS",
    "plot_contours",
    "plot_coverage_volume",
    "plot_metric_boxes",
    "plot_reliability",
    "plot_roc_curves",
    "stars",
]

# Fig. 4's colours: deep-learning CTV red, EORTC green, RTOG yellow.
CTV_COLOURS: dict[str, tuple[float, float, float]] = {
    "model": (1.0, 0.0, 0.0),
    "eortc": (0.0, 0.8, 0.0),
    "rtog": (1.0, 1.0, 0.0),
    "isovolume": (0.2, 0.6, 1.0),  # not in the paper: the uniform margin of the model CTV's volume
}
CTV_LABELS: dict[str, str] = {"model": "Deep learning", "rtog": "RTOG", "eortc": "EORTC",
                              "isovolume": "Uniform margin, same volume"}  # fmt: skip
_TICK_LABELS = {"model": "Deep\nlearning", "isovolume": "Same-volume\nmargin"}
# Box colours of Fig. 3 (yellow boxes are unreadable on white; the hue stays the same).
_BOX_COLOURS: dict[str, str] = {"model": "tab:red", "rtog": "goldenrod", "eortc": "tab:green",
                                "isovolume": "tab:blue"}  # fmt: skip
_METRIC_LABELS: dict[str, str] = {
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "dice": "Dice",
    "hd95_mm": "95% Hausdorff distance (mm)",
    "tversky": "Tversky (α=0.02, β=0.98)",
    "pcc": "PCC",
}

BOX_FIGSIZE = (12.0, 7.5)  # inches: 2 rows × 3 metrics
CONTOUR_PANEL_INCHES = 4.0  # each slice panel is a square of this size
ROC_FIGSIZE = (5.5, 5.5)


def plot_metric_boxes(
    per_patient,
    out: Path,
    pvalues: Mapping[tuple[str, str, str], float] | None = None,
    *,
    dpi: int = 100,
) -> Path:
    """Box plots of the per-patient metrics per CTV (Fig. 3), one panel per metric.

    Args:
        per_patient: pandas DataFrame, wide (columns "patient", "ctv" and one column per metric) or long
            (columns "patient", "ctv", "metric", "value"). CTVs are drawn in the order model, RTOG,
            EORTC (then any others); missing values (NaN) are left out of their box.
        out: PNG path (BOX_FIGSIZE inches × dpi pixels).
        pvalues: {(metric, ctv_a, ctv_b): p} (Holm-adjusted, from `ctvlab.ctv.metrics.ctv_wilcoxon`); each pair gets
            a bracket with its stars.
        dpi: pixels per inch.

    Returns:
        `out`.
    """
    from matplotlib.figure import Figure

    table = _wide_table(per_patient)
    present = list(dict.fromkeys(table["ctv"]))
    ctvs = [c for c in CTV_NAMES if c in present] + [c for c in present if c not in CTV_NAMES]
    fig = Figure(figsize=BOX_FIGSIZE)
    axes = fig.subplots(2, 3).ravel()
    rng = np.random.default_rng(0)  # fixed jitter: the same table gives the same image
    for ax, metric in zip(axes, METRICS, strict=True):
        ax.set_title(_METRIC_LABELS[metric], fontsize=10)
        if metric not in table.columns:
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        data = [table.loc[table["ctv"] == c, metric].dropna().to_numpy(dtype=float) for c in ctvs]
        positions = np.arange(1, len(ctvs) + 1)
        boxes = ax.boxplot(
            [d if d.size else [np.nan] for d in data],
            positions=positions,
            widths=0.55,
            patch_artist=True,
            showfliers=False,
        )
        for patch, c in zip(boxes["boxes"], ctvs, strict=True):
            patch.set_facecolor(_BOX_COLOURS.get(c, "tab:gray"))
            patch.set_alpha(0.35)
        for pos, d, c in zip(positions, data, ctvs, strict=True):
            jitter = rng.uniform(-0.12, 0.12, d.size)
            ax.scatter(pos + jitter, d, s=10, color=_BOX_COLOURS.get(c, "tab:gray"), zorder=3)
        # two lines at most per label: four CTVs side by side in a third of the figure's width
        ax.set_xticks(positions, [_TICK_LABELS.get(c, CTV_LABELS.get(c, c)) for c in ctvs], fontsize=9)
        _draw_significance(ax, metric, ctvs, data, pvalues or {})
    fig.suptitle("CTV evaluation per test patient (Wilcoxon signed-rank: * p<0.05, ** <0.01, *** <0.001)")
    fig.tight_layout()
    return _save(fig, out, dpi)


def plot_contours(
    background: np.ndarray,
    ctvs: Mapping[str, np.ndarray],
    progression: np.ndarray,
    out: Path,
    title: str,
    second_background: np.ndarray | None = None,
    *,
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    lesion: np.ndarray | None = None,
    background_names: tuple[str, str] = ("T1c", "FLAIR"),
    dpi: int = 100,
) -> Path:
    """Axial slices with the CTV contours and the progression (Fig. 4).

    One row per axial slice: through the centre of the progression, and through the centre of the
    pre-RT lesion when `lesion` is given and its centre lies on another slice. One column per
    background (T1c, then FLAIR when `second_background` is given). Contours: model red, EORTC green,
    RTOG yellow; the progression filled white, hatched. Pixels are drawn with the voxel aspect ratio
    sy/sx, x to the right and y (anterior) up.

    Args:
        background, second_background: (X, Y, Z) images (NaN allowed; shown in grey, 1–99% window).
        ctvs: {"model" | "rtog" | "eortc": (X, Y, Z) mask}; any subset.
        progression: (X, Y, Z) mask of the progression (or the composite target) to show.
        out: PNG path; each panel is CONTOUR_PANEL_INCHES square, so the image is
            (rows × 4 in) high and (columns × 4 in) wide at `dpi`.
        title: figure title, e.g. the patient's pseudonym and its metrics.
        spacing: voxel size (sx, sy, sz) in mm.
        lesion: (X, Y, Z) pre-RT lesion, to add its centre slice.

    Returns:
        `out`.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    backgrounds = [np.asarray(background, dtype=float)]
    names = [background_names[0]]
    if second_background is not None:
        backgrounds.append(np.asarray(second_background, dtype=float))
        names.append(background_names[1])
    progression = np.asarray(progression, dtype=bool)
    shape = backgrounds[0].shape
    for name, arr in [("progression", progression), *((f"ctv {k}", v) for k, v in ctvs.items())]:
        if np.shape(arr) != shape:
            raise ValueError(f"plot_contours: {name} has shape {np.shape(arr)}, the background {shape}")

    slices = [_centre_slice(progression, fallback=lesion, n=shape[2])]
    if lesion is not None and np.asarray(lesion).any():
        z_lesion = _centre_slice(np.asarray(lesion, dtype=bool), fallback=None, n=shape[2])
        if z_lesion != slices[0]:
            slices.append(z_lesion)

    nrows, ncols = len(slices), len(backgrounds)
    fig = Figure(figsize=(CONTOUR_PANEL_INCHES * ncols, CONTOUR_PANEL_INCHES * nrows))
    axes = np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))
    aspect = float(spacing[1]) / float(spacing[0])
    windows = [_window(b) for b in backgrounds]
    drawn = [c for c in ("rtog", "eortc", "model") if c in ctvs]  # model last: on top
    for r, z in enumerate(slices):
        for c, (img, name, (lo, hi)) in enumerate(zip(backgrounds, names, windows, strict=True)):
            ax = axes[r, c]
            ax.imshow(img[:, :, z].T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
            ax.set_facecolor("black")
            prog = progression[:, :, z].T.astype(float)
            if prog.max() > 0.0:
                ax.contourf(prog, levels=[0.5, 1.5], colors=["white"], alpha=0.35, hatches=["///"])
                if prog.min() < 1.0:
                    ax.contour(prog, levels=[0.5], colors=["white"], linewidths=1.0)
            for name_ctv in drawn:
                sl = np.asarray(ctvs[name_ctv], dtype=bool)[:, :, z].T.astype(float)
                if sl.max() > 0.0 and sl.min() < 1.0:
                    ax.contour(sl, levels=[0.5], colors=[CTV_COLOURS[name_ctv]], linewidths=1.6)
            ax.set_title(f"{name}, axial slice z = {z}", fontsize=9)
            ax.set_axis_off()
    handles = [Line2D([], [], color=CTV_COLOURS[n], lw=2, label=CTV_LABELS[n]) for n in reversed(drawn)]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="Progression"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.08, wspace=0.05, hspace=0.15)
    return _save(fig, out, dpi)


def plot_roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    out: Path,
    title: str,
    *,
    dpi: int = 100,
) -> Path:
    """ROC curves with their AUC in the legend and the chance diagonal (Fig. 1).

    Args:
        curves: {label: (fpr, tpr, auc)}, e.g. per target and subgroup.
        out: PNG path (ROC_FIGSIZE inches × dpi pixels).
        title: figure title.

    Returns:
        `out`.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=ROC_FIGSIZE)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="Chance (AUC = 0.50)")
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(np.asarray(fpr), np.asarray(tpr), linewidth=1.6, label=f"{label} (AUC = {auc:.2f})")
    if not curves:
        ax.text(0.5, 0.35, "no ROC curves", ha="center", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, out, dpi)


def plot_coverage_volume(
    grid: np.ndarray,
    model: np.ndarray,
    margin: np.ndarray,
    marks: Mapping[str, tuple[float, float]],
    out: Path,
    title: str,
    *,
    dpi: int = 100,
) -> Path:
    """Mean coverage of the new progression against CTV volume over patients (6.4 × 4.4 inches).

    Args:
        grid: volumes (cm³) of the x axis.
        model, margin: (patients, grid) coverages (NaN where a patient's curve does not reach).
        marks: {label: (mean volume cm³, mean coverage)} of fixed CTVs (RTOG, EORTC, cov95, ...).
        out: PNG path.
        title: figure title.
    """
    import warnings

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    with warnings.catch_warnings():  # a grid volume that no patient reaches is an all-NaN column
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, curves, colour in (("model CTV (threshold swept)", model, CTV_COLOURS["model"]),
                                     ("uniform margin (width swept)", margin, CTV_COLOURS["isovolume"])):  # fmt: skip
            mean = np.nanmean(curves, axis=0)
            n = np.sum(np.isfinite(curves), axis=0)
            se = np.nanstd(curves, axis=0) / np.sqrt(np.maximum(n, 1))
            ax.plot(grid, mean, color=colour, linewidth=1.8, label=name)
            ax.fill_between(grid, mean - se, mean + se, color=colour, alpha=0.2, linewidth=0)
    for label, (v, c) in marks.items():
        colour = CTV_COLOURS.get(label.lower(), (0.3, 0.3, 0.3))
        ax.plot([v], [c], marker="o", color=colour, markeredgecolor="k", linestyle="none")
        ax.annotate(label, (v, c), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.set_xlabel("CTV volume (cm³)")
    ax.set_ylabel("share of the new progression covered")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, out, dpi)


def plot_reliability(table, ece: float, out: Path, title: str, *, dpi: int = 100) -> Path:
    """Mean prediction against observed frequency per probability bin, bar width ∝ log voxel count
    (4.8 × 4.4 inches); a calibrated map lies on the diagonal."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="calibrated")
    used = table[table["n"] > 0]
    ax.plot(used["confidence"], used["frequency"], marker="o", color=CTV_COLOURS["model"], label="model")
    for r in used.itertuples():
        ax.annotate(f"{r.n:.0e}".replace("e+0", "e"), (r.confidence, r.frequency), fontsize=6,
                    textcoords="offset points", xytext=(3, 3))  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("share of voxels that are target")
    ax.set_title(f"{title}\nexpected calibration error {ece:.3f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save(fig, out, dpi)


def _wide_table(per_patient):
    missing = {"patient", "ctv"} - set(per_patient.columns)
    if missing:
        raise ValueError(f"per-patient table needs columns 'patient' and 'ctv'; missing {sorted(missing)}")
    if {"metric", "value"} <= set(per_patient.columns):
        wide = per_patient.pivot_table(index=["patient", "ctv"], columns="metric", values="value")
        return wide.reset_index()
    return per_patient


def _draw_significance(ax, metric: str, ctvs: list[str], data: list[np.ndarray], pvalues) -> None:
    pairs = [
        (ctvs.index(a), ctvs.index(b), p)
        for (m, a, b), p in pvalues.items()
        if m == metric and a in ctvs and b in ctvs and stars(p)
    ]
    if not pairs:
        return
    values = np.concatenate([d for d in data if d.size]) if any(d.size for d in data) else np.zeros(1)
    top, span = float(np.max(values)), float(np.ptp(values)) or 1.0
    step = 0.09 * span
    for k, (i, j, p) in enumerate(sorted(pairs, key=lambda t: abs(t[1] - t[0]))):
        y = top + step * (k + 1)
        x0, x1 = sorted((i + 1, j + 1))
        ax.plot([x0, x0, x1, x1], [y - step / 3, y, y, y - step / 3], color="black", linewidth=0.8)
        ax.text((x0 + x1) / 2, y, stars(p), ha="center", va="bottom", fontsize=9)
    ax.set_ylim(top=top + step * (len(pairs) + 1.2))


def _centre_slice(mask: np.ndarray, fallback: np.ndarray | None, n: int) -> int:
    """The axial index (Z) through the centre of mass of `mask`, else of `fallback`, else the middle.

    A mask in several pieces can have its centre between them; the nearest slice that shows the mask
    is taken then.
    """
    for m in (mask, fallback):
        if m is not None and np.asarray(m).any():
            area = np.asarray(m, dtype=bool).sum(axis=(0, 1))
            occupied = np.nonzero(area)[0]
            centre = float(np.average(np.arange(n), weights=area))
            return int(occupied[np.argmin(np.abs(occupied - centre))])
    return n // 2


def _window(img: np.ndarray) -> tuple[float, float]:
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _save(fig, out: Path, dpi: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return out
