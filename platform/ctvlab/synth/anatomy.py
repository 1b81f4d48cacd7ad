"""Patient anatomy: the MNI152 template that nilearn ships, placed in a scanner by a rigid transform.

Every field of a synthetic patient (tissue maps, tumour density, masks) lives in template space (MNI
millimetres). A patient's head sits in the scanner's world frame at `world = pose @ mni` (a random
rigid transform), and each image has its own voxel grid (`affine`: voxel -> world mm, possibly oblique).
An image is made by mapping its voxel centres back to template space and interpolating the fields
there, so that every file is consistent with every other through its affine alone.

Sources: the T1 template, grey- and white-matter probability maps of the ICBM152 2009 symmetric template
shipped inside nilearn (`nilearn.datasets.load_mni152_template`, `..._gm_template`, `..._wm_template`),
read directly from nilearn's package data so that no download and no heavy import happens. The brain
mask is what a skull-stripping tool returns: the parenchyma (grey + white matter ≥ 0.5) with the
ventricles, closed over 2 mm and with its holes filled, so that the CSF outside the brain is left out
(`load_mni152_brain_mask`'s T1 > 0.2 keeps it). CSF is brain minus grey and white matter; the ventricles
are its large connected components near the midline. No atlas with the brainstem or thalamus ships with
nilearn offline (Harvard-Oxford and AAL are downloads), so the critical structures are drawn as
ellipsoids at their MNI coordinates and clipped to tissue.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
BRAIN_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask threshold on the [0, 1] T1 template

# Critical structures as ellipsoids (centre, semi-axes), MNI mm. Centres from the usual MNI coordinates
# of the thalamus (±12, -18, 7) and of the midbrain, pons and medulla along the brainstem axis; the
# semi-axes give roughly 6 cm³ per thalamus and 20 cm³ of brainstem once clipped to tissue.
CRITICAL_ELLIPSOIDS: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((-12.0, -18.0, 7.0), (9.0, 15.0, 10.0)),  # left thalamus
    ((12.0, -18.0, 7.0), (9.0, 15.0, 10.0)),  # right thalamus
    ((0.0, -26.0, -12.0), (13.0, 12.0, 9.0)),  # midbrain
    ((0.0, -28.0, -30.0), (15.0, 14.0, 12.0)),  # pons
    ((0.0, -40.0, -48.0), (9.0, 9.0, 12.0)),  # medulla
)
# The lateral and third ventricles lie in this MNI box; CSF components outside it are sulci/cisterns.
VENTRICLE_BOX = ((-35.0, 35.0), (-50.0, 35.0), (-20.0, 40.0))
VENTRICLE_MIN_CM3 = 0.3


@dataclass(frozen=True)
class Template:
    """The template's fields on its 1 mm grid (X, Y, Z), cropped to the brain with a small margin.

    `t1` is the T1 template scaled to [0, 1]; `gm`, `wm`, `csf` are tissue fractions in [0, 1];
    `brain`, `ventricles`, `critical` are 0/1 float32 (so that interpolation gives partial volumes).
    `affine` maps voxel indices to MNI mm.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    ventricles: np.ndarray
    critical: np.ndarray
    affine: np.ndarray
    box_lo: np.ndarray
    box_hi: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.t1.shape  # type: ignore[return-value]

    def brain_box_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower corner, upper corner) of the brain's bounding box in MNI mm."""
        return self.box_lo.copy(), self.box_hi.copy()


def nilearn_data_dir() -> Path:
    """The folder inside the installed nilearn package that holds the MNI152 files."""
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load and derive the template fields once per process (about 2 s)."""
    import nibabel as nib

    folder = nilearn_data_dir()
    imgs = {k: nib.load(folder / f) for k, f in TEMPLATE_FILES.items()}
    affine = imgs["t1"].affine.astype(np.float64)
    t1 = np.asarray(imgs["t1"].dataobj, dtype=np.float32)
    t1 /= t1.max()
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32)
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32)
    # nilearn stores the probability maps as 0..255
    for a in (gm, wm):
        if a.max() > 1.5:
            a /= 255.0
    head = t1 > BRAIN_THRESHOLD

    # crop to the head with a 4-voxel margin: a third of the memory and of the interpolation cost
    idx = np.argwhere(head)
    lo = np.maximum(idx.min(0) - 4, 0)
    hi = np.minimum(idx.max(0) + 5, head.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    t1, gm, wm, head = t1[sl], gm[sl], wm[sl], head[sl]
    affine = affine.copy()
    affine[:3, 3] = apply_affine(affine, lo)
    brain = parenchymal_mask(gm, wm, head)

    gm = np.where(brain, gm, 0.0).astype(np.float32)
    wm = np.where(brain, wm, 0.0).astype(np.float32)
    csf = np.where(brain, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    xyz = voxel_world(affine, brain.shape)
    ventricles = ventricle_mask(csf, xyz, voxel_cm3=abs(np.linalg.det(affine[:3, :3])) / 1000.0)
    critical = critical_mask(xyz) & brain & ((gm + wm) >= 0.5)
    f32 = np.float32
    idx = np.argwhere(brain)
    return Template(
        t1=t1.astype(f32),
        gm=gm,
        wm=wm,
        csf=csf,
        brain=brain.astype(f32),
        ventricles=ventricles.astype(f32),
        critical=critical.astype(f32),
        affine=affine,
        box_lo=apply_affine(affine, idx.min(0)),
        box_hi=apply_affine(affine, idx.max(0)),
    )


def parenchymal_mask(gm: np.ndarray, wm: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Grey and white matter (≥ 0.5) closed over 2 mm, holes (the ventricles) filled, within `head`."""
    tissue = (gm + wm) >= 0.5
    closed = ndi.binary_closing(tissue, structure=ndi.generate_binary_structure(3, 1), iterations=2)
    return ndi.binary_fill_holes(closed) & head


@functools.lru_cache(maxsize=1)
def brain_depth_mm() -> np.ndarray:
    """Depth below the brain's surface (mm, 0 outside) on the template grid."""
    tpl = load_template()
    spacing = np.abs(np.diag(tpl.affine)[:3])
    return ndi.distance_transform_edt(tpl.brain >= 0.5, sampling=spacing).astype(np.float32)


def ventricle_mask(csf: np.ndarray, xyz: np.ndarray, voxel_cm3: float) -> np.ndarray:
    """Large CSF components inside VENTRICLE_BOX: the lateral and third ventricles.

    Args:
        csf: CSF fraction (X, Y, Z).
        xyz: (3, X, Y, Z) MNI coordinates of the voxels, mm.
        voxel_cm3: volume of one voxel.
    """
    box = np.ones(csf.shape, dtype=bool)
    for axis, (lo, hi) in enumerate(VENTRICLE_BOX):
        box &= (xyz[axis] > lo) & (xyz[axis] < hi)
    cand = (csf > 0.5) & box
    labels, n = ndi.label(cand)
    if n == 0:
        return cand
    sizes = ndi.sum_labels(cand, labels, index=np.arange(1, n + 1)) * voxel_cm3
    keep = np.flatnonzero(sizes >= VENTRICLE_MIN_CM3) + 1
    return np.isin(labels, keep)


def critical_mask(xyz: np.ndarray) -> np.ndarray:
    """Union of the brainstem and thalamus ellipsoids at world points `xyz` (3, ...) in MNI mm."""
    out = np.zeros(xyz.shape[1:], dtype=bool)
    for centre, semi in CRITICAL_ELLIPSOIDS:
        c = np.asarray(centre).reshape((3,) + (1,) * (xyz.ndim - 1))
        s = np.asarray(semi).reshape((3,) + (1,) * (xyz.ndim - 1))
        out |= (((xyz - c) / s) ** 2).sum(0) <= 1.0
    return out


# --- geometry ------------------------------------------------------------------------------------


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points (..., 3)."""
    p = np.asarray(points, dtype=np.float64)
    return p @ affine[:3, :3].T + affine[:3, 3]


def voxel_world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(3, X, Y, Z) world coordinates (mm) of the voxel centres of a grid."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)


def rotation_matrix(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation by `angle_rad` about unit vector `axis` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation about a uniformly random axis by an angle uniform in [0, max_deg] degrees."""
    axis = rng.normal(size=3)
    angle = np.deg2rad(rng.uniform(0.0, max_deg)) if max_deg > 0 else 0.0
    return rotation_matrix(axis, angle)


def rigid(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = translation
    return out


def grid_affine(
    centre: np.ndarray, rotation: np.ndarray, spacing: tuple[float, float, float], shape: tuple[int, int, int]
) -> np.ndarray:
    """Voxel -> world affine of a grid with the given orientation whose centre lies at `centre` (mm)."""
    lin = rotation @ np.diag(np.asarray(spacing, dtype=np.float64))
    origin = np.asarray(centre, dtype=np.float64) - lin @ ((np.asarray(shape) - 1) / 2.0)
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = origin
    return out


def covering_shape(extent_mm: np.ndarray, rotation: np.ndarray, spacing: tuple[float, float, float]) -> tuple:
    """Voxels per axis of a grid (orientation `rotation`) that covers an axis-aligned box of `extent_mm`."""
    # the box's extent seen along the grid's axes: |R^T| @ extent bounds it for any rotation
    extent_grid = np.abs(rotation.T) @ np.asarray(extent_mm, dtype=np.float64)
    return tuple(int(np.ceil(e / s)) + 1 for e, s in zip(extent_grid, spacing, strict=True))


def sample(
    field: np.ndarray,
    field_affine: np.ndarray,
    grid_affine: np.ndarray,
    shape: tuple[int, int, int],
    pose: np.ndarray | None = None,
    order: int = 1,
) -> np.ndarray:
    """Interpolate a template-space field at the voxel centres of a patient grid.

    Args:
        field: (X, Y, Z) values on the grid `field_affine` (voxel -> MNI mm).
        grid_affine: voxel -> world mm of the output grid.
        shape: output grid shape.
        pose: MNI -> world rigid transform of the patient (identity when None).
        order: spline order (1: trilinear).

    Returns:
        float32 (shape), 0 outside the field's grid.
    """
    world_to_mni = np.linalg.inv(pose) if pose is not None else np.eye(4)
    m = np.linalg.inv(field_affine) @ world_to_mni @ grid_affine
    return ndi.affine_transform(
        field, m[:3, :3], offset=m[:3, 3], output_shape=tuple(shape), order=order, mode="constant",
        cval=0.0, output=np.float32, prefilter=False,
    )  # fmt: skip


def sample_points(
    field: np.ndarray, field_affine: np.ndarray, points_mni: np.ndarray, order: int = 1
) -> np.ndarray:
    """Interpolate a template-space field at MNI points (3, N); 0 outside its grid."""
    ijk = apply_affine(np.linalg.inv(field_affine), points_mni.T).T
    return ndi.map_coordinates(field, ijk, order=order, mode="constant", cval=0.0, output=np.float32)


@dataclass(frozen=True)
class GrowthGrid:
    """Template fields on the coarse, axis-aligned grid of the tumour simulation (MNI space).

    `gm`, `wm`, `csf` are tissue fractions (anti-aliased from 1 mm), `brain` and `critical` fractions;
    `affine` maps voxel indices to MNI mm; `spacing` is the isotropic voxel size in mm. The distance maps
    (mm) are patient-independent, so they are computed once: `depth_mm` from the brain's surface (inside),
    `critical_mm` from the critical structures, `ventricles_mm` from the ventricles.
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    ventricles: np.ndarray
    critical: np.ndarray
    affine: np.ndarray
    spacing: float
    depth_mm: np.ndarray
    critical_mm: np.ndarray
    ventricles_mm: np.ndarray
    tract_axes: np.ndarray | None = None  # (3, X, Y, Z): squared components of the tract direction
    tract_coherence: np.ndarray | None = None  # 0..1: how clearly the white matter runs one way


TRACT_SMOOTHING_MM = 4.0  # integration scale of the structure tensor


def tract_orientation(wm: np.ndarray, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Where white matter runs, from the structure tensor of its probability map (no tractography atlas
    ships offline): along a tract the map changes least, so the eigenvector of the smallest eigenvalue is
    the tract's direction. Returns (the squares of its three components, (3, ...); the coherence
    (λ₂ − λ₁)/(λ₂ + λ₁): 1 for a clear tube, 0 where no direction stands out)."""
    grads = np.gradient(wm.astype(np.float64), spacing_mm)
    sigma = TRACT_SMOOTHING_MM / spacing_mm
    tensor = np.empty((*wm.shape, 3, 3))
    for i in range(3):
        for j in range(i, 3):
            tensor[..., i, j] = tensor[..., j, i] = ndi.gaussian_filter(grads[i] * grads[j], sigma)
    values, vectors = np.linalg.eigh(tensor)  # ascending eigenvalues
    along = vectors[..., :, 0]
    coherence = (values[..., 1] - values[..., 0]) / np.maximum(values[..., 1] + values[..., 0], 1e-12)
    axes = np.moveaxis(along**2, -1, 0).astype(np.float32)
    return axes, np.clip(coherence, 0.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=2)
def growth_grid(spacing_mm: float) -> GrowthGrid:
    """The template resampled to the simulation grid (cached per spacing)."""
    tpl = load_template()
    lo, hi = tpl.brain_box_mm()
    shape = tuple(int(np.ceil((b - a) / spacing_mm)) + 3 for a, b in zip(lo, hi, strict=True))
    aff = np.diag([spacing_mm] * 3 + [1.0])
    aff[:3, 3] = lo - spacing_mm
    # anti-alias: a Gaussian whose FWHM is about the target voxel turns 1 mm maps into fractions
    sigma = max(spacing_mm / 2.355, 0.5)

    def res(a: np.ndarray) -> np.ndarray:
        return np.clip(sample(ndi.gaussian_filter(a, sigma), tpl.affine, aff, shape), 0.0, 1.0)

    brain, critical, ventricles = res(tpl.brain), res(tpl.critical), res(tpl.ventricles)

    def edt(region: np.ndarray) -> np.ndarray:
        return ndi.distance_transform_edt(region, sampling=spacing_mm).astype(np.float32)

    wm = res(tpl.wm)
    axes, coherence = tract_orientation(wm, spacing_mm)
    return GrowthGrid(
        gm=res(tpl.gm), wm=wm, csf=res(tpl.csf), brain=brain, ventricles=ventricles,
        critical=critical, affine=aff, spacing=float(spacing_mm), depth_mm=edt(brain >= 0.5),
        critical_mm=edt(critical < 0.5), ventricles_mm=edt(ventricles < 0.5), tract_axes=axes,
        tract_coherence=coherence,
    )  # fmt: skip


# --- white-matter hyperintensities ---------------------------------------------------------------

WMH_PERIVENTRICULAR_MM = 6.0  # decay length of the periventricular caps and rims
WMH_BLOBS_AT_FULL_BURDEN = 8.0  # mean number of deep white-matter foci at full burden


def wmh_burden(age: float) -> float:
    """Fraction of the full white-matter-hyperintensity burden expected at `age` (0 below 35 years)."""
    return float(np.clip((age - 35.0) / 40.0, 0.0, 1.0))


def white_matter_hyperintensities(grid: GrowthGrid, age: float, rng: np.random.Generator) -> np.ndarray:
    """A patient's white-matter hyperintensities on the growth grid, in [0, 1].

    Periventricular caps and rims (decaying away from the ventricles) and a few deep white-matter foci,
    both growing with age. They are FLAIR-bright like oedema but are not tumour and never progress.
    """
    h = grid.spacing
    burden = wmh_burden(age)
    field = burden * rng.uniform(0.4, 1.0) * np.exp(-grid.ventricles_mm / WMH_PERIVENTRICULAR_MM)
    cells = np.argwhere(grid.wm >= 0.7)
    idx = np.indices(grid.wm.shape, dtype=np.float32)
    for _ in range(rng.poisson(WMH_BLOBS_AT_FULL_BURDEN * burden)):
        centre = cells[rng.integers(len(cells))].reshape(3, 1, 1, 1)
        radius = rng.uniform(2.0, 5.0)
        r2 = (((idx - centre) * h) ** 2).sum(0)
        field = field + rng.uniform(0.5, 1.0) * np.exp(-0.5 * r2 / radius**2)
    return (np.clip(field, 0.0, 1.0) * grid.wm).astype(np.float32)
