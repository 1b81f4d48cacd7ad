"""Tiny geometric cohorts with known answers, for tests.

Every image is an analytic function of world position (mm), evaluated at the voxel centres of its own
grid, so tests know exactly what a correct pipeline must produce: a sphere of known radius, a lesion at a
known place, normal-appearing tissue at a known intensity. Grids differ on purpose (anatomy, anisotropic
diffusion, a 10 mm MRSI box) so that resampling through the affines is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ctvlab.ingest.manifest import ManifestRow, write_manifest

# Intensities of normal-appearing tissue; preprocessing must map each to 1.0 (NAV mode).
NAV_VALUES = {
    "t1c": 400.0, "t1": 500.0, "flair": 300.0, "adc": 0.8e-3, "fa": 0.45,
    "cho": 2.0, "cre": 3.0, "naa": 6.0, "lac": 0.5, "lip": 0.4,
    "cni": 0.0, "ccri": 0.0, "crni": 0.0,
}  # fmt: skip
# Multipliers inside the pre-RT T2 lesion (indices get an additive shift instead).
LESION_FACTORS = {
    "t1c": 1.0, "t1": 0.9, "flair": 1.8, "adc": 1.5, "fa": 0.5,
    "cho": 1.8, "cre": 0.9, "naa": 0.5, "lac": 2.0, "lip": 1.5,
}  # fmt: skip
INDEX_SHIFT = {"cni": 2.5, "ccri": 1.5, "crni": 0.8}


@dataclass
class PhantomSpec:
    """Geometry of one phantom patient, in world millimetres (RAS)."""

    anat_spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    anat_shape: tuple[int, int, int] = (48, 56, 48)
    diff_spacing: tuple[float, float, float] = (2.5, 2.5, 3.0)
    mrsi_spacing: tuple[float, float, float] = (10.0, 10.0, 10.0)
    mrsi_box_voxels: tuple[int, int, int] = (8, 8, 4)
    brain_semi_axes: tuple[float, float, float] = (38.0, 46.0, 36.0)
    lesion_center: tuple[float, float, float] = (12.0, 6.0, 2.0)
    t2l_radius: float = 12.0
    cel_radius: float = 7.0
    cavity_radius: float = 3.0
    prog_center: tuple[float, float, float] = (18.0, 6.0, 2.0)
    prog_t2l_radius: float = 16.0
    prog_cel_radius: float = 6.0
    ventricle_center: tuple[float, float, float] = (-8.0, 0.0, 6.0)
    ventricle_semi_axes: tuple[float, float, float] = (5.0, 10.0, 5.0)
    critical_center: tuple[float, float, float] = (0.0, -10.0, -26.0)
    critical_half: tuple[float, float, float] = (6.0, 6.0, 6.0)
    mrsi: bool = True
    # A trace of noise (0.01% of each value), as every real image has: a noiseless phantom is piecewise
    # constant and identical across patients, which validation rightly refuses (saturated maps,
    # byte-identical images); this little keeps the phantom's values exact to 1e-4 for the maths tests.
    noise: float = 1e-4
    seed: int = 0
    clinical: dict = field(default_factory=dict)


def grid_affine(spacing, shape) -> np.ndarray:
    """Axis-aligned RAS affine whose grid is centred on the world origin."""
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    return aff


def world_coords(affine: np.ndarray, shape) -> np.ndarray:
    """(3, X, Y, Z) world coordinates of voxel centres."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    return xyz.reshape(3, *shape)


def _ball(xyz, center, radius):
    c = np.asarray(center, dtype=float).reshape(3, 1, 1, 1)
    return ((xyz - c) ** 2).sum(0) <= radius**2


def _ellipsoid(xyz, center, semi):
    c = np.asarray(center, dtype=float).reshape(3, 1, 1, 1)
    s = np.asarray(semi, dtype=float).reshape(3, 1, 1, 1)
    return (((xyz - c) / s) ** 2).sum(0) <= 1.0


def _box(xyz, center, half):
    c = np.asarray(center, dtype=float).reshape(3, 1, 1, 1)
    h = np.asarray(half, dtype=float).reshape(3, 1, 1, 1)
    return (np.abs(xyz - c) <= h).all(0)


def regions(spec: PhantomSpec, xyz: np.ndarray) -> dict[str, np.ndarray]:
    """Every mask of the phantom evaluated at world points `xyz` (3, ...)."""
    brain = _ellipsoid(xyz, (0, 0, 0), spec.brain_semi_axes)
    cavity = _ball(xyz, spec.lesion_center, spec.cavity_radius) & brain
    t2l = _ball(xyz, spec.lesion_center, spec.t2l_radius) & brain & ~cavity
    cel = _ball(xyz, spec.lesion_center, spec.cel_radius) & brain & ~cavity
    ventricles = _ellipsoid(xyz, spec.ventricle_center, spec.ventricle_semi_axes) & brain & ~t2l
    critical = _box(xyz, spec.critical_center, spec.critical_half) & brain
    t2l_prog = _ball(xyz, spec.prog_center, spec.prog_t2l_radius) & brain
    cel_prog = _ball(xyz, spec.prog_center, spec.prog_cel_radius) & brain
    return {
        "brain_mask": brain, "cavity_mask": cavity, "t2l_mask": t2l, "cel_mask": cel,
        "ventricles_mask": ventricles, "critical_mask": critical,
        "t2l_progression_mask": t2l_prog, "cel_progression_mask": cel_prog,
    }  # fmt: skip


def image_values(spec: PhantomSpec, name: str, xyz: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensity of image `name` at world points `xyz`: NAV value in normal brain, lesion values in T2L."""
    r = regions(spec, xyz)
    out = np.zeros(xyz.shape[1:], dtype=np.float32)
    base = NAV_VALUES[name]
    out[r["brain_mask"]] = base
    if name in INDEX_SHIFT:
        out[r["t2l_mask"]] = base + INDEX_SHIFT[name]
    else:
        out[r["t2l_mask"]] = base * LESION_FACTORS[name]
        if name == "t1c":
            out[r["cel_mask"]] = base * 2.0
        out[r["cavity_mask"] | r["ventricles_mask"]] = base * 0.3
    if spec.noise:
        out += (rng.normal(0.0, spec.noise, out.shape) * abs(base if base else 1.0)).astype(np.float32) * (
            r["brain_mask"]
        )
    return out


def write_phantom_patient(root: Path, patient_id: str, spec: PhantomSpec | None = None) -> ManifestRow:
    """Write one phantom patient's NIfTI files under root/patient_id and return its manifest row."""
    spec = spec or PhantomSpec()
    rng = np.random.default_rng(spec.seed)
    folder = Path(root) / patient_id
    folder.mkdir(parents=True, exist_ok=True)

    anat_aff = grid_affine(spec.anat_spacing, spec.anat_shape)
    anat_xyz = world_coords(anat_aff, spec.anat_shape)
    extent = np.asarray(spec.anat_shape) * np.asarray(spec.anat_spacing)
    diff_shape = tuple(int(np.ceil(e / s)) for e, s in zip(extent, spec.diff_spacing, strict=True))
    diff_aff = grid_affine(spec.diff_spacing, diff_shape)
    diff_xyz = world_coords(diff_aff, diff_shape)
    mrsi_aff = grid_affine(spec.mrsi_spacing, spec.mrsi_box_voxels)
    mrsi_aff[:3, 3] += np.asarray(spec.lesion_center)
    mrsi_xyz = world_coords(mrsi_aff, spec.mrsi_box_voxels)

    paths: dict[str, str] = {}

    def save(name: str, data: np.ndarray, affine: np.ndarray) -> None:
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, folder / f"{name}.nii.gz")
        paths[name] = f"{patient_id}/{name}.nii.gz"

    for name in ("t1c", "t1", "flair"):
        save(name, image_values(spec, name, anat_xyz, rng), anat_aff)
    for name in ("adc", "fa"):
        save(name, image_values(spec, name, diff_xyz, rng), diff_aff)
    if spec.mrsi:
        for name in ("cho", "cre", "naa", "lac", "lip", "cni", "ccri", "crni"):
            save(name, image_values(spec, name, mrsi_xyz, rng), mrsi_aff)
    for name, mask in regions(spec, anat_xyz).items():
        save(name, mask.astype(np.uint8), anat_aff)

    clinical = {
        "patient_id": patient_id, "cohort": "SOC", "sex": "M", "age": 55, "resection": "STR",
        "progression_type": "both", "pfs_months": 6.0, "os_months": 15.0,
    }  # fmt: skip
    clinical.update(spec.clinical)
    return ManifestRow.model_validate({**clinical, **paths})


def make_phantom_cohort(root: Path, n: int = 4, spec: PhantomSpec | None = None) -> list[ManifestRow]:
    """A cohort folder of `n` phantom patients (cohorts and PFS varied) with its manifest."""
    root = Path(root)
    cohorts = ["SOC", "ATT", "ENZA"]
    rows = []
    for i in range(n):
        base = spec or PhantomSpec()
        s = PhantomSpec(**{**base.__dict__, "seed": base.seed + i})
        s.clinical = {
            "cohort": cohorts[i % 3],
            "pfs_months": 3.0 + 2.0 * i,
            "os_months": 12.0 + 3.0 * i,
            "sex": "MF"[i % 2],
            **base.clinical,
        }
        rows.append(write_phantom_patient(root, f"P{i:03d}", s))
    write_manifest(root, rows)
    return rows
