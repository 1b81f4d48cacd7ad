"""Follow-up scans registered to the pre-RT T1c (`ctvlab register`).

ctvlab reads progression masks on the pre-RT grid. A team's recurrence-time scan lies in its own space
(another session, after resection, mass effect, months of change), so its masks are brought over here:
the follow-up T1c (or FLAIR) is registered to the pre-RT T1c, rigid (Euler3D), then affine, then
deformable (a cubic B-spline on a coarse control grid), with SimpleITK's registration framework and
Mattes mutual information. Where the images differ for a reason other than position (the lesions, the
resection cavity) the metric does not look: the fixed mask is the pre-RT brain less the T2L, CEL and cavity
dilated by `EXCLUDE_MM`, the moving mask leaves out the follow-up lesion when one is given.

How follow-ups are declared (a folder convention, so that an importer can fill it by writing files):
`<patient folder>/followup/`, beside the patient's pre-RT T1c, holding `t1c.nii.gz` (or `flair.nii.gz`),
and the progression masks drawn on it, `cel_progression_mask.nii.gz` and/or
`t2l_progression_mask.nii.gz`, optionally `lesion_mask.nii.gz` (what changed on the follow-up, left out
of the metric). `.nii` works as well as `.nii.gz`. The registered masks are written to
`<patient folder>/cel_progression_mask.nii.gz` (and t2l), on the pre-RT T1c's grid, and the manifest's
`cel_progression_mask` / `t2l_progression_mask` cells point at them.

World coordinates: SimpleITK works in LPS millimetres, nibabel and ctvlab's manifests in RAS; the
functions here that take or return points say which.

About 470 lines in one module on purpose: the folder convention, the registration, its refusal rule and QC
and the cohort loop are read together when a patient's registration is questioned.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctvlab.atomic import digest, sha256_file

FOLLOWUP_FOLDER = "followup"
MOVING_NAMES = ("t1c", "flair")  # the follow-up image registered, first found wins
MASK_NAMES = ("cel_progression_mask", "t2l_progression_mask")
LESION_NAME = "lesion_mask"
SUFFIXES = (".nii.gz", ".nii")

EXCLUDE_MM = 5.0  # lesions and cavity grown by this much before they leave the metric: their edges move too
BSPLINE_MESH_MM = 40.0  # control-point spacing of the deformation: smooth at the scale of mass effect
# Refusal: after registration, the NMI inside the pre-RT brain must reach MIN_NMI. Measured on the
# synthetic follow-ups (benchmarks/register_accuracy.py): 1.28 when registered at 2.5 mm (1.24 at 3 mm),
# 1.02 for a follow-up turned 90 degrees (a wrong orientation header) or of noise; 1.12 sits between.
MIN_NMI = 1.12
NMI_BINS = 32


class RegistrationRefused(Exception):
    """Registration plainly failed for one patient: nothing is written for it."""


@dataclass(frozen=True)
class Followup:
    """A patient's follow-up files (absolute paths), as found by `find_followup`."""

    image: Path
    masks: dict[str, Path]  # manifest column -> follow-up mask
    lesion: Path | None = None


@dataclass
class PatientResult:
    patient_id: str
    status: str  # "registered", "current" (registered before, nothing changed), "refused", "error"
    message: str = ""
    nmi_before: float | None = None
    nmi_after: float | None = None
    corr_before: float | None = None
    corr_after: float | None = None
    seconds: float | None = None
    written: dict[str, str] = field(default_factory=dict)  # column -> path relative to the cohort
    figure: str | None = None
    inputs: str | None = None  # digest of what the registration read and how (`_inputs_digest`)


def not_registered(results: list[PatientResult]) -> list[str]:
    """The patients whose follow-up was refused or failed: left without progression masks."""
    return [r.patient_id for r in results if r.status in ("refused", "error")]


def _first(folder: Path, name: str) -> Path | None:
    for s in SUFFIXES:
        if (folder / f"{name}{s}").is_file():
            return folder / f"{name}{s}"
    return None


def followup_folder(root: Path, t1c: str) -> Path:
    """Where a patient's follow-up lives: `followup/` beside its pre-RT T1c (`t1c` as the manifest has it)."""
    return Path(root) / Path(t1c).parent / FOLLOWUP_FOLDER


def pre_rt_exclusions(root: Path, row) -> list[Path]:
    """The pre-RT masks whose region (grown by `EXCLUDE_MM`) is left out of the similarity metric: the T2L,
    the CEL and the resection cavity, those the manifest names."""
    return [root / p for p in (row.t2l_mask, row.cel_mask, row.cavity_mask) if p]


def find_followup(root: Path, t1c: str) -> Followup | None:
    """The follow-up declared for the patient whose pre-RT T1c is `t1c` (relative to `root`), or None.

    Raises:
        ValueError: the folder exists but holds no image or no progression mask (named as found).
    """
    folder = followup_folder(root, t1c)
    if not folder.is_dir():
        return None
    image = next((p for n in MOVING_NAMES if (p := _first(folder, n))), None)
    rel = folder.relative_to(root)
    if image is None:
        raise ValueError(f"{rel}/ holds no t1c.nii.gz or flair.nii.gz to register")
    masks = {n: p for n in MASK_NAMES if (p := _first(folder, n))}
    if not masks:
        raise ValueError(f"{rel}/ holds no cel_progression_mask.nii.gz or t2l_progression_mask.nii.gz")
    return Followup(image=image, masks=masks, lesion=_first(folder, LESION_NAME))


def declares_followups(root: str | Path) -> bool:
    """Whether any patient of the cohort at `root` has a `followup/` folder (the manifest read, no image);
    True when the manifest cannot be read yet (a cohort still to be written cannot be judged)."""
    from ctvlab.ingest.manifest import read_manifest

    rows, problems, _ = read_manifest(root)
    if problems:
        return True
    return any(followup_folder(Path(root), r.t1c).is_dir() for r in rows)


# ---------------------------------------------------------------------------------------------- maths


def nmi(a: np.ndarray, b: np.ndarray, bins: int = NMI_BINS) -> float:
    """Studholme's normalised mutual information (H(A) + H(B)) / H(A, B) of two samples: 1 when
    independent, 2 when one determines the other."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    h, _, _ = np.histogram2d(a, b, bins=bins)
    p = h / max(h.sum(), 1.0)

    def ent(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    joint = ent(p)
    return (ent(p.sum(1)) + ent(p.sum(0))) / joint if joint > 0 else 1.0


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


# ---------------------------------------------------------------------------------------- registration


def _read(path: Path, pixel: Any = None):
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError:  # SimpleITK's message is a page of ITK internals: say what matters
        raise ValueError(f"{path}: cannot be read as a NIfTI image") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: is not a 3-D single-channel image")
    return sitk.Cast(img, pixel if pixel is not None else sitk.sitkFloat32)


def _binary(img):
    import SimpleITK as sitk

    return sitk.Cast(sitk.BinaryThreshold(sitk.Cast(img, sitk.sitkFloat32), 0.5, 1e30, 1, 0), sitk.sitkUInt8)


def _dilate_mm(mask, mm: float):
    """A binary mask grown by `mm` millimetres (Euclidean, with the voxel spacing)."""
    import SimpleITK as sitk

    dist = sitk.SignedMaurerDistanceMap(
        mask, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return sitk.Cast(dist <= mm, sitk.sitkUInt8)


def _stage(
    fixed,
    moving,
    transform,
    fixed_mask,
    moving_mask,
    iterations: int,
    shrink: list[int],
    lbfgs: bool,
    sampling: float = 0.25,
):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed=7)  # fixed seed: the same input registers the same way
    reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    if lbfgs:
        reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iterations,
                                 maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * iterations)  # fmt: skip
    else:
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                     relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)  # fmt: skip
        reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel([s - 1 for s in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)
    return transform


@dataclass(frozen=True)
class Settings:
    """How hard to try: iterations per stage and the B-spline control spacing (mm)."""

    rigid_iterations: int = 100
    affine_iterations: int = 100
    bspline_iterations: int = 30
    mesh_mm: float = BSPLINE_MESH_MM
    deformable: bool = True

    @classmethod
    def for_run(cls, smoke_test: bool) -> Settings:
        """The command's and the run stage's settings: `--smoke-test` tries a few iterations only (a check
        that the stage runs, not a registration to trust)."""
        return cls(20, 20, 5) if smoke_test else cls()


def register_images(fixed, moving, fixed_mask, moving_mask=None, settings: Settings = Settings()):
    """The transform from the pre-RT (fixed) world to the follow-up (moving) world, LPS mm, as SimpleITK
    resamples with it: rigid, then affine, then B-spline, each stage starting where the last ended."""
    import SimpleITK as sitk

    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)  # fmt: skip
    rigid = _stage(fixed, moving, sitk.Euler3DTransform(init), fixed_mask, moving_mask,
                   settings.rigid_iterations, [4, 2, 1], lbfgs=False)  # fmt: skip
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine = _stage(fixed, moving, affine, fixed_mask, moving_mask, settings.affine_iterations, [2, 1],
                    lbfgs=False)  # fmt: skip
    out = sitk.CompositeTransform([affine])
    if settings.deformable:
        extent = [sz * sp for sz, sp in zip(fixed.GetSize(), fixed.GetSpacing(), strict=True)]
        mesh = [max(1, round(e / settings.mesh_mm)) for e in extent]
        bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
        # the B-spline sees the follow-up through the affine: it is fitted in the composite, last applied first
        composite = sitk.CompositeTransform([affine, bspline])
        # 10% of the voxels: the B-spline's gradient is the costly one, and a smooth field needs few samples
        _stage(
            fixed,
            moving,
            composite,
            fixed_mask,
            moving_mask,
            settings.bspline_iterations,
            [2, 1],
            lbfgs=True,
            sampling=0.1,
        )
        out = composite
    return out


def _scores(fixed, moved, brain) -> tuple[float, float]:
    import SimpleITK as sitk

    f = sitk.GetArrayViewFromImage(fixed)
    m = sitk.GetArrayViewFromImage(moved)
    b = sitk.GetArrayViewFromImage(brain).astype(bool)
    return nmi(f[b], m[b]), correlation(f[b], m[b])


def _resample(moving, reference, transform, interpolator):
    import SimpleITK as sitk

    return sitk.Resample(moving, reference, transform, interpolator, 0.0, moving.GetPixelID())


def register_patient(
    fixed_path: Path,
    brain_path: Path,
    exclude_paths: list[Path],
    followup: Followup,
    settings: Settings = Settings(),
    min_nmi: float = MIN_NMI,
) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """Register one patient's follow-up to its pre-RT T1c and carry its masks over.

    Args:
        fixed_path: the pre-RT T1c; `brain_path` its brain mask; `exclude_paths` the masks (T2L, CEL,
            cavity) left out of the metric, grown by `EXCLUDE_MM`.

    Returns:
        (the transform, {column: uint8 mask on the pre-RT grid, in nibabel's (X, Y, Z) order}, scores and
        the images for the QC figure).

    Raises:
        RegistrationRefused: the NMI inside the brain after registration is below `min_nmi`.
    """
    import SimpleITK as sitk

    fixed = _read(fixed_path)
    brain = _binary(_read(brain_path))
    if not brain.IsSameImageGeometryAs(fixed):
        raise ValueError(f"{brain_path}: is not on the grid of {fixed_path}")
    exclude = sitk.Image(brain.GetSize(), sitk.sitkUInt8)
    exclude.CopyInformation(brain)
    for p in exclude_paths:
        m = _binary(_read(p))
        if not m.IsSameImageGeometryAs(fixed):
            raise ValueError(f"{p}: is not on the grid of {fixed_path}")
        exclude = exclude | m
    fixed_mask = brain & (1 - _dilate_mm(exclude, EXCLUDE_MM)) if exclude_paths else brain
    moving = _read(followup.image)
    moving_mask = None
    if followup.lesion is not None:
        lesion = _binary(_read(followup.lesion))
        moving_mask = sitk.Cast(1 - _dilate_mm(lesion, EXCLUDE_MM), sitk.sitkUInt8)

    # "before": the follow-up where its header puts it
    before = _resample(moving, fixed, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear)
    nmi_before, corr_before = _scores(fixed, before, fixed_mask)
    transform = register_images(fixed, moving, fixed_mask, moving_mask, settings)
    moved = _resample(moving, fixed, transform, sitk.sitkLinear)
    nmi_after, corr_after = _scores(fixed, moved, fixed_mask)
    scores = {"nmi_before": nmi_before, "nmi_after": nmi_after, "corr_before": corr_before,
              "corr_after": corr_after}  # fmt: skip
    if not nmi_after >= min_nmi:
        raise RegistrationRefused(
            f"registration failed: NMI inside the brain {nmi_after:.3f} after registration (before "
            f"{nmi_before:.3f}), below {min_nmi}; check that {followup.image} is this patient's and "
            "that its header's orientation is right"
        )
    masks: dict[str, np.ndarray] = {}
    for column, path in followup.masks.items():
        m = sitk.Cast(_binary(_read(path)), sitk.sitkFloat32)
        # a binary mask interpolated linearly and cut at 0.5: its edge moves smoothly, unlike nearest
        # neighbour's staircase, and no label other than 0 and 1 can appear
        on_fixed = _resample(m, fixed, transform, sitk.sitkLinear)
        arr = (sitk.GetArrayFromImage(on_fixed) >= 0.5).astype(np.uint8)
        masks[column] = arr.transpose(2, 1, 0)  # SimpleITK (Z, Y, X) -> nibabel (X, Y, Z)
    view = {"fixed": sitk.GetArrayFromImage(fixed).transpose(2, 1, 0),
            "moved": sitk.GetArrayFromImage(moved).transpose(2, 1, 0),
            "before": sitk.GetArrayFromImage(before).transpose(2, 1, 0)}  # fmt: skip
    return transform, masks, {**scores, "view": view}


def map_points_ras(transform, points_ras: np.ndarray) -> np.ndarray:
    """Pre-RT world points (N, 3), RAS mm, carried to the follow-up world by `transform` (RAS mm)."""
    flip = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    return np.array([np.asarray(transform.TransformPoint(tuple(float(v) for v in p * flip))) * flip
                     for p in np.asarray(points_ras, dtype=np.float64)])  # fmt: skip


# ------------------------------------------------------------------------------------------------ QC


def qc_figure(view: dict[str, np.ndarray], path: Path, title: str) -> None:
    """Three planes through the brain's centre: the pre-RT T1c with the registered follow-up's edges over
    it (after), and the same before registration (where the header put it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage as ndi

    from ctvlab.atomic import atomic_path

    fixed = view["fixed"]
    c = [s // 2 for s in fixed.shape]
    fig, axes = plt.subplots(2, 3, figsize=(9, 6), dpi=60)
    for row, key in enumerate(("before", "moved")):
        img = view[key]
        mag = np.hypot(*(ndi.sobel(img, a) for a in range(3)[:2])) + np.abs(ndi.sobel(img, 2))
        thr = np.percentile(mag[mag > 0], 90) if (mag > 0).any() else 1.0
        for col, axis in enumerate(range(3)):
            sl = [slice(None)] * 3
            sl[axis] = c[axis]
            ax = axes[row, col]
            ax.imshow(fixed[tuple(sl)].T, cmap="gray", origin="lower")
            edge = np.ma.masked_less(mag[tuple(sl)].T, thr)
            ax.imshow(edge, cmap="autumn", origin="lower", alpha=0.8)
            ax.set_axis_off()
            ax.set_title(f"{'before' if key == 'before' else 'after'}: {['sagittal', 'coronal', 'axial'][axis]}",
                         fontsize=9)  # fmt: skip
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# -------------------------------------------------------------------------------------------- cohort


def register_cohort(root: str | Path, settings: Settings = Settings(), min_nmi: float = MIN_NMI,
                    say=print) -> list[PatientResult]:  # fmt: skip
    """Register every declared follow-up of the cohort at `root` and point the manifest at the masks.

    One patient's failure (a refused registration, an unreadable file) is reported for it alone: nothing is
    written for that patient, the others go on. Masks and the QC figure are written atomically; the
    manifest is rewritten once, atomically, with the patients that registered. `register_report.json` and
    the figures go to `root/registration/`.

    Raises:
        DataError: the manifest cannot be read (nothing is touched).
    """
    import nibabel as nib

    from ctvlab.atomic import atomic_path, write_json_atomic
    from ctvlab.errors import DataError
    from ctvlab.ingest.manifest import read_manifest, write_manifest

    root = Path(root)
    rows, problems, _ = read_manifest(root)
    if problems:
        first = problems[0]
        where = f"line {first.line}: " if first.line else ""
        manifest = root / "manifest.csv"
        said = first.message if str(manifest) in first.message else f"{manifest}: {where}{first.message}"
        raise DataError(f"{said}; nothing was registered (ctvlab validate names every problem)")
    results: list[PatientResult] = []
    updated = []
    out_dir = root / "registration"
    ours, before = _previous_report(out_dir)
    for row in rows:
        pid = row.patient_id
        try:
            fu = find_followup(root, row.t1c)
        except ValueError as e:
            results.append(PatientResult(pid, "error", f"{pid}: {e}"))
            say(f"{pid}: error: {e}")
            updated.append(row)
            continue
        if fu is None:
            updated.append(row)
            continue
        taken = _not_ours(root, row, ours)
        if taken:
            results.append(PatientResult(pid, "refused", f"{pid}: {taken}"))
            say(f"{pid}: refused: {taken}")
            updated.append(row)
            continue
        exclude = pre_rt_exclusions(root, row)
        inputs = _inputs_digest([root / row.t1c, root / row.brain_mask, *exclude, fu.image,
                                 *fu.masks.values(), *([fu.lesion] if fu.lesion else [])], settings, min_nmi)  # fmt: skip
        last = before.get(pid)
        if last and _still_current(root, row, last, inputs, ours):
            results.append(PatientResult(**{**last, "status": "current"}))
            say(f"{pid}: current (its follow-up, its pre-RT images and the settings are unchanged)")
            updated.append(row)
            continue
        start = time.perf_counter()
        try:
            _, masks, scores = register_patient(
                root / row.t1c, root / row.brain_mask, exclude, fu, settings, min_nmi
            )
        except RegistrationRefused as e:
            msg = str(e).replace(f"{root}/", "")
            results.append(
                PatientResult(pid, "refused", f"{pid}: {msg}", seconds=time.perf_counter() - start)
            )
            say(f"{pid}: refused: {msg}")
            updated.append(row)
            continue
        except (
            ValueError,
            RuntimeError,
            OSError,
        ) as e:  # SimpleITK reports an unreadable file as RuntimeError
            # files named as the manifest and the folder name them: relative to the cohort
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0].replace(f"{root}/", "")
            results.append(PatientResult(pid, "error", f"{pid}: {msg}"))
            say(f"{pid}: error: {msg}")
            updated.append(row)
            continue
        affine = nib.load(root / row.t1c).affine
        res = PatientResult(pid, "registered", nmi_before=scores["nmi_before"], nmi_after=scores["nmi_after"],
                            corr_before=scores["corr_before"], corr_after=scores["corr_after"], inputs=inputs)  # fmt: skip
        # the figure first: a failure in it (fonts, a full disk) leaves this patient's masks as they were
        fig = out_dir / f"{pid}.png"
        qc_figure(scores["view"], fig, f"{pid}: NMI {res.nmi_before:.3f} before, {res.nmi_after:.3f} after")
        res.figure = fig.relative_to(root).as_posix()
        new = row.model_copy()
        for column, arr in masks.items():
            rel = (Path(row.t1c).parent / f"{column}.nii.gz").as_posix()
            img = nib.Nifti1Image(arr, affine)
            img.header.set_xyzt_units("mm")
            with atomic_path(root / rel) as tmp:
                nib.save(img, tmp)
            setattr(new, column, rel)
            res.written[column] = rel
            ours[rel] = sha256_file(root / rel)
        res.seconds = time.perf_counter() - start
        say(f"{pid}: registered, NMI {res.nmi_before:.3f} -> {res.nmi_after:.3f} ({res.seconds:.0f} s)")
        results.append(res)
        updated.append(new)
    if any(r.status == "registered" for r in results):
        # The cohort's manifest as it was before ctvlab first rewrote it, kept once.
        kept = out_dir / "manifest.before-register.csv"
        if not kept.exists():
            with atomic_path(kept) as tmp:
                shutil.copyfile(root / "manifest.csv", tmp)
        write_manifest(root, updated)
    if results:
        report = {"min_nmi": min_nmi, "patients": [r.__dict__ for r in results], "written": ours}
        write_json_atomic(out_dir / "register_report.json", report)
    return results


def _inputs_digest(paths: list[Path], settings: Settings, min_nmi: float) -> str:
    """One digest of the files a patient's registration reads and of how it registers them."""
    return digest({"settings": repr(settings), "min_nmi": min_nmi,
                   "files": [[p.name, sha256_file(p)] for p in paths]})  # fmt: skip


def _previous_report(out_dir: Path) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """From the last run's `register_report.json`: the masks `ctvlab register` has written (path relative to
    the cohort -> SHA-256; only those may be replaced) and each patient it registered or found current, as
    its entry recorded it. Empty when there is no readable report."""
    try:
        report = json.loads((out_dir / "register_report.json").read_text())
        written = report.get("written", {})
        patients = report.get("patients", [])
        ours = {str(k): str(v) for k, v in written.items()} if isinstance(written, dict) else {}
        return ours, {p["patient_id"]: p for p in patients if p.get("status") in ("registered", "current")}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}, {}


def _still_current(root: Path, row, last: dict[str, Any], inputs: str, ours: dict[str, str]) -> bool:
    """The patient's registration need not run again: the same inputs and settings, and the masks it wrote
    are still there unchanged and still named by the manifest."""
    if last.get("inputs") != inputs or not last.get("written"):
        return False
    for column, rel in last["written"].items():
        target = root / rel
        if getattr(row, column, None) != rel or not target.is_file() or ours.get(rel) != sha256_file(target):
            return False
    return True


def _not_ours(root: Path, row, ours: dict[str, str]) -> str:
    """Why registering this patient would replace a progression mask that `ctvlab register` did not write
    (one the manifest already names elsewhere, or a file at the path it writes to); "" when nothing would."""
    for column in MASK_NAMES:
        rel = (Path(row.t1c).parent / f"{column}.nii.gz").as_posix()
        named = getattr(row, column)
        if named and named != rel:
            return (
                f"the manifest already names {named} as its {column}; ctvlab register does not replace a "
                f"progression mask it did not write (clear that cell to register the follow-up instead)"
            )
        target = root / rel
        if target.exists() and ours.get(rel) != sha256_file(target):
            return (
                f"{rel} exists and was not written by ctvlab register (or was changed since); move it away "
                "to register the follow-up: ctvlab never replaces a file it did not write"
            )
    return ""
