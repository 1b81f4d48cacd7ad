"""The evaluation figures: readable PNGs of the documented size, with the overlays actually drawn."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from ctvlab.ctv.figures import (
    BOX_FIGSIZE,
    CONTOUR_PANEL_INCHES,
    ROC_FIGSIZE,
    plot_contours,
    plot_metric_boxes,
    plot_roc_curves,
    stars,
)
from ctvlab.ctv.metrics import METRICS


def _pixels(inches: tuple[float, float], dpi: int) -> tuple[int, int]:
    """(height, width) in pixels of a figure of (width, height) inches."""
    return round(inches[1] * dpi), round(inches[0] * dpi)


def _read(path):
    assert path.exists() and path.stat().st_size > 0
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]  # written atomically
    return imread(path)


def _per_patient(long: bool) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        for ctv, shift in (("model", 0.1), ("rtog", 0.0), ("eortc", -0.1)):
            values = {m: float(np.clip(0.7 + shift + rng.normal(0, 0.05), 0, 1)) for m in METRICS}
            values["hd95_mm"] = 10.0 + 20 * rng.random() if i else math.nan  # one missing HD95
            rows.append({"patient": f"p{i}", "ctv": ctv, **values})
    wide = pd.DataFrame(rows)
    if not long:
        return wide
    return wide.melt(id_vars=["patient", "ctv"], var_name="metric", value_name="value")


@pytest.mark.parametrize("long", [False, True])
def test_metric_boxes_png_has_the_documented_size(tmp_path, long):
    pvalues = {
        ("pcc", "model", "eortc"): 0.0001,
        ("pcc", "model", "rtog"): 0.2,
        ("dice", "model", "rtog"): 0.004,
    }
    out = plot_metric_boxes(_per_patient(long), tmp_path / "fig3.png", pvalues, dpi=50)
    assert out == tmp_path / "fig3.png"
    img = _read(out)
    assert img.shape[:2] == _pixels(BOX_FIGSIZE, 50)


def test_metric_boxes_refuses_a_table_without_patient_and_ctv(tmp_path):
    with pytest.raises(ValueError, match="patient"):
        plot_metric_boxes(pd.DataFrame({"dice": [0.5]}), tmp_path / "x.png")


@pytest.mark.parametrize(
    ("p", "mark"), [(0.0005, "***"), (0.005, "**"), (0.03, "*"), (0.05, "ns"), (math.nan, "")]
)
def test_stars_follow_the_study_levels(p, mark):
    assert stars(p) == mark


SHAPE = (30, 34, 24)


def _scene():
    idx = np.indices(SHAPE)

    def ball(c, r):
        return sum((idx[i] - c[i]) ** 2 for i in range(3)) <= r * r

    brain = ball((15, 17, 12), 13)
    t1c = np.where(brain, 0.5 + 0.1 * np.sin(idx[0] / 3.0), 0.0)
    flair = np.where(brain, 0.6 + 0.1 * np.cos(idx[1] / 3.0), 0.0)
    lesion = ball((12, 17, 9), 3)
    progression = ball((15, 17, 14), 4)
    ctvs = {
        "model": ball((14, 17, 12), 7),
        "eortc": ball((12, 17, 10), 5),
        "rtog": ball((12, 17, 10), 9) & brain,
    }
    return t1c, flair, lesion, progression, ctvs


def _red_pixels(img: np.ndarray) -> int:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return int(np.count_nonzero((r > 0.8) & (g < 0.25) & (b < 0.25)))


def test_contours_draw_the_model_ctv_in_red(tmp_path):
    t1c, flair, lesion, progression, ctvs = _scene()
    with_model = _read(
        plot_contours(
            t1c, ctvs, progression, tmp_path / "with.png", "p1", flair, spacing=(3.0, 3.0, 3.0), lesion=lesion
        )
    )
    without = {k: v for k, v in ctvs.items() if k != "model"}
    without_model = _read(
        plot_contours(
            t1c,
            without,
            progression,
            tmp_path / "without.png",
            "p1",
            flair,
            spacing=(3.0, 3.0, 3.0),
            lesion=lesion,
        )
    )
    assert _red_pixels(with_model) > 50
    assert _red_pixels(without_model) == 0
    # Two slices (progression centre z=14, lesion centre z=9) × two backgrounds, 4-inch panels at 100 dpi.
    assert with_model.shape[:2] == (2 * CONTOUR_PANEL_INCHES * 100, 2 * CONTOUR_PANEL_INCHES * 100)


def test_contours_with_one_background_and_no_lesion_have_one_panel(tmp_path):
    t1c, _, _, progression, ctvs = _scene()
    img = _read(
        plot_contours(t1c, ctvs, progression, tmp_path / "one.png", "p1", spacing=(1.0, 2.0, 3.0), dpi=60)
    )
    assert img.shape[:2] == (CONTOUR_PANEL_INCHES * 60, CONTOUR_PANEL_INCHES * 60)


def test_contours_refuse_masks_on_another_grid(tmp_path):
    t1c, _, _, progression, _ = _scene()
    with pytest.raises(ValueError, match="model"):
        plot_contours(t1c, {"model": np.zeros((3, 3, 3), bool)}, progression, tmp_path / "x.png", "p1")


def test_roc_png_has_the_documented_size(tmp_path):
    fpr = np.linspace(0, 1, 50)
    curves = {"CEL, all": (fpr, np.sqrt(fpr), 0.67), "NEL, early": (fpr, fpr**0.3, 0.77)}
    img = _read(plot_roc_curves(curves, tmp_path / "roc.png", "Voxel-wise random forest", dpi=80))
    assert img.shape[:2] == _pixels(ROC_FIGSIZE, 80)
