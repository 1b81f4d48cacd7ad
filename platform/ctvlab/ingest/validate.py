"""Cohort validation: the gate before any compute (after nnU-Net's dataset-integrity check).

`validate_cohort` reads `manifest.csv` against its schema, then opens every file of every patient in full
and checks what later stages silently rely on:

- every file named in the manifest exists and decodes completely. A `.nii.gz` is decompressed in one
  pass with `gzip`, which verifies the length and CRC of the stream, so a truncated or corrupted file is
  found here and not halfway through preprocessing (nibabel alone reads lazily and skips the CRC);
- each image is 3-D (a trailing singleton 4th axis is accepted), numeric, with a finite non-singular
  affine and voxel sizes between 0.1 and 20 mm;
- T1, FLAIR and the eight masks lie on the T1c grid (same shape, affine equal within 1e-3), as the study
  co-registered every sequence to the post-contrast T1 (SPEC, Inputs);
- ADC/FA and the MRSI maps keep their own grids, but those grids must lie over this patient's brain in
  world space: the diffusion grid must cover most of the brain, and most MRSI voxel centres must fall
  within the brain's extent (the PRESS box is placed on the lesion, inside the brain);
- masks are binary (only 0 and 1, in any dtype), the brain and T2 lesion masks are not empty, lesion
  masks lie within the brain;
- no NaN or Inf inside the brain in T1c, T1, FLAIR, ADC and FA. ADC and FA are checked on their own grid
  against the brain mask carried there by nearest neighbour through the affines. MRSI maps may hold NaN
  where a voxel had no usable spectrum (no MRSI value there, as outside the PRESS box), but never Inf;
- manifest fields: unique ids, known categories, numbers in range (from `read_manifest`); PFS > OS is a
  warning.

Each patient is checked independently, and within a patient each file, so one bad file never hides the
others. The result is a `ValidationReport`; `print_validation` prints one line per problem.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, Field, computed_field

from ctvlab.config import InputLimits
from ctvlab.ingest.manifest import (
    ANATOMY_COLUMNS,
    DIFFUSION_COLUMNS,
    IMAGE_COLUMNS,
    MANIFEST_NAME,
    MASK_COLUMNS,
    MRSI_COLUMNS,
    PATH_COLUMNS,
    ManifestProblem,
    ManifestRow,
    read_manifest,
)
from ctvlab.ingest.safety import (
    UnsafeInputError,
    check_header,
    nifti_class,
    output_grid_voxels,
    qform_sform_mismatch_mm,
    read_capped,
    resolve_inside,
)

if TYPE_CHECKING:
    from rich.console import Console

Severity = Literal["error", "warning"]
T = TypeVar("T")

AFFINE_TOLERANCE = 1e-3  # mm and mm per voxel; float32 round-off of a stored sform is far smaller
VOXEL_MM_RANGE = (0.1, 20.0)  # plausible voxel edge lengths (mm), from 0.1 mm microscopy-like to 2 cm MRSI
MIN_DIFFUSION_BRAIN_COVERAGE = 0.5  # below: the grid lies elsewhere (error)
WARN_DIFFUSION_BRAIN_COVERAGE = 0.9  # below: part of the brain will have no ADC/FA (warning)
MIN_MRSI_IN_BRAIN = 0.5  # fraction of MRSI voxel centres within the brain's extent
MAX_LESION_OUTSIDE_BRAIN = 0.5  # a lesion mask mostly outside the brain is on the wrong patient or grid
LESION_MASKS = ("cel_mask", "t2l_mask", "cel_progression_mask", "t2l_progression_mask")
PREP_VOXEL_MM = 3.0  # the study's grid (SPEC, Preprocessing): what the output-grid cap is computed on
MAX_SATURATED_FRACTION = 0.5  # more brain voxels than this at the map's maximum: a clipped export
_MAX_POINTS = 200_000  # brain voxels sampled for coverage fractions (plenty for a percentage)

_FIX_REEXPORT = "re-export the file from the source data"
_FIX_RESAMPLE = "resample it onto the T1c grid (every anatomical image and mask must share the T1c grid)"
_FIX_PLACEMENT = (
    "its affine (sform/qform) must map voxels into the T1c's world space: re-export it with the scanner "
    "geometry or re-run the registration to the T1c"
)


# --- report --------------------------------------------------------------------------------------


class Problem(BaseModel):
    """One thing wrong with a cohort, a patient or one of its files."""

    patient_id: str | None
    column: str | None  # manifest column / file role, e.g. "flair"
    path: str | None  # as written in the manifest (relative to the cohort folder)
    message: str  # what is wrong
    fix: str  # how to fix it
    severity: Severity = "error"


class PatientResult(BaseModel):
    """The verdict on one manifest row: valid when none of its problems is an error."""

    patient_id: str
    line: int | None  # 1-based line in manifest.csv
    has_mrsi: bool
    problems: list[Problem]
    # For the cohort-wide checks only (never printed): content digest and resolved path of each file read,
    # and the paths as the manifest wrote them.
    file_digests: dict[str, str] = Field(default_factory=dict, exclude=True)
    resolved_paths: dict[str, str] = Field(default_factory=dict, exclude=True)
    manifest_paths: dict[str, str] = Field(default_factory=dict, exclude=True)

    @computed_field
    @property
    def valid(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)


class ValidationReport(BaseModel):
    """Every patient's verdict plus the problems of the cohort as a whole (e.g. no manifest)."""

    root: str
    patients: list[PatientResult]
    cohort_problems: list[Problem]
    # What preprocessing works from (never printed): the rows that parsed, and every row's id in file order.
    rows: list[ManifestRow] = Field(default_factory=list, exclude=True)
    manifest_ids: list[str] = Field(default_factory=list, exclude=True)

    @computed_field
    @property
    def n_valid(self) -> int:
        return sum(p.valid for p in self.patients)

    @computed_field
    @property
    def n_invalid(self) -> int:
        return len(self.patients) - self.n_valid

    @computed_field
    @property
    def n_warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems())

    @computed_field
    @property
    def ok(self) -> bool:
        """True only when there is no error at all, neither cohort-level nor in any patient."""
        return not any(p.severity == "error" for p in self.problems())

    def valid_ids(self) -> list[str]:
        return [p.patient_id for p in self.patients if p.valid]

    def problems(self) -> list[Problem]:
        return [*self.cohort_problems, *(q for p in self.patients for q in p.problems)]


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


def voxel_sizes_mm(affine: np.ndarray) -> np.ndarray:
    """Edge lengths (mm) of a voxel along its three axes: the column norms of the 3×3 block."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def grid_center_mm(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World position (mm) of the centre of a grid of `shape` (X, Y, Z)."""
    return apply_affine(affine, (np.asarray(shape[:3], dtype=float) - 1.0) / 2.0)


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points (..., 3) through a (4, 4) affine."""
    pts = np.asarray(points, dtype=float)
    return pts @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


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
    vs, vs_ref = voxel_sizes_mm(affine), voxel_sizes_mm(reference)
    if not np.allclose(vs, vs_ref, atol=AFFINE_TOLERANCE):
        parts.append(f"voxel size {_triple(vs)} mm, not {_triple(vs_ref)} mm")
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
        parts.append(f"origin shifted by {_triple(shift)} mm")
    return "; ".join(parts) or "differs by less than the tolerance"


def non_binary_summary(data: np.ndarray) -> tuple[int, list[float]]:
    """Number of voxels that are neither 0 nor 1, and up to three example values."""
    bad = ~((data == 0) | (data == 1))
    n = int(bad.sum())
    if not n:
        return 0, []
    examples = np.unique(data[bad])[:3]
    return n, [float(v) for v in examples]


def _voxels(n: int) -> str:
    return f"{n} voxel{'s' if n != 1 else ''}"


def _triple(v: Iterable[float]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


# --- checks ----------------------------------------------------------------------------------------


class _Problems:
    """Collects the problems of one patient, each tied to a column and its manifest path."""

    def __init__(self, patient_id: str, paths: dict[str, str], limits: InputLimits | None = None):
        self.patient_id = patient_id
        self.paths = paths
        self.limits = limits or InputLimits()
        self.items: list[Problem] = []
        self.digests: dict[str, str] = {}  # column → content digest of the images read
        self.resolved: dict[str, str] = {}  # column → the file its path resolved to

    def add(self, column: str | None, message: str, fix: str, severity: Severity = "error") -> None:
        path = self.paths.get(column) if column else None
        self.items.append(
            Problem(
                patient_id=self.patient_id,
                column=column,
                path=path,
                message=message,
                fix=fix,
                severity=severity,
            )
        )

    def guard(self, column: str, check: Callable[[], T]) -> T | None:
        """Run one file's check; an unexpected exception becomes a problem of that file.

        Validation must report every file of every patient and never end in a traceback, so a bug
        exposed by unusual data is reported like any other problem instead of hiding the rest.
        """
        try:
            return check()
        except Exception as e:
            self.add(
                column,
                f"could not be checked ({type(e).__name__}: {e})",
                "this is a bug in ctvlab's validator: please report it with this file",
            )
            return None


def _load(col: str, root: Path, out: _Problems) -> Volume | None:
    """Read one file and check what every image must satisfy; None when it is unusable."""
    try:
        path = resolve_inside(root, out.paths[col])
    except UnsafeInputError as e:
        out.add(col, str(e), e.fix)
        return None
    out.resolved[col] = str(path)
    try:
        vol = read_volume(path, out.limits)
    except UnreadableFileError as e:
        out.add(col, f"cannot be read: {e}", _FIX_REEXPORT)
        return None
    except MemoryError:
        out.add(col, "cannot be read: too large to load into memory", "check the image dimensions")
        return None
    except OSError as e:
        out.add(col, f"cannot be read: {e.strerror or e}", "check the file's permissions and the disk")
        return None
    if vol.digest and col in IMAGE_COLUMNS:
        out.digests[col] = vol.digest
    data = vol.data
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        out.add(col, f"is {data.ndim}-D with shape {data.shape}; expected a 3-D volume", _FIX_REEXPORT)
        return None
    if data.dtype.kind not in "biuf":
        kind = "RGB colour" if data.dtype.names else str(data.dtype)
        out.add(col, f"holds {kind} values; expected real numbers", "save it as a scalar (float32) image")
        return None
    aff = vol.affine
    if not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        out.add(col, "has a singular or non-finite affine", _FIX_REEXPORT)
        return None
    vs = voxel_sizes_mm(aff)
    lo, hi = VOXEL_MM_RANGE
    if ((vs < lo) | (vs > hi)).any():
        out.add(
            col,
            f"voxel size {_triple(vs)} mm is outside {lo}–{hi} mm",
            "check the header's pixdim and units (millimetres expected)",
        )
        return None
    if vol.placement_mismatch_mm is not None and vol.placement_mismatch_mm > vs.max():
        out.add(
            col,
            f"sform and qform place the image {vol.placement_mismatch_mm:.1f} mm apart (more than a voxel)",
            "re-export it so that both describe the same placement, or clear the wrong one (code 0)",
        )
        return None
    if col == "t1c":
        n = output_grid_voxels(aff, data.shape, PREP_VOXEL_MM)
        if n > out.limits.max_output_voxels:
            out.add(
                col,
                f"field of view {_triple(vs * np.asarray(data.shape[:3]))} mm would make a {n:.3g}-voxel "
                f"{PREP_VOXEL_MM:g} mm grid, over the {out.limits.max_output_voxels:.3g} limit",
                "check the header's dimensions and voxel size, or raise cohort.limits.max_output_voxels",
            )
            return None
    if not vol.oriented:
        out.add(
            col,
            "has no world orientation (sform and qform codes are 0)",
            "set the sform/qform from the source data",
            severity="warning",
        )
    return Volume(data=data, affine=aff, oriented=vol.oriented)


def _on_reference_grid(col: str, vol: Volume, ref: Volume, out: _Problems) -> bool:
    if vol.data.shape != ref.data.shape:
        out.add(col, f"shape {vol.data.shape} differs from the T1c's {ref.data.shape}", _FIX_RESAMPLE)
        return False
    if not np.allclose(vol.affine, ref.affine, atol=AFFINE_TOLERANCE):
        how = describe_affine_difference(vol.affine, ref.affine)
        out.add(col, f"affine differs from the T1c's: {how}", _FIX_RESAMPLE)
        return False
    return True


def _check_finite_in_brain(col: str, data: np.ndarray, brain: np.ndarray, out: _Problems) -> None:
    """NaN/Inf inside the brain is an error; a map constant over the brain is a warning (blank export)."""
    values = data[brain]
    n_bad = int((~np.isfinite(values)).sum()) if values.dtype.kind == "f" else 0
    if n_bad:
        out.add(
            col,
            f"NaN or Inf in {_voxels(n_bad)} inside the brain",
            "fix the map at its source, or the brain mask if those voxels are not brain",
        )
        return
    if values.size and values.min() == values.max():
        out.add(
            col,
            f"is constant ({float(values.min()):g}) inside the brain: no contrast to learn from",
            "check that the right map was exported",
        )
        return
    if values.size:
        at_max = float((values == values.max()).mean())
        if at_max > MAX_SATURATED_FRACTION:
            out.add(
                col,
                f"is saturated: {at_max:.0%} of the brain holds its maximum value ({float(values.max()):g})",
                "re-export the map without clipping its intensity range",
            )


def _check_mask(col: str, data: np.ndarray, out: _Problems) -> np.ndarray | None:
    """Binary check; returns the mask as bool when usable."""
    n_bad, examples = non_binary_summary(data)
    if n_bad:
        shown = ", ".join(f"{v:g}" for v in examples)
        out.add(
            col,
            f"is not binary: {_voxels(n_bad)} neither 0 nor 1 (e.g. {shown})",
            "threshold or relabel it to 0/1 and save it as uint8",
        )
        return None
    return data == 1


def _sample(points: np.ndarray) -> np.ndarray:
    step = max(1, len(points) // _MAX_POINTS)
    return points[::step]


def _check_diffusion_placement(col: str, vol: Volume, brain_mm: np.ndarray, out: _Problems) -> bool:
    """The diffusion grid must cover most of the brain (world points `brain_mm`, (N, 3) mm)."""
    covered = float(inside_grid(brain_mm, vol.affine, vol.data.shape).mean())
    centre = grid_center_mm(vol.affine, vol.data.shape)
    where = f"grid centre {_triple(centre)} mm, brain centre {_triple(brain_mm.mean(axis=0))} mm"
    if covered < MIN_DIFFUSION_BRAIN_COVERAGE:
        out.add(
            col,
            f"grid lies elsewhere in world space: it covers {covered:.0%} of the brain ({where})",
            _FIX_PLACEMENT,
        )
        return False
    if covered < WARN_DIFFUSION_BRAIN_COVERAGE:
        out.add(
            col,
            f"grid covers only {covered:.0%} of the brain; the rest will have no {col.upper()}",
            "check the acquisition's field of view",
            severity="warning",
        )
    return True


def _check_mrsi_placement(col: str, vol: Volume, ref: Volume, extent: np.ndarray, out: _Problems) -> None:
    """Most MRSI voxel centres must fall within the brain's extent (`extent` (2, 3): T1c voxel bounds)."""
    ijk = np.indices(vol.data.shape, dtype=np.float64).reshape(3, -1).T
    in_ref = apply_affine(np.linalg.inv(ref.affine) @ vol.affine, ijk)
    within = ((in_ref >= extent[0] - 0.5) & (in_ref <= extent[1] + 0.5)).all(axis=1)
    frac = float(within.mean())
    if frac < MIN_MRSI_IN_BRAIN:
        centre = grid_center_mm(vol.affine, vol.data.shape)
        brain_centre = apply_affine(ref.affine, extent.mean(axis=0))
        out.add(
            col,
            f"grid lies elsewhere in world space: {frac:.0%} of its voxels fall within the brain's "
            f"extent (grid centre {_triple(centre)} mm, brain centre {_triple(brain_centre)} mm)",
            _FIX_PLACEMENT,
        )


def _check_mrsi_values(col: str, data: np.ndarray, out: _Problems) -> None:
    if data.dtype.kind != "f":
        return
    n_inf = int(np.isinf(data).sum())
    if n_inf:
        out.add(
            col,
            f"Inf in {_voxels(n_inf)} (NaN marks a voxel without a usable spectrum; Inf is never valid)",
            "replace Inf by NaN (no spectrum) or fix the quantification",
        )
    elif np.isnan(data).all():
        out.add(
            col,
            "holds no value at all (every voxel is NaN)",
            "leave all eight MRSI columns empty for a patient without MRSI",
            severity="warning",
        )


# When an empty mask is a problem: column → (severity, applies(clinical fields), how to fix). The brain
# and the pre-RT T2 lesion define every region of the study; a CEL is often absent after gross-total
# resection, and progression masks follow the recorded progression type.
_EMPTY_MASK_RULES: dict[str, tuple[Severity, Callable[[dict], bool], str]] = {
    "brain_mask": (
        "error",
        lambda c: True,
        "give the skull-stripped brain of this patient as 1, background 0",
    ),
    "t2l_mask": ("error", lambda c: True, "every patient needs a pre-RT T2 lesion: check the mask"),
    "cel_mask": (
        "warning",
        lambda c: c.get("resection") in ("STR", "biopsy"),
        "an empty CEL is expected after gross-total resection only: check the mask or the resection field",
    ),
    "cel_progression_mask": (
        "warning",
        lambda c: c.get("progression_type") in ("CEL", "both"),
        "progression_type says CEL progression: check the mask or the progression_type field",
    ),
    "t2l_progression_mask": (
        "warning",
        lambda c: c.get("progression_type") in ("T2L", "both"),
        "progression_type says T2L progression: check the mask or the progression_type field",
    ),
}


def _check_mask_content(
    col: str, mask: np.ndarray, brain: np.ndarray | None, clinical: dict, out: _Problems
) -> None:
    """Emptiness (per `_EMPTY_MASK_RULES`) and, for lesion masks, how much lies outside the brain."""
    n = int(mask.sum())
    if n == 0:
        severity, applies, fix = _EMPTY_MASK_RULES.get(col, ("warning", lambda c: False, ""))
        if applies(clinical):
            out.add(col, "is empty (no voxel is 1)", fix, severity=severity)
        return
    if brain is None or col not in LESION_MASKS:
        return
    outside = int((mask & ~brain).sum())
    if outside:
        frac = outside / n
        out.add(
            col,
            f"{_voxels(outside)} ({frac:.0%}) outside the brain mask",
            "check that the mask belongs to this patient and that the brain mask covers the lesion",
            severity="error" if frac > MAX_LESION_OUTSIDE_BRAIN else "warning",
        )


@dataclass
class _Reference:
    """What the other files are checked against: the T1c grid and the brain on it."""

    t1c: Volume
    brain: np.ndarray | None  # (X, Y, Z) bool on the T1c grid; None when the brain mask is unusable
    brain_mm: np.ndarray  # (N, 3) world positions (mm) of (a sample of) brain voxel centres
    extent: np.ndarray  # (2, 3) first and last brain voxel index along each T1c axis
    _resampled: dict = field(default_factory=dict)

    @classmethod
    def of(cls, t1c: Volume, brain: np.ndarray | None) -> _Reference:
        # Without a usable brain mask the T1c field of view stands in for the brain.
        region = brain if brain is not None else np.ones(t1c.data.shape, dtype=bool)
        idx = np.argwhere(region)
        extent = np.stack([idx.min(axis=0), idx.max(axis=0)]).astype(float)
        return cls(t1c, brain, apply_affine(t1c.affine, _sample(idx)), extent)

    def brain_on(self, vol: Volume) -> np.ndarray:
        """The brain carried onto `vol`'s grid by nearest neighbour, once per grid (ADC and FA share one)."""
        key = (vol.data.shape, vol.affine.round(6).tobytes())
        if key not in self._resampled:
            self._resampled[key] = resample_nearest(self.brain, self.t1c.affine, vol.data.shape, vol.affine)
        return self._resampled[key]


def _load_brain(root: Path, t1c: Volume | None, out: _Problems) -> np.ndarray | None:
    vol = _load("brain_mask", root, out)
    if vol is None or (t1c is not None and not _on_reference_grid("brain_mask", vol, t1c, out)):
        return None
    mask = _check_mask("brain_mask", vol.data, out)
    if mask is None:
        return None
    _check_mask_content("brain_mask", mask, None, {}, out)
    return mask if mask.any() else None


def _check_file(col: str, root: Path, ref: _Reference | None, clinical: dict, out: _Problems) -> None:
    """Load one file (not T1c, not the brain mask) and check it against the reference."""
    vol = _load(col, root, out)
    if vol is None or ref is None:
        return
    if col in ANATOMY_COLUMNS or col in MASK_COLUMNS:
        if not _on_reference_grid(col, vol, ref.t1c, out):
            return
        if col in MASK_COLUMNS:
            mask = _check_mask(col, vol.data, out)
            if mask is not None:
                _check_mask_content(col, mask, ref.brain, clinical, out)
        elif ref.brain is not None:
            _check_finite_in_brain(col, vol.data, ref.brain, out)
    elif col in DIFFUSION_COLUMNS:
        if _check_diffusion_placement(col, vol, ref.brain_mm, out) and ref.brain is not None:
            _check_finite_in_brain(col, vol.data, ref.brain_on(vol), out)
    elif col in MRSI_COLUMNS:
        _check_mrsi_placement(col, vol, ref.t1c, ref.extent, out)
        _check_mrsi_values(col, vol.data, out)


def check_files(
    root: Path,
    patient_id: str,
    paths: dict[str, str],
    clinical: dict | None = None,
    limits: InputLimits | None = None,
    digests: dict[str, str] | None = None,
    resolved: dict[str, str] | None = None,
) -> list[Problem]:
    """Check every file of one patient, each independently of the others.

    Args:
        root: the cohort folder.
        patient_id: for the messages.
        paths: manifest column → path relative to `root`, for the columns that are set.
        clinical: manifest fields read by consistency warnings (`resection`, `progression_type`).
        limits: size caps (default `InputLimits()`).
        digests: filled with column → content digest of each image read (for cohort-wide checks).
        resolved: filled with column → the file each path resolved to (for cohort-wide checks).

    Returns:
        The problems found, in manifest column order (T1c and brain mask first: the others are checked
        against them).
    """
    clinical = clinical or {}
    out = _Problems(patient_id, paths, limits)
    first: dict[str, str] = {}
    for col in IMAGE_COLUMNS:
        if col in paths:
            key = os.path.normpath(paths[col])
            if key in first:
                out.add(col, f"names the same file as {first[key]}", "give each map its own file")
            first.setdefault(key, col)

    t1c = out.guard("t1c", lambda: _load("t1c", root, out)) if "t1c" in paths else None
    brain = out.guard("brain_mask", lambda: _load_brain(root, t1c, out)) if "brain_mask" in paths else None
    ref = _Reference.of(t1c, brain) if t1c is not None else None
    if t1c is not None and brain is not None:
        out.guard("t1c", lambda: _check_finite_in_brain("t1c", t1c.data, brain, out))
    for col in PATH_COLUMNS:
        if col in paths and col not in ("t1c", "brain_mask"):
            out.guard(col, lambda col=col: _check_file(col, root, ref, clinical, out))
    if digests is not None:
        digests.update(out.digests)
    if resolved is not None:
        resolved.update(out.resolved)
    return out.items


def validate_patient(row: ManifestRow, root: Path, limits: InputLimits | None = None) -> PatientResult:
    """Check one parsed manifest row: its clinical consistency and all of its files."""
    return _patient(root, row.patient_id, None, _row_paths(row), row.clinical(), [], limits)


def _row_paths(row: ManifestRow) -> dict[str, str]:
    return {c: getattr(row, c) for c in PATH_COLUMNS if getattr(row, c)}


def _patient(
    root: Path,
    patient_id: str,
    line: int | None,
    paths: dict[str, str],
    clinical: dict,
    problems: list[Problem],
    limits: InputLimits | None = None,
) -> PatientResult:
    problems = list(problems)
    mrsi_set = [c for c in MRSI_COLUMNS if c in paths]
    if mrsi_set and len(mrsi_set) < len(MRSI_COLUMNS):
        empty = [c for c in MRSI_COLUMNS if c not in paths]
        problems.append(
            Problem(
                patient_id=patient_id,
                column=",".join(empty),
                path=MANIFEST_NAME,
                message=f"MRSI columns half set: {', '.join(empty)} empty while {', '.join(mrsi_set)} set",
                fix="give all eight MRSI maps, or leave all eight empty for a patient without MRSI",
            )
        )
    pfs, os_ = clinical.get("pfs_months"), clinical.get("os_months")
    if isinstance(pfs, float) and isinstance(os_, float) and pfs > os_:
        problems.append(
            Problem(
                patient_id=patient_id,
                column="pfs_months",
                path=MANIFEST_NAME,
                severity="warning",
                message=f"pfs_months {pfs:g} exceeds os_months {os_:g}",
                fix="progression cannot come after death: check both fields",
            )
        )
    digests: dict[str, str] = {}
    resolved: dict[str, str] = {}
    problems += check_files(root, patient_id, paths, clinical, limits, digests, resolved)
    return PatientResult(
        patient_id=patient_id, line=line, has_mrsi=len(mrsi_set) == len(MRSI_COLUMNS), problems=problems,
        file_digests=digests, resolved_paths=resolved, manifest_paths=dict(paths),
    )  # fmt: skip


# --- manifest problems -------------------------------------------------------------------------------


def _bounds(column: str) -> tuple[float | None, float | None]:
    info = ManifestRow.model_fields.get(column)
    lo = next((m.ge for m in info.metadata if hasattr(m, "ge")), None) if info else None
    hi = next((m.le for m in info.metadata if hasattr(m, "le")), None) if info else None
    return lo, hi


def _manifest_fix(p: ManifestProblem) -> str:
    where = f"line {p.line} of {MANIFEST_NAME}"
    if p.line is None:
        return (
            "create manifest.csv in the cohort folder: one row per patient (see schemas/manifest.schema.json)"
        )
    if p.line == 1:
        return "correct the header of manifest.csv (see schemas/manifest.schema.json)"
    col = p.column or ""
    if col == "patient_id" and ("duplicate" in p.message or "more than once" in p.message):
        return "give every patient a unique patient_id, or remove the repeated row"
    if col == "patient_id":
        return f"on {where}, use letters, digits, '_', '.' or '-' (at most 64 characters)"
    info = ManifestRow.model_fields.get(col)
    annotation = info.annotation if info else None
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        return f"on {where}, set {col} to one of {', '.join(m.value for m in annotation)}"
    if col in PATH_COLUMNS:
        return f"on {where}, give the {col} file's path relative to the cohort folder"
    lo, hi = _bounds(col)
    if lo is not None and hi is not None:
        return f"on {where}, set {col} to a number from {lo:g} to {hi:g}"
    return f"correct {col or 'the row'} on {where}"


def _from_manifest(p: ManifestProblem, patient_id: str | None = None) -> Problem:
    message = f"{p.column}: {p.message}" if p.column and p.line not in (None, 1) else p.message
    return Problem(
        patient_id=patient_id or p.patient_id,
        column=p.column,
        path=MANIFEST_NAME,
        message=message,
        fix=_manifest_fix(p),
    )


def _cohort_problem(message: str, fix: str, path: str | None = MANIFEST_NAME) -> Problem:
    return Problem(patient_id=None, column=None, path=path, message=message, fix=fix)


def _raw_records(root: Path) -> list[dict[str, str]]:
    with open(root / MANIFEST_NAME, newline="", encoding="utf-8-sig") as fh:
        return [
            {k: (v if isinstance(v, str) else "").strip() for k, v in r.items() if k}
            for r in csv.DictReader(fh)
        ]


# --- cohort ------------------------------------------------------------------------------------------


def validate_cohort(
    root: str | Path,
    progress: bool = True,
    num_workers: int | None = None,
    limits: InputLimits | None = None,
    purpose: str = "study",
) -> ValidationReport:
    """Validate a cohort folder: its manifest, then every patient's files.

    Args:
        root: the cohort folder holding manifest.csv.
        purpose: "study" (everything the study needs) or "predict" (what `ctvlab predict` needs: outcome
            columns and progression masks may be empty; a file that is given is still checked).
        progress: show a progress bar on stderr when it is a terminal.
        num_workers: patients checked in parallel (threads; decompression releases the GIL). Default:
            up to 4, bounded by the CPU count. Output order is the manifest's, whatever the schedule.

    Returns:
        The report; one `PatientResult` per manifest row, in file order. A row whose manifest fields are
        wrong is invalid, but its files are still checked so that every problem shows in one run.
    """
    root = Path(root)
    report = ValidationReport(root=str(root), patients=[], cohort_problems=[])
    if not root.is_dir():
        report.cohort_problems.append(
            _cohort_problem(
                f"{root} is not a folder", "give the cohort folder that holds manifest.csv", path=None
            )
        )
        return report
    try:
        rows, mproblems, ids = read_manifest(root, purpose)
        records = _raw_records(root) if ids else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        report.cohort_problems.append(
            _cohort_problem(f"cannot be read: {e}", "save manifest.csv as UTF-8 CSV with a header row")
        )
        return report
    cohort_level = [p for p in mproblems if p.line in (None, 1)]
    report.cohort_problems.extend(_from_manifest(p) for p in cohort_level)
    if cohort_level:
        return report
    if not ids:
        report.cohort_problems.append(
            _cohort_problem("the manifest lists no patient", "add one row per patient under the header")
        )
        return report

    report.rows, report.manifest_ids = list(rows), list(ids)
    parsed = {r.patient_id: r for r in rows}
    jobs: list[Callable[[], PatientResult]] = []
    for i, pid in enumerate(ids):
        line = i + 2
        label = pid or f"line {line}"  # a row without an id is still reported, by its line
        mp = [_from_manifest(p, label) for p in mproblems if p.line == line]
        row = parsed.get(pid) if not mp else None
        if row is not None:
            clinical, paths = row.clinical(), _row_paths(row)
        else:
            record = records[i] if i < len(records) else {}
            clinical = {k: record.get(k) for k in ("resection", "progression_type")}
            paths = {c: record[c] for c in PATH_COLUMNS if record.get(c)}
        jobs.append(partial(_patient, root, label, line, paths, clinical, mp, limits))

    report.patients.extend(_run(jobs, progress, num_workers))
    _check_shared_files(report.patients)
    return report


def _check_shared_files(patients: list[PatientResult]) -> None:
    """Two patients naming one file, or byte-identical images under two names: a copy-paste error that
    would also put one patient's data on both sides of a split. Both patients are invalid."""
    by_path: dict[str, list[tuple[PatientResult, str]]] = {}
    by_digest: dict[str, list[tuple[PatientResult, str]]] = {}
    for p in patients:
        for col, path in p.resolved_paths.items():
            by_path.setdefault(path, []).append((p, col))
        for col, dg in p.file_digests.items():
            by_digest.setdefault(dg, []).append((p, col))
    for groups, what in ((by_path, "names the same file as"), (by_digest, "is byte-identical to")):
        for owners in groups.values():
            ids = {p.patient_id for p, _ in owners}
            if len(ids) < 2:
                continue  # within one patient: the per-patient check reports a repeated path
            for p, col in owners:
                others = ", ".join(f"{q.patient_id}'s {c}" for q, c in owners if q.patient_id != p.patient_id)
                message = f"{what} {others}"
                if any(x.column == col and x.message == message for x in p.problems):
                    continue
                p.problems.append(
                    Problem(
                        patient_id=p.patient_id,
                        column=col,
                        path=p.manifest_paths.get(col),
                        message=message,
                        fix="give each patient their own images; check the manifest for a copied row or path",
                    )
                )


def _run(
    jobs: list[Callable[[], PatientResult]], progress: bool, num_workers: int | None
) -> list[PatientResult]:
    """Run the patient checks on a small thread pool; results in job order."""
    workers = num_workers or min(4, os.cpu_count() or 1)
    bar = _progress_bar(len(jobs)) if progress else None
    results: list[PatientResult | None] = [None] * len(jobs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(job): i for i, job in enumerate(jobs)}
        try:
            if bar is not None:
                bar[0].start()
            for f in as_completed(futures):
                results[futures[f]] = f.result()
                if bar is not None:
                    bar[0].advance(bar[1])
        finally:
            if bar is not None:
                bar[0].stop()
    return [r for r in results if r is not None]


def _progress_bar(total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return None
    bar = Progress(
        TextColumn("validating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    return bar, bar.add_task("validate", total=total)


# --- printing ----------------------------------------------------------------------------------------


def format_problem(p: Problem) -> str:
    """`patient · file · what is wrong · how to fix`, plain text."""
    who = p.patient_id or "cohort"
    where = p.path or "-"
    if p.column and p.path != MANIFEST_NAME:
        where = f"{where} ({p.column})"
    return f"{who} · {where} · {p.message} · {p.fix}"


def print_validation(report: ValidationReport, console: Console) -> None:
    """One line per problem, then the summary `N valid, M invalid`. Lines never wrap, so grep works."""
    from rich.text import Text

    for p in report.problems():
        style = "bold red" if p.severity == "error" else "yellow"
        console.print(Text.assemble((f"{p.severity:<7} ", style), format_problem(p)), soft_wrap=True)
    summary = f"{report.n_valid} valid, {report.n_invalid} invalid"
    if report.n_warnings:
        summary += f", {report.n_warnings} warning{'s' if report.n_warnings != 1 else ''}"
    if report.cohort_problems:
        n = sum(p.severity == "error" for p in report.cohort_problems)
        summary += f"; {n} cohort-level error{'s' if n != 1 else ''}"
    console.print(Text(summary, style="bold green" if report.ok else "bold red"), soft_wrap=True)
