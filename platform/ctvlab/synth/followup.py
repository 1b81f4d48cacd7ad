"""Synthetic follow-up scans with known truth, for `ctvlab register`'s tests and accuracy benchmark.

A pre-RT patient on the MNI152 anatomy (`write_pre_rt`): the template T1 on a coarse grid with a lesion
(T2L, enhancing rim, resection cavity) and its progression masks, kept apart as the truth. Its follow-up
(`write_followup`) lies in a space of its own: every follow-up voxel at world point y shows the pre-RT
content at psi(y) = x + d(x), x = R y + t: a rigid move (a few degrees, several mm) then a smooth
deformation d (Gaussian bumps, a few mm, the scale of mass effect). On the follow-up the cavity has grown
and the progression enhances. Landmarks are follow-up points q in the brain with their pre-RT positions
psi(q), world RAS mm, so a registration's error is |T(psi(q)) - q| with T the pre-RT -> follow-up map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ctvlab.ingest.manifest import ManifestRow


@dataclass(frozen=True)
class FollowupSpec:
    spacing_mm: float = 2.5
    rotation_deg: float = 5.0
    shift_mm: tuple[float, float, float] = (6.0, -4.0, 3.0)
    warp_mm: float = 3.0  # peak displacement of the smooth deformation
    warp_sigma_mm: float = 25.0
    cavity_growth_mm: float = 4.0
    n_landmarks: int = 40
    seed: int = 0


LESION_CENTRE = (35.0, -10.0, 15.0)  # MNI mm, right fronto-parietal white matter
PROGRESSION_CENTRE = (42.0, -22.0, 15.0)


def _world(affine: np.ndarray, shape) -> np.ndarray:
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)


def _ball(xyz: np.ndarray, centre, radius: float) -> np.ndarray:
    return ((xyz - np.asarray(centre, dtype=float).reshape(3, 1, 1, 1)) ** 2).sum(0) <= radius**2


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def write_pre_rt(root: Path, patient_id: str, truth: Path, spacing_mm: float = 2.5,
                 lesion_centre=LESION_CENTRE, progression_centre=PROGRESSION_CENTRE) -> ManifestRow:  # fmt: skip
    """A pre-RT patient under `root/patient_id` on the MNI anatomy; its progression masks go to
    `truth/patient_id/` (not into the manifest: registration is to write them)."""
    from ctvlab.synth.anatomy import load_template, sample

    tpl = load_template()
    extent = (tpl.box_hi - tpl.box_lo) + 20.0
    shape = tuple(int(np.ceil(e / spacing_mm)) for e in extent)
    affine = np.diag([spacing_mm] * 3 + [1.0])
    affine[:3, 3] = (tpl.box_lo + tpl.box_hi) / 2 - (np.asarray(shape) - 1) / 2 * spacing_mm
    xyz = _world(affine, shape)
    brain = sample(tpl.brain, tpl.affine, affine, shape) >= 0.5
    t1 = sample(tpl.t1, tpl.affine, affine, shape)
    cavity = _ball(xyz, lesion_centre, 5.0) & brain
    t2l = _ball(xyz, lesion_centre, 14.0) & brain & ~cavity
    cel = _ball(xyz, lesion_centre, 8.0) & brain & ~cavity
    prog_t2l = _ball(xyz, progression_centre, 15.0) & brain
    prog_cel = _ball(xyz, progression_centre, 8.0) & brain
    t1c = t1.copy()
    t1c[t2l] *= 0.8
    t1c[cel & ~_ball(xyz, lesion_centre, 6.0)] = 1.0  # the enhancing rim
    t1c[cavity] = 0.15
    flair = np.where(brain, 0.5 + 0.2 * tpl.wm.mean(), 0.0).astype(np.float32) + 0.3 * t1
    flair[t2l] = 1.0
    folder = Path(root) / patient_id
    rows = {"t1c": t1c, "t1": t1, "flair": flair}
    masks = {"brain_mask": brain, "t2l_mask": t2l, "cel_mask": cel, "cavity_mask": cavity}
    for name, arr in rows.items():
        _save(folder / f"{name}.nii.gz", arr.astype(np.float32), affine)
    for name, arr in masks.items():
        _save(folder / f"{name}.nii.gz", arr.astype(np.uint8), affine)
    _save(Path(truth) / patient_id / "cel_progression_mask.nii.gz", prog_cel.astype(np.uint8), affine)
    _save(Path(truth) / patient_id / "t2l_progression_mask.nii.gz", prog_t2l.astype(np.uint8), affine)
    return ManifestRow.model_validate(
        {"patient_id": patient_id, **{n: f"{patient_id}/{n}.nii.gz" for n in (*rows, *masks)}}
    )


def _psi(y: np.ndarray, rot: np.ndarray, shift: np.ndarray, bumps: list[tuple[np.ndarray, np.ndarray]],
         sigma: float) -> np.ndarray:  # fmt: skip
    """Follow-up world points y (3, N) -> pre-RT world points, RAS mm."""
    x = rot @ y + shift[:, None]
    d = np.zeros_like(x)
    for centre, vec in bumps:
        w = np.exp(-((x - centre[:, None]) ** 2).sum(0) / (2 * sigma**2))
        d += vec[:, None] * w
    return x + d


def write_followup(root: Path, row: ManifestRow, truth: Path, spec: FollowupSpec = FollowupSpec()) -> dict:
    """Write `row`'s follow-up under its `followup/` folder, in its own space, and return the truth's
    landmarks: {"pre_rt": (N, 3), "followup": (N, 3)}, world RAS mm (also saved to truth/<id>/landmarks.npz).
    """
    import nibabel as nib

    from ctvlab.synth.anatomy import rotation_matrix

    rng = np.random.default_rng(spec.seed)
    root = Path(root)
    pre = nib.load(root / row.t1c)
    pre_aff = pre.affine
    t1c = np.asarray(pre.dataobj, dtype=np.float32)
    shape = t1c.shape
    xyz = _world(pre_aff, shape)
    brain = np.asarray(nib.load(root / row.brain_mask).dataobj) > 0
    cavity = np.asarray(nib.load(root / row.cavity_mask).dataobj) > 0
    tdir = Path(truth) / row.patient_id
    prog = {n: np.asarray(nib.load(tdir / f"{n}.nii.gz").dataobj) > 0
            for n in ("cel_progression_mask", "t2l_progression_mask")}  # fmt: skip
    # the follow-up's content, drawn in pre-RT space: a grown cavity, the progression enhancing
    content = t1c.copy()
    content[prog["t2l_progression_mask"]] *= 0.85
    content[prog["cel_progression_mask"]] = 1.0
    grown = (
        ndi.distance_transform_edt(~cavity, sampling=np.abs(np.diag(pre_aff)[:3])) <= spec.cavity_growth_mm
    )
    content[grown & brain] = 0.15

    rot = rotation_matrix(rng.normal(size=3), np.deg2rad(spec.rotation_deg))
    shift = np.asarray(spec.shift_mm, dtype=np.float64)
    inside = xyz[:, brain].T
    bumps = [(inside[rng.integers(len(inside))], rng.normal(size=3)) for _ in range(4)]
    bumps = [(c, v / np.linalg.norm(v) * spec.warp_mm) for c, v in bumps]

    # the follow-up grid: its own, axis-aligned, centred where the brain is in its own world
    fu_aff = np.diag([spec.spacing_mm] * 3 + [1.0])
    centre_pre = inside.mean(0)
    centre_fu = rot.T @ (centre_pre - shift)
    fu_shape = shape
    fu_aff[:3, 3] = centre_fu - (np.asarray(fu_shape) - 1) / 2 * spec.spacing_mm
    y = _world(fu_aff, fu_shape).reshape(3, -1)
    x = _psi(y, rot, shift, bumps, spec.warp_sigma_mm)
    ijk = np.linalg.inv(pre_aff)[:3, :3] @ x + np.linalg.inv(pre_aff)[:3, 3:4]

    def warp(a: np.ndarray) -> np.ndarray:
        return ndi.map_coordinates(a.astype(np.float32), ijk, order=1, mode="constant", cval=0.0).reshape(
            fu_shape
        )

    folder = root / Path(row.t1c).parent / "followup"
    _save(folder / "t1c.nii.gz", warp(content), fu_aff)
    for n, m in prog.items():
        _save(folder / f"{n}.nii.gz", (warp(m) >= 0.5).astype(np.uint8), fu_aff)
    lesion = prog["t2l_progression_mask"] | grown
    _save(folder / "lesion_mask.nii.gz", (warp(lesion) >= 0.5).astype(np.uint8), fu_aff)

    # landmarks: follow-up points in brain away from the changes (where a registration can be judged)
    fu_brain = warp(brain & ~ndi.binary_dilation(lesion, iterations=3)) >= 0.99
    cand = np.argwhere(fu_brain)
    pick = cand[rng.choice(len(cand), size=min(spec.n_landmarks, len(cand)), replace=False)]
    q = (fu_aff[:3, :3] @ pick.T + fu_aff[:3, 3:4]).T
    p = _psi(q.T, rot, shift, bumps, spec.warp_sigma_mm).T
    np.savez(tdir / "landmarks.npz", pre_rt=p, followup=q)
    return {"pre_rt": p, "followup": q}
