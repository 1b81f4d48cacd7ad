"""The checks of one patient's files: each file loads, lies on the right grid and in the right place,
holds sane values, and masks are binary and consistent with the manifest. `check_files` runs them all,
each file independently, so one bad file never hides the others.

About 450 lines, kept in one module: every check writes to the same per-patient problem collector against
the same reference grid, and each check's wording (what is wrong, how to fix it) sits beside its test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from nibabel.affines import apply_affine, voxel_sizes

from ctvlab.config import InputLimits
from ctvlab.ingest.manifest import (
    ANATOMY_COLUMNS,
    DIFFUSION_COLUMNS,
    IMAGE_COLUMNS,
    MASK_COLUMNS,
    MRSI_COLUMNS,
    PATH_COLUMNS,
)
from ctvlab.ingest.safety import UnsafeInputError, output_grid_voxels, resolve_inside
from ctvlab.ingest.validation_report import Problem, Severity
from ctvlab.ingest.volume import (
    AFFINE_TOLERANCE,
    UnreadableFileError,
    Volume,
    describe_affine_difference,
    fmt_triple,
    fmt_voxels,
    grid_center_mm,
    inside_grid,
    non_binary_summary,
    read_volume,
    resample_nearest,
)

T = TypeVar("T")

VOXEL_MM_RANGE = (0.1, 20.0)  # plausible voxel edge lengths (mm), from 0.1 mm microscopy-like to 2 cm MRSI
MIN_DIFFUSION_BRAIN_COVERAGE = 0.5  # below: the grid lies elsewhere (error)
WARN_DIFFUSION_BRAIN_COVERAGE = 0.9  # below: part of the brain will have no ADC/FA (warning)
MIN_MRSI_IN_BRAIN = 0.5  # fraction of MRSI voxel centres within the brain's extent
MAX_LESION_OUTSIDE_BRAIN = 0.5  # a lesion mask mostly outside the brain is on the wrong patient or grid
LESION_MASKS = ("cel_mask", "t2l_mask", "cel_progression_mask", "t2l_progression_mask")
# The study's grid (its Methods, Preprocessing): the default for the output-grid cap (`preprocess.voxel_mm`).
PREP_VOXEL_MM = 3.0
MAX_SATURATED_FRACTION = 0.5  # more brain voxels than this at the map's maximum: a clipped export
_MAX_POINTS = 200_000  # brain voxels sampled for coverage fractions (plenty for a percentage)

_FIX_REEXPORT = "re-export the file from the source data"
_FIX_RESAMPLE = "resample it onto the T1c grid (every anatomical image and mask must share the T1c grid)"
_FIX_PLACEMENT = (
    "its affine (sform/qform) must map voxels into the T1c's world space: re-export it with the scanner "
    "geometry or re-run the registration to the T1c"
)


# --- checks ----------------------------------------------------------------------------------------


class _Problems:
    """Collects the problems of one patient, each tied to a column and its manifest path."""

    def __init__(
        self,
        patient_id: str,
        paths: dict[str, str],
        limits: InputLimits | None = None,
        voxel_mm: float = PREP_VOXEL_MM,
    ):
        self.patient_id = patient_id
        self.paths = paths
        self.limits = limits or InputLimits()
        self.voxel_mm = voxel_mm  # the prepared grid's: what the output-grid cap is computed on
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
    vs = voxel_sizes(aff)
    lo, hi = VOXEL_MM_RANGE
    if ((vs < lo) | (vs > hi)).any():
        out.add(
            col,
            f"voxel size {fmt_triple(vs)} mm is outside {lo}–{hi} mm",
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
        n = output_grid_voxels(aff, data.shape, out.voxel_mm)
        if n > out.limits.max_output_voxels:
            out.add(
                col,
                f"field of view {fmt_triple(vs * np.asarray(data.shape[:3]))} mm would make a {n:.3g}-voxel "
                f"{out.voxel_mm:g} mm grid, over the {out.limits.max_output_voxels:.3g} limit",
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
            f"NaN or Inf in {fmt_voxels(n_bad)} inside the brain",
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
            f"is not binary: {fmt_voxels(n_bad)} neither 0 nor 1 (e.g. {shown})",
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
    where = f"grid centre {fmt_triple(centre)} mm, brain centre {fmt_triple(brain_mm.mean(axis=0))} mm"
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


def _check_registration(col: str, vol: Volume, ref: _Reference, out: _Problems) -> None:
    """A warning when the image is more similar to the T1c moved or mirrored than where it is
    (`ctvlab.ingest.registration`): a slipped registration or a left-right flip inside the field of view."""
    from ctvlab.ingest.registration import check_registration

    found = check_registration(vol.data, vol.affine, ref.t1c.data, ref.t1c.affine, ref.brain)
    if found is not None:
        out.add(
            col,
            f"may be misregistered to the T1c: {found.how}; moved back, it matches the T1c better than where "
            f"it is (normalised mutual information {found.best_nmi:.2f} vs {found.nmi:.2f})",
            "check its registration to the T1c (a registration that slipped, or data flipped with the header "
            "left as it was) and re-register or re-export it",
            severity="warning",
        )


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
            f"extent (grid centre {fmt_triple(centre)} mm, brain centre {fmt_triple(brain_centre)} mm)",
            _FIX_PLACEMENT,
        )


def _check_mrsi_values(col: str, data: np.ndarray, out: _Problems) -> None:
    if data.dtype.kind != "f":
        return
    n_inf = int(np.isinf(data).sum())
    if n_inf:
        out.add(
            col,
            f"Inf in {fmt_voxels(n_inf)} (NaN marks a voxel without a usable spectrum; Inf is never valid)",
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
            f"{fmt_voxels(outside)} ({frac:.0%}) outside the brain mask",
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
            _check_registration(col, vol, ref, out)
    elif col in DIFFUSION_COLUMNS:
        if _check_diffusion_placement(col, vol, ref.brain_mm, out) and ref.brain is not None:
            _check_finite_in_brain(col, vol.data, ref.brain_on(vol), out)
            _check_registration(col, vol, ref, out)
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
    voxel_mm: float = PREP_VOXEL_MM,
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
        voxel_mm: the prepared grid's voxel size (`preprocess.voxel_mm`), for the output-grid cap.

    Returns:
        The problems found, in manifest column order (T1c and brain mask first: the others are checked
        against them).
    """
    clinical = clinical or {}
    out = _Problems(patient_id, paths, limits, voxel_mm)
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
