"""Intensity normalisation to normal-appearing brain (the study's Methods: Preprocessing).

The study divides ADC, FA, the anatomical images and the metabolite maps by the mode of their values in
normal-appearing voxels (NAV), so that 1.0 means "like normal brain" in every patient: nADC, nFA, nT1c,
nT1, nFLAIR, nCho, nCre, nNAA, nLac, nLip. The indices CNI, CCrI and CrNI are already z-score-like
(≈ 0 in normal tissue, negative values allowed) and are kept as they are.

The mode is estimated robustly, see `nav_mode`.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

__all__ = ["INDEX_FEATURES", "NAVModeError", "nav_mode", "normalise_to_nav"]

# Kept as they are: indices, not intensities.
INDEX_FEATURES: tuple[str, ...] = ("CNI", "CCrI", "CrNI")

# Robust range of the histogram (percentiles of the NAV values): tails from partial volume with lesion,
# cavity or background would otherwise stretch the bins.
ROBUST_PERCENTILES = (1.0, 99.0)
# The range is widened by this fraction on each side so that a mode at a percentile sits inside it.
RANGE_PAD = 0.05


class NAVModeError(ValueError):
    """The NAV mode cannot be estimated (too few voxels, or a mode that is not positive)."""


def nav_mode(
    values: np.ndarray,
    bins: int = 256,
    smoothing: float = 2.0,
    min_voxels: int = 100,
) -> float:
    """The mode of a map's values in normal-appearing brain.

    1. Keep finite values; clip to the 1st–99th percentile range, widened by 5% on each side.
    2. Histogram with `bins` bins; Gaussian smoothing with σ = `smoothing` bins.
    3. Peak bin, refined by parabolic interpolation through it and its two neighbours.
    4. Polish: the median of the values within ±max(1, smoothing) bin widths of that peak. A tissue
       class of exactly one value (phantoms, quantised maps) then gets its exact value instead of a bin
       centre; for a smooth density the local median differs from the peak by far less than a bin.

    When the robust range is empty (nearly all values equal) the median is the mode.

    Args:
        values: NAV values of one map, any shape (NaN ignored).
        bins: histogram bins.
        smoothing: σ of the Gaussian smoothing, in bins (0: none).
        min_voxels: fewer finite values than this is an error.

    Returns:
        The mode, in the map's units.

    Raises:
        NAVModeError: fewer than `min_voxels` finite values.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size < min_voxels:
        raise NAVModeError(f"only {v.size} normal-appearing voxels with a value (need at least {min_voxels})")
    lo, hi = np.percentile(v, ROBUST_PERCENTILES)
    scale = max(abs(lo), abs(hi), np.finfo(np.float32).tiny)
    if hi - lo <= 1e-6 * scale:
        return float(np.median(v))
    pad = RANGE_PAD * (hi - lo)
    lo, hi = lo - pad, hi + pad
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    width = edges[1] - edges[0]
    smooth = (
        gaussian_filter1d(counts.astype(np.float64), smoothing, mode="constant") if smoothing > 0 else counts
    )
    p = int(np.argmax(smooth))
    peak = edges[p] + width / 2.0
    if 0 < p < bins - 1:
        y0, y1, y2 = smooth[p - 1], smooth[p], smooth[p + 1]
        denom = y0 - 2.0 * y1 + y2
        if denom < 0:
            peak += 0.5 * (y0 - y2) / denom * width
    half = max(1.0, smoothing) * width
    near = v[np.abs(v - peak) <= half]
    return float(np.median(near)) if near.size else float(peak)


def normalise_to_nav(
    image: np.ndarray,
    nav: np.ndarray,
    bins: int = 256,
    smoothing: float = 2.0,
    min_voxels: int = 100,
) -> tuple[np.ndarray, float]:
    """Divide `image` by its NAV mode (`nav_mode` over `image[nav]`).

    Args:
        image: (X, Y, Z) map; NaN where missing (stays NaN).
        nav: (X, Y, Z) boolean NAV mask (for MRSI, already restricted to voxels with MRSI).

    Returns:
        (image / mode as float32, mode).

    Raises:
        NAVModeError: too few NAV voxels with a value, or a mode ≤ 0 (a map that is not an intensity,
            or NAV that is not normal tissue).
    """
    mode = nav_mode(image[nav], bins=bins, smoothing=smoothing, min_voxels=min_voxels)
    if not mode > 0:
        raise NAVModeError(f"the mode in normal-appearing brain is {mode:.4g}, not positive")
    return (image / np.float32(mode)).astype(np.float32), mode
