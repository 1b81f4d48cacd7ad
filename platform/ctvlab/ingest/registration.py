"""Is a modality registered to the T1c? A check by similarity that needs no threshold per contrast.

An image that lies in the T1c's world space only by its header can still be misplaced: a registration
that slipped by a centimetre, or data flipped left-right with the header left as it was (both inside the
field of view, so the placement checks pass). Such an image is more similar to the T1c when moved back
than where it is. So, on a coarse grid over the brain (dilated, so that its edges count), the normalised
mutual information (NMI, scikit-learn's, on binned intensities: it compares contrasts that differ,
T1c with FLAIR or ADC) of the image where it is is compared with the same image shifted by 5 to 15 mm
along each axis and mirrored along its left-right array axis. A correctly registered image is most similar
where it is; when a shifted or mirrored copy is clearly more similar (by `MARGIN`), validation warns.

A warning, not an error: a real lesion or a resection can make a few copies look alike, and ctvlab does
not register images itself. Grids: the T1c (voxel → world RAS mm) and the image's own (any grid that covers
the brain).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID_MM = 4.0  # the coarse grid the similarity is measured on: enough for centimetre misplacements
DILATE_MM = 8.0  # the brain mask grown by this much: the brain's edge is where misplacement shows most
SHIFTS_MM = (5.0, 10.0, 15.0)
BINS = 32  # intensity bins per image for the NMI
# The NMI of the best moved copy must exceed the NMI where the image is by this fraction: a correctly
# registered brain's own copies 5 mm away are clearly less similar (the edges move), noise is not.
MARGIN = 0.03
MIN_POINTS = 500
ASYMMETRIC_SHARE = 0.2  # the share of the region, most left-right asymmetric in the T1c, a flip is judged on


@dataclass(frozen=True)
class Misregistration:
    nmi: float  # where the image is
    best_nmi: float  # the most similar moved copy
    how: str  # "its content lies about 10 mm too far anterior" / "it is mirrored left-right (...)"


def _labels(values: np.ndarray) -> np.ndarray:
    """Equal-width intensity bins between the 1st and 99th percentiles (outliers in the end bins): a
    piecewise constant region stays one bin, as in the joint histograms of registration tools."""
    lo, hi = np.percentile(values, [1, 99])
    if hi <= lo:
        return np.zeros(len(values), dtype=np.int64)
    scaled = (np.clip(values, lo, hi) - lo) / (hi - lo) * BINS
    return np.minimum(scaled.astype(np.int64), BINS - 1)


def _nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of the two samples' binned intensities: scikit-learn's
    `normalized_mutual_info_score` (the arithmetic mean of the two entropies), from a BINS × BINS joint
    histogram. Written out because scikit-learn's general version validates its input and builds a sparse
    contingency table on every call, and the check makes 21 calls per image: this made validation about
    eight times slower (`tests/ingest/test_registration.py` holds both to the same value)."""
    la, lb = _labels(a), _labels(b)
    joint = np.bincount(la * BINS + lb, minlength=BINS * BINS).reshape(BINS, BINS).astype(np.float64)
    n = joint.sum()
    rows, cols = joint.sum(axis=1), joint.sum(axis=0)
    if n == 0 or (np.count_nonzero(rows) == 1 and np.count_nonzero(cols) == 1):
        return 1.0  # neither sample is split: a perfect match, as scikit-learn counts it
    nz = joint > 0
    mi = float(np.sum(joint[nz] / n * (np.log(joint[nz] * n) - np.log(np.outer(rows, cols)[nz]))))
    if mi <= 0:
        return 0.0

    def entropy(counts: np.ndarray) -> float:
        p = counts[counts > 0] / n
        return float(-np.sum(p * np.log(p)))

    return mi / ((entropy(rows) + entropy(cols)) / 2)


def check_registration(
    image: np.ndarray, image_affine: np.ndarray, t1c: np.ndarray, t1c_affine: np.ndarray, brain: np.ndarray
) -> Misregistration | None:
    """A misregistration of `image` (its own grid, RAS affine) to `t1c` (with the `brain` mask on the T1c
    grid), or None when the image is most similar where it is (or there is too little brain to tell)."""
    from scipy import ndimage

    t1c_spacing = np.linalg.norm(t1c_affine[:3, :3], axis=0)
    step = np.maximum(1, np.round(GRID_MM / t1c_spacing)).astype(int)
    grow = np.maximum(1, np.round(DILATE_MM / (t1c_spacing * step))).astype(int)
    coarse = np.asarray(brain, bool)[:: step[0], :: step[1], :: step[2]]
    region = ndimage.binary_dilation(coarse, structure=np.ones(tuple(2 * grow + 1), bool))
    idx = np.argwhere(region) * step
    if len(idx) < MIN_POINTS:
        return None
    t1c = np.nan_to_num(np.asarray(t1c, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    fixed = t1c[tuple(idx.T)]
    world = idx @ t1c_affine[:3, :3].T + t1c_affine[:3, 3]
    inv = np.linalg.inv(image_affine)
    data = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)

    def sample(points: np.ndarray, mirror_axis: int | None = None) -> np.ndarray:
        ijk = points @ inv[:3, :3].T + inv[:3, 3]
        if mirror_axis is not None:
            ijk[:, mirror_axis] = (data.shape[mirror_axis] - 1) - ijk[:, mirror_axis]
        return ndimage.map_coordinates(data, ijk.T, order=1, mode="constant", cval=0.0)

    here = _nmi(fixed, sample(world))
    best_how, best = None, here
    for axis, (ahead, behind) in enumerate(
        (("right", "left"), ("anterior", "posterior"), ("superior", "inferior"))
    ):
        for mm in SHIFTS_MM:
            for sign, direction in ((1, ahead), (-1, behind)):
                shift = np.zeros(3)
                shift[axis] = sign * mm
                # sampled at world + shift, the copy fits when the image's content lies `shift` away
                value = _nmi(fixed, sample(world + shift))
                if value > best:
                    best_how, best = f"its content lies about {mm:g} mm too far {direction}", value
    # Mirrored: a brain is nearly symmetric, so only where the T1c differs from its own mirror image (the
    # lesion, the asymmetries of anatomy) can tell a flipped image from a correct one; compared there.
    lr_axis = int(np.argmax(np.abs(image_affine[0, :3])))  # the array axis closest to left-right
    ijk = world @ inv[:3, :3].T + inv[:3, 3]
    ijk[:, lr_axis] = (data.shape[lr_axis] - 1) - ijk[:, lr_axis]
    mirror_world = ijk @ image_affine[:3, :3].T + image_affine[:3, 3]
    t1c_inv = np.linalg.inv(t1c_affine)
    t1c_mirrored = ndimage.map_coordinates(t1c,
                                           (mirror_world @ t1c_inv[:3, :3].T + t1c_inv[:3, 3]).T, order=1)  # fmt: skip
    asymmetry = np.abs(fixed - t1c_mirrored)
    uneven = asymmetry >= np.quantile(asymmetry, 1 - ASYMMETRIC_SHARE)
    if uneven.sum() >= MIN_POINTS // 5 and asymmetry[uneven].min() > 0:
        moving = sample(world)
        here_uneven = _nmi(fixed[uneven], moving[uneven])
        mirrored = _nmi(fixed[uneven], sample(world, mirror_axis=lr_axis)[uneven])
        if mirrored > here_uneven * (1 + MARGIN) and (
            best_how is None or mirrored / here_uneven > best / here
        ):
            return Misregistration(
                here_uneven, mirrored, "it is mirrored left-right (its data flipped, its header not)"
            )
    if best_how is not None and best > here * (1 + MARGIN):
        return Misregistration(here, best, best_how)
    return None
