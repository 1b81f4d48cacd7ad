"""The reference grid of a patient and resampling onto it.

Every prepared volume lives on one grid per patient: axis-aligned, RAS+ (the affine's rotation part is
diagonal and positive), isotropic `voxel_mm` (3 mm in the study, to absorb residual misalignment between
sequences; the study's Methods: Preprocessing), covering the brain. Sources may have any affine, oblique included:
resampling maps every output voxel centre through `inv(src_affine) @ dst_affine` into the source's voxel
coordinates and interpolates there.

Axis order is (X, Y, Z) throughout; affines map voxel indices (i, j, k, 1) to world millimetres.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "brain_bbox_world",
    "reference_grid",
    "resample",
    "resample_mask",
    "resample_with_coverage",
    "source_coords",
    "voxel_centres",
]

# The U-Net pools three times: every spatial size must be divisible by 2**3.
SHAPE_MULTIPLE = 8


def brain_bbox_world(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (mm) of every corner of every voxel of `mask`.

    A voxel is the cube [i − ½, i + ½] × [j − ½, j + ½] × [k − ½, k + ½] in index space; through an
    oblique affine its corners, not its centre, reach furthest. The extreme of the linear map over all
    corners is the extreme over voxel centres plus ½ Σ|A_d·| per world axis d, which is exact and avoids
    building eight corners per voxel. Along each line of constant (j, k) a linear function is extreme at
    the line's first or last mask voxel, so only those are mapped.

    Args:
        mask: (X, Y, Z) boolean or 0/1 array.
        affine: 4×4 voxel-to-world affine of `mask` (mm).

    Returns:
        (lo, hi): world coordinates (mm) of the box's minimum and maximum corners, each shape (3,).

    Raises:
        ValueError: the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    rows = mask.any(axis=0)
    if not rows.any():
        raise ValueError("mask is empty: no bounding box")
    j, k = np.nonzero(rows)
    first = mask.argmax(axis=0)[j, k]
    last = mask.shape[0] - 1 - mask[::-1].argmax(axis=0)[j, k]
    ijk = np.concatenate([np.stack([first, j, k], 1), np.stack([last, j, k], 1)]).astype(np.float64)
    rot = np.asarray(affine, dtype=float)[:3, :3]
    xyz = ijk @ rot.T + np.asarray(affine, dtype=float)[:3, 3]
    half = 0.5 * np.abs(rot).sum(axis=1)
    return xyz.min(axis=0) - half, xyz.max(axis=0) + half


def reference_grid(
    mask: np.ndarray,
    affine: np.ndarray,
    voxel_mm: float,
    margin_mm: float,
    multiple: int = SHAPE_MULTIPLE,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The RAS+ isotropic output grid over the brain.

    The world box of the brain (`brain_bbox_world`) grows by `margin_mm` on every side; each size in
    voxels is rounded up to a multiple of `multiple`, and the grid is centred on the box, so the extra
    voxels split evenly between both ends.

    Args:
        mask: (X, Y, Z) brain mask on its native grid.
        affine: 4×4 affine of `mask` (mm); may be oblique.
        voxel_mm: output voxel size (mm).
        margin_mm: margin around the brain's box (mm).
        multiple: each output size is a multiple of this.

    Returns:
        (affine, shape): the 4×4 output affine, diag(voxel_mm, voxel_mm, voxel_mm, 1) plus the
        translation of voxel (0, 0, 0)'s centre, and the (X, Y, Z) shape.
    """
    lo, hi = brain_bbox_world(mask, affine)
    lo, hi = lo - margin_mm, hi + margin_mm
    n = np.ceil((hi - lo) / voxel_mm - 1e-9).astype(int)
    n = (np.ceil(n / multiple) * multiple).astype(int)
    centre = (lo + hi) / 2.0
    out = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    out[:3, 3] = centre - (n - 1) / 2.0 * voxel_mm
    return out, (int(n[0]), int(n[1]), int(n[2]))


def voxel_centres(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World coordinates (mm) of every voxel centre, shape (3, X, Y, Z)."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    xyz = np.asarray(affine, dtype=float)[:3, :3] @ ijk + np.asarray(affine, dtype=float)[:3, 3:4]
    return xyz.reshape(3, *shape)


def source_coords(
    src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: tuple[int, int, int]
) -> np.ndarray:
    """(3, N) source voxel coordinates of every destination voxel centre (C order over `dst_shape`).

    The mapping is `inv(src_affine) @ dst_affine`. Maps that share a source grid can share this array.
    """
    m = np.linalg.inv(np.asarray(src_affine, dtype=float)) @ np.asarray(dst_affine, dtype=float)
    axes = [np.arange(n, dtype=np.float64) for n in dst_shape]
    out = np.empty((3, *dst_shape), dtype=np.float64)
    for d in range(3):  # broadcasting three 1-D ramps is cheaper than a (3, 3) @ (3, N) product
        out[d] = (
            m[d, 0] * axes[0][:, None, None]
            + m[d, 1] * axes[1][None, :, None]
            + m[d, 2] * axes[2][None, None, :]
        ) + m[d, 3]
    return out.reshape(3, -1)


def resample(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    order: int = 1,
    coords: np.ndarray | None = None,
) -> np.ndarray:
    """Resample a 3-D array onto another grid; 0 outside the source grid.

    `mode="grid-constant"` treats the source as voxels that end half a voxel beyond the outermost
    centres and are 0 beyond: an edge voxel keeps its value up to its own boundary and fades to 0 over
    the next half voxel, the same whichever grid is finer.

    Args:
        data: (X, Y, Z) source array.
        src_affine, dst_affine: 4×4 affines (mm) of the source and destination grids.
        dst_shape: (X, Y, Z) of the destination.
        order: spline order (1 = trilinear).
        coords: precomputed `source_coords(...)` for this pair of grids (saves time for many maps).

    Returns:
        float32 array of shape `dst_shape`.
    """
    if coords is None:
        coords = source_coords(src_affine, dst_affine, dst_shape)
    out = ndi.map_coordinates(
        np.asarray(data, dtype=np.float32), coords, order=order, mode="grid-constant", cval=0.0
    )
    return out.reshape(dst_shape).astype(np.float32, copy=False)


def resample_mask(
    mask: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    threshold: float = 0.5,
    coords: np.ndarray | None = None,
) -> np.ndarray:
    """Resample a binary mask: trilinear interpolation of 0/1, then `≥ threshold` (boolean output).

    At 0.5 this keeps a shape's volume: an output voxel is inside when at least half of the
    interpolation weight is inside (a sphere of 15 mm from 1×1×2 mm to 3 mm keeps its volume within
    a few percent).
    """
    frac = resample(np.asarray(mask, dtype=np.float32), src_affine, dst_affine, dst_shape, 1, coords)
    return frac >= threshold - 1e-6


def resample_with_coverage(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    threshold: float = 0.5,
    coords: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a map that exists only on its own grid (MRSI): missing stays missing.

    A ones-array (0 where the source value is not finite) resampled the same way gives the coverage:
    the fraction of each output voxel's interpolation weight that falls on acquired source voxels.
    Voxels with coverage below `threshold` are missing (NaN); elsewhere the interpolated value is
    divided by the coverage, so voxels at the box's edge are not pulled toward 0. With threshold ½,
    an axis-aligned box is kept up to its faces (its corners lose a sliver).

    Args:
        data: (X, Y, Z) source map, NaN where not acquired.
        src_affine, dst_affine: 4×4 affines (mm).
        dst_shape: destination (X, Y, Z).
        threshold: minimum coverage for a valid voxel.
        coords: precomputed `source_coords(...)` for this pair of grids.

    Returns:
        (values, valid): float32 values (NaN where missing) and a boolean validity mask.
    """
    data = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(data)
    if coords is None:
        coords = source_coords(src_affine, dst_affine, dst_shape)
    coverage = resample(finite.astype(np.float32), src_affine, dst_affine, dst_shape, 1, coords)
    value = resample(np.where(finite, data, 0.0), src_affine, dst_affine, dst_shape, 1, coords)
    valid = coverage >= threshold - 1e-6
    out = np.full(dst_shape, np.nan, dtype=np.float32)
    out[valid] = value[valid] / coverage[valid]
    return out, valid
