"""Clinical target volumes on the prepared grid: the model CTV and the two standard-of-care baselines.

All arrays are (X, Y, Z) masks on one grid (bool or 0/1); `spacing` is the voxel size (sx, sy, sz) in
millimetres. Every CTV is clipped to the brain and has the critical structures (brainstem, thalamus)
removed, as in the study (Methods, Model evaluation).

- RTOG CTV: (CEL ∪ T2L) expanded by 20 mm.
- EORTC CTV: (residual CEL ∪ resection cavity) expanded by 15 mm; oedema is not part of its GTV.
- Model CTV: the network's thresholded probability united with the pre-RT lesion and made one closed
  shape (Methods: "CTVs require a contiguous closed shape").

Margins are Euclidean distances in world millimetres, computed with a distance transform that knows the
voxel spacing; a voxel-count dilation would give a 60 mm margin along a 3 mm axis where 20 mm were meant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from ctvlab.config import CTVConfig

__all__ = [
    "build_ctvs",
    "clip_ctv",
    "eortc_ctv",
    "eortc_gtv",
    "expand_mm",
    "model_ctv",
    "rtog_ctv",
]


# Masks that build_ctvs needs, by their names in ctvlab.data.layout.MASKS.
_NEEDED_MASKS: tuple[str, ...] = ("cel", "t2l", "cavity", "brain", "critical")

# A voxel whose centre lies exactly at the margin is inside (≤). The distance transform takes a square
# root, so exact distances such as 15 mm on a 3 mm grid can come back a rounding error above the
# margin; this tolerance (far below any voxel size) keeps them in.
_MARGIN_TOLERANCE_MM = 1e-6

# A CTV's pieces are face-connected (6-connectivity): that is what a planning system's slice contours and
# its volume see as one structure; voxels that touch only at an edge or a corner are two contours.
# `model_ctv` fills holes with binary_fill_holes (a face-connected background: the more generous fill);
# `deliverable` counts a hole as the complement of face-connected pieces does, a background region that no
# path of faces, edges or corners leads out of (26-connected).
_CONNECTIVITY_6 = ndimage.generate_binary_structure(3, 1)
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def expand_mm(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """All voxels whose centre lies within `margin_mm` of the mask (Euclidean, world mm; inclusive).

    Uses `scipy.ndimage.distance_transform_edt(~mask, sampling=spacing)`: the distance from each voxel
    centre to the nearest mask voxel centre, in mm, so anisotropic voxels get the same margin in world
    space along every axis. A voxel at exactly `margin_mm` is included (within 1e-6 mm of rounding).
    The transform runs on the mask's bounding box padded by the margin, which gives the same answer as
    the whole grid (every mask voxel lies inside the box) at a fraction of the cost.

    Args:
        mask: (X, Y, Z) bool or 0/1.
        spacing: voxel size (sx, sy, sz) in mm.
        margin_mm: expansion distance in mm (≥ 0; 0 returns the mask itself).

    Returns:
        (X, Y, Z) bool. An empty mask gives an empty result.
    """
    mask = np.asarray(mask, dtype=bool)
    spacing = _check_spacing(spacing, mask.ndim)
    if margin_mm < 0:
        raise ValueError(f"margin_mm must be ≥ 0, got {margin_mm}")
    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    pad = [int(np.floor(margin_mm / s)) + 1 for s in spacing]
    box = tuple(
        slice(max(int(idx.min()) - p, 0), min(int(idx.max()) + p + 1, n))
        for idx, p, n in zip(np.nonzero(mask), pad, mask.shape, strict=True)
    )
    dist = ndimage.distance_transform_edt(~mask[box], sampling=spacing)
    out[box] = dist <= margin_mm + _MARGIN_TOLERANCE_MM
    return out


def clip_ctv(ctv: np.ndarray, brain: np.ndarray, critical: np.ndarray) -> np.ndarray:
    """ctv ∧ brain ∧ ¬critical: the CTV inside the brain, without the critical structures."""
    return np.asarray(ctv, dtype=bool) & np.asarray(brain, dtype=bool) & ~np.asarray(critical, dtype=bool)


def rtog_ctv(
    cel: np.ndarray,
    t2l: np.ndarray,
    brain: np.ndarray,
    critical: np.ndarray,
    spacing: Sequence[float],
    margin_mm: float = 20.0,
) -> np.ndarray:
    """RTOG CTV: (CEL ∪ T2L) expanded by `margin_mm` (2 cm), clipped to the brain, critical removed."""
    gtv = np.asarray(cel, dtype=bool) | np.asarray(t2l, dtype=bool)
    return clip_ctv(expand_mm(gtv, spacing, margin_mm), brain, critical)


def eortc_gtv(cel: np.ndarray, cavity: np.ndarray, t2l: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """The GTV that the EORTC CTV expands, and where it came from.

    Residual CEL ∪ resection cavity; the oedema (the rest of the T2 lesion) is left out. When both are
    empty (a biopsy of a non-enhancing tumour) there is nothing to expand, yet a CTV always contains the
    gross tumour: the GTV then falls back to the T2 lesion, as the ESTRO-EANO guideline does for
    non-enhancing gliomas, and the source says so for the record.

    Returns:
        (gtv, source) with source "cel+cavity", "t2l" (the fallback) or "empty" (no CEL, cavity, or
        T2L given).
    """
    gtv = np.asarray(cel, dtype=bool) | np.asarray(cavity, dtype=bool)
    if gtv.any():
        return gtv, "cel+cavity"
    if t2l is not None and np.asarray(t2l, dtype=bool).any():
        return np.asarray(t2l, dtype=bool).copy(), "t2l"
    return gtv, "empty"


def eortc_ctv(
    cel: np.ndarray,
    cavity: np.ndarray,
    brain: np.ndarray,
    critical: np.ndarray,
    spacing: Sequence[float],
    margin_mm: float = 15.0,
    *,
    t2l: np.ndarray | None = None,
) -> np.ndarray:
    """EORTC CTV: (residual CEL ∪ cavity) expanded by `margin_mm` (1.5 cm), clipped, critical removed.

    With `t2l` given and no CEL and no cavity, the T2 lesion is expanded instead (see `eortc_gtv`);
    without `t2l` such a patient gets an empty CTV.
    """
    gtv, _ = eortc_gtv(cel, cavity, t2l)
    return clip_ctv(expand_mm(gtv, spacing, margin_mm), brain, critical)


def model_ctv(
    prob: np.ndarray,
    threshold: float,
    lesion: np.ndarray,
    brain: np.ndarray,
    critical: np.ndarray,
) -> np.ndarray:
    """The deep-learning CTV: one closed shape around the lesion from the network's probability map.

    Steps (Methods: a CTV contains the gross tumour and is a contiguous closed shape):
    1. (prob ≥ threshold) ∪ lesion, where lesion is the pre-RT CEL ∪ T2L.
    2. Keep the face-connected components that contain a lesion voxel; detached islands of probability
       (also those touching the shape only at an edge or a corner) are dropped. With an empty lesion nothing anchors the shape, so the largest component
       is kept.
    3. Fill enclosed holes (`scipy.ndimage.binary_fill_holes`; the background is 6-connected).
    4. `clip_ctv`: inside the brain, critical structures removed. Removing a critical structure can cut
       the shape in two or open a cavity in it; the pieces are kept as they are, because the carve-out is
       a dose constraint, not a statement that the tissue beyond it will not progress.

    Args:
        prob: (X, Y, Z) float probabilities in [0, 1].
        threshold: probability at or above which a voxel is predicted.
        lesion: (X, Y, Z) pre-RT CEL ∪ T2L.
        brain, critical: (X, Y, Z) masks.

    Returns:
        (X, Y, Z) bool.
    """
    lesion = np.asarray(lesion, dtype=bool)
    full = np.asarray(prob) >= threshold
    full |= lesion
    out = np.zeros(full.shape, dtype=bool)
    if not full.any():
        return out
    # Work on the bounding box plus one background voxel on each side: the same components, and the
    # same holes (whatever leaves the box reaches its background border first), at a fraction of the cost.
    box = tuple(
        slice(max(int(i.min()) - 1, 0), min(int(i.max()) + 2, n))
        for i, n in zip(np.nonzero(full), full.shape, strict=True)
    )
    shape, lesion_box = full[box], lesion[box]
    labels, n = ndimage.label(shape, structure=_CONNECTIVITY_6)
    if n > 1:
        if lesion_box.any():
            keep = np.unique(labels[lesion_box])
        else:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            keep = np.array([int(np.argmax(sizes))])
        lut = np.zeros(n + 1, dtype=bool)
        lut[keep] = True
        lut[0] = False
        shape = lut[labels]
    out[box] = ndimage.binary_fill_holes(shape)
    return clip_ctv(out, brain, critical)


def deliverable(
    ctv: np.ndarray, spacing: Sequence[float], min_mm3: float, allowed: np.ndarray | None = None
) -> np.ndarray:
    """A CTV as it is delivered on its grid: no face-connected piece and no enclosed hole smaller than
    `min_mm3`.

    Resampling a CTV onto a finer grid (the 3 mm CTV onto the T1c grid) or thresholding a resampled
    probability there leaves fragments and pinholes smaller than a voxel of the grid the CTV was made on;
    a planning system would show each as its own contour. Pieces of at least that size (a second lesion's
    CTV, a piece cut off by a critical structure) are kept as they are.

    Args:
        ctv: (X, Y, Z) mask on the delivery grid.
        spacing: that grid's voxel size in mm.
        min_mm3: the smallest piece or hole kept, in mm³ (the volume of one voxel of the grid the CTV was
            made on: 27 mm³ for 3 mm).
        allowed: where the CTV may be (brain without critical structures); a filled hole keeps only those
            voxels. None: anywhere.

    Returns:
        (X, Y, Z) bool; `ctv` itself where nothing is that small.
    """
    ctv = np.asarray(ctv, dtype=bool)
    if not ctv.any():
        return ctv
    voxel = float(np.prod(_check_spacing(spacing, ctv.ndim)))
    smallest = max(1, int(np.ceil(min_mm3 / voxel - 1e-9)))
    labels, n = ndimage.label(ctv, structure=_CONNECTIVITY_6)
    sizes = np.bincount(labels.ravel())
    out = ctv
    if n > 1 or sizes[1:].min() < smallest:
        keep = sizes >= smallest
        keep[0] = False
        if not keep.any():  # nothing that large: the largest piece is the CTV
            keep[int(np.argmax(np.r_[0, sizes[1:]]))] = True
        out = keep[labels]
    background, m = ndimage.label(~out, structure=_CONNECTIVITY_26)
    if m > 1:
        border = np.unique(np.concatenate([background[0].ravel(), background[-1].ravel(), background[:, 0].ravel(),
                                           background[:, -1].ravel(), background[:, :, 0].ravel(),
                                           background[:, :, -1].ravel()]))  # fmt: skip
        hole_sizes = np.bincount(background.ravel(), minlength=m + 1)
        small = hole_sizes < smallest
        small[0] = False
        small[border] = False
        if small.any():
            fill = small[background]
            if allowed is not None:
                fill &= np.asarray(allowed, dtype=bool)
            out = out | fill
    return out


def build_ctvs(
    prob: np.ndarray | None,
    threshold: float,
    masks: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    cfg: CTVConfig,
) -> dict[str, np.ndarray]:
    """The model, RTOG and EORTC CTVs of one patient.

    Args:
        prob: (X, Y, Z) network probability, or None to build only the two baselines.
        threshold: model probability threshold (chosen on the validation split).
        masks: (X, Y, Z) masks named as in `ctvlab.data.layout.MASKS`; needs "cel", "t2l", "cavity",
            "brain" and "critical".
        spacing: voxel size (sx, sy, sz) in mm.
        cfg: margins and the EORTC fallback.

    Returns:
        {"model": ..., "rtog": ..., "eortc": ...} bool (X, Y, Z); "model" only when `prob` is given.

    Raises:
        ValueError: a mask is missing or a shape differs from the others.
    """
    missing = [m for m in _NEEDED_MASKS if m not in masks]
    if missing:
        raise ValueError(f"build_ctvs needs the masks {list(_NEEDED_MASKS)}; missing {missing}")
    m = {name: np.asarray(masks[name], dtype=bool) for name in _NEEDED_MASKS}
    shapes = {name: a.shape for name, a in m.items()}
    if prob is not None:
        shapes["prob"] = np.shape(prob)
    if len(set(shapes.values())) != 1:
        raise ValueError(f"build_ctvs: masks and probability must share one grid, got shapes {shapes}")

    ctvs: dict[str, np.ndarray] = {}
    if prob is not None:
        ctvs["model"] = model_ctv(prob, threshold, m["cel"] | m["t2l"], m["brain"], m["critical"])
    ctvs["rtog"] = rtog_ctv(m["cel"], m["t2l"], m["brain"], m["critical"], spacing, cfg.rtog_margin_mm)
    ctvs["eortc"] = eortc_ctv(
        m["cel"],
        m["cavity"],
        m["brain"],
        m["critical"],
        spacing,
        cfg.eortc_margin_mm,
        t2l=m["t2l"] if cfg.eortc_fallback_t2l else None,
    )
    return ctvs


def isovolume_ctv(
    lesion: np.ndarray,
    brain: np.ndarray,
    critical: np.ndarray,
    spacing: Sequence[float],
    n_voxels: int,
) -> tuple[np.ndarray, float]:
    """A uniform margin around the lesion, clipped like the other CTVs, grown until its volume is the
    nearest it can be to `n_voxels` (the model CTV's): the iso-volume control of PREDICT-GBM.

    The CTV at margin m is brain ∧ ¬critical ∧ (distance to the lesion ≤ m), Euclidean in mm with the
    spacing; its volume steps up at each distinct distance, so the chosen margin is the step whose volume
    is nearest `n_voxels` (the larger on a tie). The result is within one voxel layer of `n_voxels`.

    Returns:
        (the CTV, its margin in mm). An empty lesion or `n_voxels` ≤ 0 gives the clipped lesion, margin 0.
    """
    lesion = np.asarray(lesion, dtype=bool)
    allowed = np.asarray(brain, dtype=bool) & ~np.asarray(critical, dtype=bool)
    if not lesion.any() or n_voxels <= 0:
        return lesion & allowed, 0.0
    dist = ndimage.distance_transform_edt(~lesion, sampling=_check_spacing(spacing, lesion.ndim))
    d = np.sort(dist[allowed])
    if d.size == 0:
        return lesion & allowed, 0.0
    k = min(int(n_voxels), d.size)
    upper = float(d[k - 1])
    margin = upper
    below = d[d < upper - _MARGIN_TOLERANCE_MM]
    if below.size:
        lower = float(below[-1])
        n_upper = int(np.searchsorted(d, upper + _MARGIN_TOLERANCE_MM, side="right"))
        n_lower = int(np.searchsorted(d, lower + _MARGIN_TOLERANCE_MM, side="right"))
        if abs(n_lower - n_voxels) < abs(n_upper - n_voxels):
            margin = lower
    return allowed & (dist <= margin + _MARGIN_TOLERANCE_MM), margin


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(s > 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive voxel sizes in mm, got {tuple(spacing)}")
    return sp
