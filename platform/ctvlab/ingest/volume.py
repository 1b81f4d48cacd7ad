"""Reading a NIfTI file completely and safely, and the affine geometry validation needs.

A file is decoded in full (gzip CRC checked, size caps applied: `ctvlab.ingest.safety`) so a truncated or
corrupt file is found at validation, not halfway through preprocessing. Affine arithmetic comes from
`nibabel.affines`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.affines import apply_affine, voxel_sizes

from ctvlab.config import InputLimits
from ctvlab.ingest.safety import (
    UnsafeInputError,
    check_header,
    nifti_class,
    qform_sform_mismatch_mm,
    read_capped,
)

AFFINE_TOLERANCE = 1e-3  # mm and mm per voxel; float32 round-off of a stored sform is far smaller

# --- reading -------------------------------------------------------------------------------------


class UnreadableFileError(Exception):
    """A file that does not decode to a NIfTI image; the message is the reason, for a user."""


@dataclass
class Volume:
    """A fully loaded image: `data` (X, Y, Z) or as stored, `affine` (4, 4) voxel indices → world mm."""

    data: np.ndarray
    affine: np.ndarray
    oriented: bool  # sform or qform code set: the affine is a real world placement
    placement_mismatch_mm: float | None = None  # sform vs qform, when both are set
    digest: str | None = None  # SHA-256 of the decoded file: the same image under two names is caught


def read_volume(path: Path, limits: InputLimits | None = None) -> Volume:
    """Read a NIfTI-1/2 file (`.nii` or `.nii.gz`) completely, within `limits` (`ctvlab.ingest.safety`).

    A gzip stream is decompressed in bounded steps, which checks its length and CRC and stops a bomb at
    the cap; the header then comes from the decompressed bytes, its announced size and scaling are checked,
    and only then is every voxel read.

    Raises:
        UnreadableFileError: the file is truncated, corrupt, over a limit, not what its name says, or not
            NIfTI.
    """
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    limits = limits or InputLimits()
    try:
        raw = read_capped(path, limits)
    except UnsafeInputError as e:
        raise UnreadableFileError(str(e)) from None
    if not raw:
        raise UnreadableFileError("the file is empty (0 bytes)")
    if len(raw) < 348:
        raise UnreadableFileError(f"too short for a NIfTI header ({len(raw)} bytes)")
    klass = nifti_class(raw)
    if klass is None:
        raise UnreadableFileError("not a NIfTI-1 or NIfTI-2 file (unknown header size)")
    try:
        check_header(klass.header_class.from_fileobj(io.BytesIO(raw)), limits)
        img = klass.from_bytes(raw)
        data = np.asanyarray(img.dataobj)
    except UnsafeInputError as e:
        raise UnreadableFileError(str(e)) from None
    except (ImageFileError, HeaderDataError, OSError, EOFError, ValueError) as e:
        reason = " ".join(str(e).split())
        if "Expected" in reason and "bytes" in reason:
            reason = f"truncated: {reason}"
        raise UnreadableFileError(reason) from None
    oriented = bool(img.header.get_sform(coded=True)[1] or img.header.get_qform(coded=True)[1])
    return Volume(
        data=data, affine=np.asarray(img.affine, dtype=np.float64), oriented=oriented,
        placement_mismatch_mm=qform_sform_mismatch_mm(img.header, data.shape),
        digest=hashlib.sha256(raw).hexdigest(),
    )  # fmt: skip


# --- geometry (pure functions over affines and arrays) ------------------------------------------------


def grid_center_mm(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World position (mm) of the centre of a grid of `shape` (X, Y, Z)."""
    return apply_affine(affine, (np.asarray(shape[:3], dtype=float) - 1.0) / 2.0)


def inside_grid(points_mm: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Which world points (N, 3) mm fall inside a grid's field of view (voxel edges, not centres)."""
    ijk = apply_affine(np.linalg.inv(affine), points_mm)
    return ((ijk >= -0.5) & (ijk <= np.asarray(shape[:3]) - 0.5)).all(axis=1)


def resample_nearest(
    mask: np.ndarray, mask_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray
) -> np.ndarray:
    """A boolean mask (X, Y, Z) carried onto another grid by nearest neighbour through the affines.

    Target voxels whose centre falls outside the mask's grid are False.
    """
    shape = tuple(shape[:3])
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    src = np.rint(apply_affine(np.linalg.inv(mask_affine) @ affine, ijk)).astype(np.int64)
    ok = ((src >= 0) & (src < np.asarray(mask.shape[:3]))).all(axis=1)
    out = np.zeros(len(src), dtype=bool)
    out[ok] = mask[src[ok, 0], src[ok, 1], src[ok, 2]] != 0
    return out.reshape(shape)


def describe_affine_difference(affine: np.ndarray, reference: np.ndarray) -> str:
    """How `affine` differs from `reference`, in words a user can act on (voxel size, axes, origin)."""
    parts = []
    vs, vs_ref = voxel_sizes(affine), voxel_sizes(reference)
    if not np.allclose(vs, vs_ref, atol=AFFINE_TOLERANCE):
        parts.append(f"voxel size {fmt_triple(vs)} mm, not {fmt_triple(vs_ref)} mm")
    rot = affine[:3, :3] / vs
    rot_ref = reference[:3, :3] / vs_ref
    if np.sign(np.linalg.det(rot)) != np.sign(np.linalg.det(rot_ref)):
        parts.append("axes flipped (opposite handedness)")
    else:
        cos = np.clip((np.trace(rot @ rot_ref.T) - 1.0) / 2.0, -1.0, 1.0)
        angle = float(np.degrees(np.arccos(cos)))
        if not np.allclose(rot, rot_ref, atol=AFFINE_TOLERANCE):
            parts.append(f"axes rotated by {angle:.1f}°")
    shift = affine[:3, 3] - reference[:3, 3]
    if not np.allclose(shift, 0.0, atol=AFFINE_TOLERANCE):
        parts.append(f"origin shifted by {fmt_triple(shift)} mm")
    return "; ".join(parts) or "differs by less than the tolerance"


def non_binary_summary(data: np.ndarray) -> tuple[int, list[float]]:
    """Number of voxels that are neither 0 nor 1, and up to three example values."""
    bad = ~((data == 0) | (data == 1))
    n = int(bad.sum())
    if not n:
        return 0, []
    examples = np.unique(data[bad])[:3]
    return n, [float(v) for v in examples]


def fmt_voxels(n: int) -> str:
    """`1 voxel`, `5 voxels`."""
    return f"{n} voxel{'s' if n != 1 else ''}"


def fmt_triple(v: Iterable[float]) -> str:
    """`(1, 1, 1.5)`: a voxel size, a shift or an extent in mm, for messages."""
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
