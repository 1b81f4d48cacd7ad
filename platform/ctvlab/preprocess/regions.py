"""Regions and voxel categories on the prepared grid (the study's Methods: Regions; paper, Methods).

All inputs are boolean (X, Y, Z) arrays on the same grid; distances are Euclidean in world millimetres,
so anisotropic grids are handled through `spacing`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ctvlab.data.layout import CATEGORIES

__all__ = ["categories", "distance_mm", "lesion", "nav", "nel", "ring", "target"]


def nel(t2l: np.ndarray, cel: np.ndarray) -> np.ndarray:
    """Non-enhancing lesion: NEL = T2L − CEL."""
    return t2l & ~cel


def lesion(t2l: np.ndarray, cel: np.ndarray) -> np.ndarray:
    """The visible lesion: T2L ∪ CEL."""
    return t2l | cel


def nav(
    brain: np.ndarray, cavity: np.ndarray, ventricles: np.ndarray, t2l: np.ndarray, cel: np.ndarray
) -> np.ndarray:
    """Normal-appearing voxels: NAV = brain − cavity − ventricles − T2L − CEL."""
    return brain & ~cavity & ~ventricles & ~t2l & ~cel


def distance_mm(region: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Euclidean distance (mm) from every voxel centre to the nearest voxel centre of `region` (0 inside).

    Raises:
        ValueError: `region` is empty (every distance would be infinite).
    """
    if not region.any():
        raise ValueError("region is empty: no distance to it")
    return ndi.distance_transform_edt(~region, sampling=spacing)


def ring(
    brain: np.ndarray, t2l: np.ndarray, spacing: tuple[float, float, float], ring_mm: float
) -> np.ndarray:
    """Brain voxels within `ring_mm` of the pre-RT T2L (the T2L itself included).

    The study analyses voxels within a 4 cm expansion of the pre-RT T2L: no progression happened beyond
    it, and it bounds the class imbalance (the study's Methods: Regions).
    """
    return brain & (distance_mm(t2l, spacing) <= ring_mm)


def target(
    t2l: np.ndarray, cel: np.ndarray, t2l_prog: np.ndarray, cel_prog: np.ndarray, brain: np.ndarray
) -> np.ndarray:
    """The U-Net target: (NEL ∪ CEL pre-RT) ∪ (NEL ∪ CEL at progression), within the brain.

    NEL ∪ CEL = T2L ∪ CEL at each time point (the study's Methods: Deep learning CTV, "the composite lesion").
    """
    return (t2l | cel | t2l_prog | cel_prog) & brain


def categories(
    ring_mask: np.ndarray,
    nav_mask: np.ndarray,
    nel_mask: np.ndarray,
    t2l_prog: np.ndarray,
    cel_prog: np.ndarray,
) -> np.ndarray:
    """Voxel category codes between the pre-RT and the progression scans (`layout.CATEGORY_CODES`).

    Inside the ring:
      - NAV→NAV: NAV before, neither T2L nor CEL at progression (stable);
      - NAV→NEL: NAV before, in T2L − CEL at progression;
      - NAV→CEL: NAV before, in CEL at progression;
      - NEL→CEL: NEL before, CEL at progression;
      - other: anything else (lesion that stays lesion, cavity, ventricles, CEL before).
    Outside the ring: 0 ("outside").

    Returns:
        uint8 (X, Y, Z) codes.
    """
    out = np.zeros(ring_mask.shape, dtype=np.uint8)
    out[ring_mask] = CATEGORIES["other"]
    prog_nel = t2l_prog & ~cel_prog
    stable = ~t2l_prog & ~cel_prog
    for name, where in (
        ("NAV->NAV", nav_mask & stable),
        ("NAV->NEL", nav_mask & prog_nel),
        ("NAV->CEL", nav_mask & cel_prog),
        ("NEL->CEL", nel_mask & cel_prog),
    ):
        out[ring_mask & where] = CATEGORIES[name]
    return out
