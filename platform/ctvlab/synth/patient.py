"""One synthetic patient: pose, tumour, image grids, images and masks, written as NIfTI files.

Grids (all in the scanner's world frame, mm):
- anatomy (T1c, T1, FLAIR, every mask): `cfg.anatomy_mm`, oriented like the head plus a small residual
  tilt of the slice prescription, covering the brain with `cfg.field_of_view_margin_mm` to spare;
- diffusion (ADC, FA): `cfg.diffusion_mm` (anisotropic), its own small tilt and offset;
- MRSI: the PRESS box (`cfg.press_box_mm` in voxels of `cfg.mrsi_mm`) placed as a spectroscopist
  would: over the lesion, with an offset of up to PRESS_OFFSET_MM and a tilt of up to PRESS_TILT_DEG from
  the anatomy grid, pushed inwards until it lies in the brain. Each MRSI voxel sees the underlying maps
  through a point-spread function (a Gaussian of MRSI_PSF_SIGMA voxels, sampled at 4×4×4 points per
  voxel: partial volume and bleeding from the neighbours), and the outer voxels pick up lipid from the
  scalp.

The head is scaled as well as placed: `plan.brain_scale` shrinks the template (whose brain is larger than
an adult's) to the patient's brain volume, and every length and volume of the tumour is divided by it
(in template units) so that the images show the drawn sizes in millimetres. Beside the inputs, the true
pre-RT density goes to `truth_path` on the T1c grid: ground truth for benchmarks, never an input.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ctvlab.atomic import atomic_path
from ctvlab.config import SynthConfig
from ctvlab.ingest.manifest import MRSI_COLUMNS, ManifestRow
from ctvlab.synth import imaging
from ctvlab.synth.anatomy import (
    Template,
    apply_affine,
    brain_depth_mm,
    covering_shape,
    grid_affine,
    growth_grid,
    load_template,
    random_rotation,
    rigid,
    sample,
    sample_points,
    white_matter_hyperintensities,
)
from ctvlab.synth.clinical import PatientPlan
from ctvlab.synth.signal_settings import signal_params
from ctvlab.synth.tumour import TumourCourse, TumourSpec, pre_rt_regions, progression_regions, simulate_tumour

MRSI_SUBSAMPLES = 4  # points per axis averaged into one MRSI voxel
MRSI_PSF_SIGMA = 0.5  # point-spread (Gaussian SD, in MRSI voxels) of a Hamming-filtered acquisition
PRESS_OFFSET_MM = 10.0
PRESS_TILT_DEG = 10.0
OEDEMA_KEPT = 0.7  # at progression, pre-RT oedema above this level is still visible (the rest resolved)
MRSI_MIN_BRAIN = 0.25  # MRSI voxels with less brain than this have no usable spectrum (NaN)
PRESS_MIN_INSIDE = 0.9  # the box is pushed inwards until this fraction of its voxels lies in the brain
DAYS_PER_MONTH = 30.44
STREAMS = (
    "pose", "tumour", "anatomy_noise", "diffusion_noise", "mrsi_noise", "press", "registration", "wmh",
)  # fmt: skip
REGISTRATION_SMOOTHNESS_MM = 15.0  # correlation length of the residual misalignment
TRUTH_DIR = "truth"  # beside the patients' folders, not in the manifest: ground truth, never an input
TRUTH_SUFFIX = "_density_pre.nii.gz"


def smooth_displacement(
    shape: tuple[int, int, int], spacing_mm: float, rms_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """(3, X, Y, Z) smooth random displacement (mm) whose vector magnitude has RMS `rms_mm`."""
    sigma = REGISTRATION_SMOOTHNESS_MM / spacing_mm
    disp = np.stack([ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap") for _ in range(3)])
    norm = np.sqrt((disp**2).sum(0).mean())
    return (disp * (rms_mm / max(norm, 1e-12))).astype(np.float32)


def misregister(field: np.ndarray, displacement: np.ndarray, spacing_mm: float) -> np.ndarray:
    """`field` (X, Y, Z) read at every cell moved by `displacement` (3, X, Y, Z) in mm: the residual
    misalignment between the progression scan and the pre-RT scan."""
    coords = np.indices(field.shape, dtype=np.float32) + displacement / np.float32(spacing_mm)
    return ndi.map_coordinates(field, coords, order=1, mode="nearest", output=np.float32)


def patient_streams(seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent random streams of patient `index`: a function of (seed, index) only."""
    ss = np.random.SeedSequence(seed, spawn_key=(1, index))
    return {name: np.random.default_rng(s) for name, s in zip(STREAMS, ss.spawn(len(STREAMS)), strict=True)}


def grid_fields(
    tpl: Template,
    course: TumourCourse,
    growth_affine: np.ndarray,
    spec: TumourSpec,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    pose: np.ndarray,
    with_t1: bool = True,
) -> dict[str, np.ndarray]:
    """Every field of the patient sampled on one image grid, with the pre-RT regions."""

    def tpl_field(a: np.ndarray) -> np.ndarray:
        return sample(a, tpl.affine, affine, shape, pose)

    def sim_field(a: np.ndarray) -> np.ndarray:
        return sample(a, growth_affine, affine, shape, pose)

    brain = tpl_field(tpl.brain) >= 0.5
    f = {
        "brain": brain,
        "t1": tpl_field(tpl.t1) * brain if with_t1 else None,
        "gm": tpl_field(tpl.gm) * brain,
        "wm": tpl_field(tpl.wm) * brain,
        "csf": tpl_field(tpl.csf) * brain,
        "u": sim_field(course.u_pre) * brain,
        "oedema": sim_field(course.oedema) * brain if course.oedema is not None else None,
    }
    f.update(pre_rt_regions(f["u"], sim_field(course.depth_mm), spec, course.gtr_density, f["oedema"]))
    for k in ("cavity", "necrosis", "cel", "t2l"):
        f[k] &= brain
    return f


def sensed(
    u: np.ndarray, oedema: np.ndarray | None, t2l: np.ndarray, strength: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """The density and oedema that diffusion and MRSI see, at imaging strength 0..1 (`SynthConfig`).

    1: the true density and oedema. 0 (the null cohort): the visible lesion only, a fixed density over the
    T2L and no oedema, whatever lies in it or around it, so the maps are a function of the T2L mask and the
    tissue maps alone. In between: strength·(truth) + (1 − strength)·(the null's), so the invisible tail
    is seen at `strength` times its density and the maps still carry nothing else about it.
    """
    if isinstance(strength, bool):  # the argument was once `null: bool`, whose True meant strength 0
        raise TypeError("sensed: pass the imaging strength as a float in [0, 1] (0: the null cohort)")
    lesion_only = np.where(t2l, imaging.NULL_DENSITY, 0.0).astype(np.float32)
    if strength <= 0.0:
        return lesion_only, None
    if strength >= 1.0:
        return u, oedema
    s = np.float32(strength)
    seen = (s * u + (np.float32(1.0) - s) * lesion_only).astype(np.float32)
    return seen, None if oedema is None else (s * oedema).astype(np.float32)


def mrsi_box(
    tpl: Template,
    pose: np.ndarray,
    rotation: np.ndarray,
    lesion_world: np.ndarray,
    cfg: SynthConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of the PRESS box: over the lesion with a random offset and tilt, pushed inwards
    into the brain."""
    shape = tuple(max(1, round(b / m)) for b, m in zip(cfg.press_box_mm, cfg.mrsi_mm, strict=True))
    lo, hi = tpl.brain_box_mm()
    brain_centre = apply_affine(pose, (lo + hi) / 2)
    centre = lesion_world + rng.uniform(-PRESS_OFFSET_MM, PRESS_OFFSET_MM, size=3)
    rotation = rotation @ random_rotation(rng, PRESS_TILT_DEG)
    inv_pose = np.linalg.inv(pose)
    for _ in range(20):
        aff = grid_affine(centre, rotation, cfg.mrsi_mm, shape)
        pts = apply_affine(inv_pose, apply_affine(aff, np.argwhere(np.ones(shape))))
        inside = sample_points(tpl.brain, tpl.affine, pts.T) >= 0.5
        if inside.mean() >= PRESS_MIN_INSIDE:
            break
        step = brain_centre - centre
        centre = centre + 3.0 * step / max(np.linalg.norm(step), 1e-6)
    return grid_affine(centre, rotation, cfg.mrsi_mm, shape), shape


def mrsi_maps(
    tpl: Template,
    course: TumourCourse,
    growth_affine: np.ndarray,
    spec: TumourSpec,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    pose: np.ndarray,
    strength: float,
    noise: float,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The eight MRSI maps on the PRESS grid: the point-wise metabolite maps seen through the point-spread
    function and averaged over each voxel, noise, and the indices. NaN where a voxel holds less than
    MRSI_MIN_BRAIN of brain. `strength`: how much of the invisible infiltration the spectra see (`sensed`)."""
    k = MRSI_SUBSAMPLES
    fine = tuple(n * k for n in shape)
    ijk = (np.indices(fine).reshape(3, -1).T + 0.5) / k - 0.5  # fine points in MRSI voxel units
    pts = apply_affine(np.linalg.inv(pose), apply_affine(affine, ijk)).T  # (3, N) MNI mm

    brain = sample_points(tpl.brain, tpl.affine, pts) >= 0.5
    gm, wm, csf = (sample_points(a, tpl.affine, pts) * brain for a in (tpl.gm, tpl.wm, tpl.csf))
    u = sample_points(course.u_pre, growth_affine, pts) * brain
    oedema = sample_points(course.oedema, growth_affine, pts) * brain if course.oedema is not None else None
    depth = sample_points(course.depth_mm, growth_affine, pts)
    regions = pre_rt_regions(u, depth, spec, course.gtr_density, oedema)
    seen, oedema = sensed(u, oedema, regions["t2l"], strength)
    cav, nec = (regions[r].astype(np.float32) * brain for r in ("cavity", "necrosis"))
    brain_depth = sample_points(brain_depth_mm(), load_template().affine, pts)
    point_maps = imaging.metabolite_maps(gm, wm, csf, seen, cav, nec, oedema, brain_depth)

    def voxels(values: np.ndarray) -> np.ndarray:
        """Point values → MRSI voxels: the point-spread function, then the mean over each voxel."""
        v = ndi.gaussian_filter(values.reshape(fine).astype(np.float32), MRSI_PSF_SIGMA * k, mode="nearest")
        return v.reshape(shape[0], k, shape[1], k, shape[2], k).mean(axis=(1, 3, 5))

    brain_frac = brain.reshape(fine).reshape(shape[0], k, shape[1], k, shape[2], k).mean(axis=(1, 3, 5))
    usable = brain_frac >= MRSI_MIN_BRAIN
    out = {}
    for name, values in point_maps.items():
        v = voxels(values)
        sd = noise * (
            imaging.NOISE["lac_lip"]
            if name in ("lac", "lip")
            else imaging.NOISE["metabolite"] * imaging.NAV[name]["wm"]
        )
        v = v + rng.standard_normal(shape).astype(np.float32) * np.float32(sd)
        out[name] = np.where(usable, v, np.nan).astype(np.float32)
    out["cni"] = imaging.metabolite_index(out["cho"], out["naa"])
    out["ccri"] = imaging.metabolite_index(out["cho"], out["cre"])
    out["crni"] = imaging.metabolite_index(out["cre"], out["naa"])
    return out


def template_units(spec: TumourSpec, scale: float) -> TumourSpec:
    """The tumour's lengths and volumes in template units: the template is scaled by `scale` into the
    patient, so a drawn length l (patient mm) is l / scale template mm, a volume v is v / scale³."""
    cube = scale**3
    return replace(
        spec,
        lambda_wm_mm=spec.lambda_wm_mm / scale, advance_mm=spec.advance_mm / scale,
        route_width_mm=spec.route_width_mm / scale,
        satellite_mm=spec.satellite_mm / scale, rim_mm=spec.rim_mm / scale,
        foci_mm=tuple(f / scale for f in spec.foci_mm), foci_radius_mm=spec.foci_radius_mm / scale,
        str_residual_mm=spec.str_residual_mm / scale, lesion_cm3=spec.lesion_cm3 / cube,
        new_cel_cm3=spec.new_cel_cm3 / cube, gtr_cavity_cm3=spec.gtr_cavity_cm3 / cube,
    )  # fmt: skip


def truth_path(cohort: str | Path, patient_id: str) -> Path:
    """Where a patient's true pre-RT tumour density lies: `<cohort>/truth/<patient_id>_density_pre.nii.gz`.
    Ground truth for benchmarks, never an input: no manifest column points at it."""
    return Path(cohort) / TRUTH_DIR / f"{patient_id}{TRUTH_SUFFIX}"


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype: Any) -> None:
    """Write one image atomically, spacing in mm, scanner qform and sform."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _to_int16(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 32767).astype(np.int16)


def generate_patient(plan: PatientPlan, cfg: SynthConfig, out: str | Path) -> tuple[ManifestRow, dict]:
    """Simulate one patient and write its files under `out/<patient_id>/`.

    Returns:
        (the manifest row, a dict of generative parameters for `synth_params.json`).
    """
    out = Path(out)
    folder = out / plan.patient_id
    tpl = load_template()
    ggrid = growth_grid(cfg.growth_mm)
    rng = patient_streams(cfg.seed, plan.index)
    scale = plan.brain_scale
    spec = template_units(plan.tumour, scale)
    course = simulate_tumour(spec, ggrid, rng["tumour"])

    # the head in the scanner (scaled to the patient's brain), and the anatomy grid aligned to it up to a
    # small prescription tilt
    rot_head = random_rotation(rng["pose"], cfg.max_rotation_deg)
    pose = rigid(rot_head * scale, rng["pose"].uniform(-cfg.max_translation_mm, cfg.max_translation_mm, 3))
    lo, hi = tpl.brain_box_mm()
    extent = (hi - lo) * scale + 2.0 * cfg.field_of_view_margin_mm
    centre = apply_affine(pose, (lo + hi) / 2.0)
    rot_anat = rot_head @ random_rotation(rng["pose"], cfg.max_rotation_deg / 2.0)
    shape_anat = covering_shape(extent, rot_head.T @ rot_anat, cfg.anatomy_mm)
    aff_anat = grid_affine(centre, rot_anat, cfg.anatomy_mm, shape_anat)
    rot_diff = rot_head @ random_rotation(rng["pose"], cfg.max_rotation_deg / 2.0)
    shape_diff = covering_shape(extent, rot_head.T @ rot_diff, cfg.diffusion_mm)
    aff_diff = grid_affine(centre + rng["pose"].uniform(-4.0, 4.0, 3), rot_diff, cfg.diffusion_mm, shape_diff)

    paths: dict[str, str] = {}

    def save(name: str, data: np.ndarray, affine: np.ndarray, dtype: Any) -> None:
        save_nifti(folder / f"{name}.nii.gz", data, affine, dtype)
        paths[name] = f"{plan.patient_id}/{name}.nii.gz"

    wmh = white_matter_hyperintensities(ggrid, plan.age, rng["wmh"])

    # --- anatomy grid: T1, T1c, FLAIR and every mask
    a = grid_fields(tpl, course, ggrid.affine, spec, aff_anat, shape_anat, pose)
    brain = a["brain"]
    cav, nec, cel = (a[k].astype(np.float32) for k in ("cavity", "necrosis", "cel"))
    wmh_a = sample(wmh, ggrid.affine, aff_anat, shape_anat, pose) * brain
    t1, t1c = imaging.t1_images(a["t1"], a["u"], cav, nec, cel, wmh_a, spec.t2l_density, a["oedema"])
    flair = imaging.flair_image(a["gm"], a["wm"], a["csf"], a["u"], cav, wmh_a, spec.t2l_density, a["oedema"])
    bias = imaging.bias_field(shape_anat, rng["anatomy_noise"], imaging.BIAS_AMPLITUDE * cfg.noise)
    sd = imaging.NOISE["anatomical"] * cfg.noise
    wm_level = {"t1": imaging.T1_SCALE * 0.87, "flair": imaging.NAV["flair"]["wm"]}
    images = {
        "t1c": imaging.add_noise(t1c * bias, sd * wm_level["t1"], rng["anatomy_noise"], brain),
        "t1": imaging.add_noise(t1 * bias, sd * wm_level["t1"], rng["anatomy_noise"], brain),
        "flair": imaging.add_noise(flair * bias, sd * wm_level["flair"], rng["anatomy_noise"], brain),
    }
    for name, img in images.items():
        save(name, _to_int16(img * brain), aff_anat, np.int16)
    # the hidden truth, beside the inputs and never in the manifest: what a benchmark scores maps against
    truth = np.where(a["cavity"], 0.0, a["u"]) * brain  # the cavity holds no cells at the pre-RT scan
    save_nifti(truth_path(out, plan.patient_id), truth, aff_anat, np.float32)

    disp = smooth_displacement(
        ggrid.brain.shape, ggrid.spacing, plan.registration_mm / scale, rng["registration"]
    )
    u_prog = misregister(course.u_prog, disp, ggrid.spacing)
    u_prog = sample(u_prog, ggrid.affine, aff_anat, shape_anat, pose) * brain
    if a["oedema"] is not None:
        a["oedema_kept"] = a["oedema"] >= OEDEMA_KEPT
    prog = progression_regions(u_prog, a, spec)
    lesion = a["t2l"] | a["cavity"]
    ventricles = (sample(tpl.ventricles, tpl.affine, aff_anat, shape_anat, pose) >= 0.5) & brain & ~lesion
    critical = (sample(tpl.critical, tpl.affine, aff_anat, shape_anat, pose) >= 0.5) & brain
    masks = {
        "brain_mask": brain, "cel_mask": a["cel"], "t2l_mask": a["t2l"], "cavity_mask": a["cavity"],
        "ventricles_mask": ventricles, "critical_mask": critical,
        "cel_progression_mask": prog["cel"] & brain, "t2l_progression_mask": prog["t2l"] & brain,
    }  # fmt: skip

    # --- diffusion grid
    d = grid_fields(tpl, course, ggrid.affine, spec, aff_diff, shape_diff, pose, with_t1=False)
    seen, oedema_seen = sensed(d["u"], d["oedema"], d["t2l"], cfg.sensing_strength)
    adc, fa = imaging.diffusion_maps(
        d["gm"], d["wm"], d["csf"], seen,
        *(d[k].astype(np.float32) for k in ("cavity", "necrosis", "cel")),
        sample(wmh, ggrid.affine, aff_diff, shape_diff, pose) * d["brain"], oedema_seen,
    )  # fmt: skip
    adc = imaging.add_noise(adc, imaging.NOISE["adc"] * cfg.noise, rng["diffusion_noise"], d["brain"])
    fa = imaging.add_noise(fa, imaging.NOISE["fa"] * cfg.noise, rng["diffusion_noise"], d["brain"])
    save("adc", np.clip(adc, 0.0, None) * d["brain"], aff_diff, np.float32)
    save("fa", np.clip(fa, 0.0, 1.0) * d["brain"], aff_diff, np.float32)

    # --- MRSI on the PRESS box (the box is placed even without MRSI, to keep the streams aligned)
    lesion_idx = np.argwhere(lesion) if lesion.any() else np.argwhere(brain)
    lesion_world = apply_affine(aff_anat, lesion_idx.mean(0))
    aff_mrsi, shape_mrsi = mrsi_box(tpl, pose, rot_anat, lesion_world, cfg, rng["press"])
    if plan.has_mrsi:
        maps = mrsi_maps(
            tpl,
            course,
            ggrid.affine,
            spec,
            aff_mrsi,
            shape_mrsi,
            pose,
            cfg.sensing_strength,
            cfg.noise,
            rng["mrsi_noise"],
        )
        for name in MRSI_COLUMNS:
            save(name, maps[name], aff_mrsi, np.float32)

    for name, m in masks.items():
        save(name, m, aff_anat, np.uint8)

    row = ManifestRow.model_validate({**plan.clinical(), **paths})
    rho_per_month = course.t_progression / max(plan.pfs_months, 1e-3)
    params = {
        "patient_id": plan.patient_id,
        "pattern": plan.pattern,
        "seed_mni": [round(float(x), 1) for x in course.seed_mni],
        "advance_mm_target": round(plan.tumour.advance_mm, 2),
        "advance_mm_growth_grid": round(course.advance_mm * scale, 2),
        "lambda_wm_mm": round(plan.tumour.lambda_wm_mm, 3),
        "diffusion_ratio": round(spec.diffusion_ratio, 3),
        "rho_per_day": round(rho_per_month / DAYS_PER_MONTH, 6),
        "d_wm_mm2_per_day": round(plan.tumour.lambda_wm_mm**2 * rho_per_month / DAYS_PER_MONTH, 6),
        "lesion_cm3_target": round(plan.tumour.lesion_cm3, 2),
        "t_pre": round(course.t_pre, 4),
        "t_progression": round(course.t_progression, 4),
        "pose": np.round(pose, 6).tolist(),
        "has_mrsi": plan.has_mrsi,
        "registration_mm": round(plan.registration_mm, 3),
        "satellite_mm": round(plan.tumour.satellite_mm, 2),
        "brain_scale": round(scale, 4),
        "oedema_fraction": round(plan.tumour.oedema_fraction, 3),
        "post_rt_correlation": round(plan.tumour.post_rt_correlation, 3),
    }
    params.update(signal_params(plan.tumour))  # empty for the default cohort
    return row, params
