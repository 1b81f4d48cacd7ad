"""`ctvlab predict`: apply a trained model to new patients and write their CTVs on the native T1c grid.

For each patient of a cohort folder (its manifest may leave the outcome columns and progression masks
empty; `ctvlab validate --for predict` checks it): the 3 mm inputs by the preprocessing of the study
(`ctvlab.preprocess.prepare.prepare_arrays`), the probability from the network on the input grid it was
trained on (`ctvlab.unet.inference`), then, on the patient's native T1c grid:

- `probability.nii.gz`: the probability resampled (trilinear) from the 3 mm grid;
- `ctv_model.nii.gz`, `ctv_rtog.nii.gz`, `ctv_eortc.nii.gz`: the CTVs built on the native grid
  (`ctvlab.ctv.construct.build_ctvs`) from the resampled probability and the native masks, so that
  contours follow the native voxels instead of 3 mm steps; margins in mm of the native spacing;
- `probability_tta_mean.nii.gz`, `probability_tta_sd.nii.gz` (with `ctv.uncertainty: tta`, the default):
  the probability's mean and standard deviation over the eight mirrored inputs, a per-voxel uncertainty;
- `ctv_cov90.nii.gz`, ... : the model CTV at each coverage threshold the model records (chosen on its
  validation patients by conformal risk control, `ctvlab.stages.calibrate`): nested CTVs, each with a mean
  coverage of the new progression guaranteed on patients like those;
- `overlay.png`: axial slices of the T1c with the three contours;
- `report.json`: CTV volumes, the threshold and where it came from, the model URI and version, and the
  sha256 of every input file;
- with a planning series (`--rtstruct --dicom-ref`): `rtstruct.dcm`, the CTVs as ROIs `CTV_model`,
  `CTV_RTOG`, `CTV_EORTC` (and `CTV_cov90`, ...) on that series' frame of reference (`ctvlab.dicom.rtstruct`), labelled a research
  model's, unapproved, each ROI naming what drew it; and `probability.dcm`, the probability as a DICOM
  Parametric Map on the same series (`ctvlab.dicom.parametric`). Before anything is predicted, every patient's planning
  series must be that patient's: the PatientID, Patient's Name, study and frame of reference recorded when
  the cohort was imported (`ctvlab import-dicom`'s provenance.json), else the manifest's PatientID
  (`ctvlab.dicom.planning.planning_identity`).

Locally the patients run one after another in this process; given a Ray cluster (`--address`, or inside a
submitted job) each patient is a Ray task, with the model shared through the object store.

Every NIfTI carries the T1c's affine and qform/sform codes. A patient's folder is written under a
temporary name and swapped in when complete (`ctvlab.atomic.atomic_folder`); a patient that fails is reported and skipped.

About 420 lines: the per-patient prediction, its DICOM output and the Ray fan-out share the resolved model
and the report; the identity checks live in `ctvlab.dicom.planning`.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctvlab.atomic import atomic_folder, sha256_file, write_json_atomic
from ctvlab.config import PreprocessConfig, StudyConfig
from ctvlab.dicom.planning import planning_identity, planning_series
from ctvlab.errors import ConfigError, CtvlabError, DataError
from ctvlab.unet.inference import LoadedModel, load_model, predict_arrays

DEFAULT_MODEL_URI = "models:/ctvlab-unet@champion"
# Used only when neither --threshold nor the model's spec gives one (a model that records no threshold
# chosen on its validation patients).
FALLBACK_THRESHOLD = 0.5
# What report.json repeats from the model's spec: enough to tell which model and data made the CTVs.
MODEL_FIELDS = (
    "modality_set",
    "base_features",
    "input_shape",
    "split_digest",
    "dataset_digest",
    "salt_fingerprint",
)
RTSTRUCT_FILE = "rtstruct.dcm"
PARAMETRIC_FILE = "probability.dcm"  # the probability as a DICOM Parametric Map, with --rtstruct
RTSTRUCT_LABEL = "RESEARCH CTV"  # StructureSetLabel (SH, 16 characters): a research model's, unapproved
ROI_NAMES = {"model": "CTV_model", "rtog": "CTV_RTOG", "eortc": "CTV_EORTC"}
OUTPUT_FILES = ("probability.nii.gz", "ctv_model.nii.gz", "ctv_rtog.nii.gz", "ctv_eortc.nii.gz",
                "overlay.png", "report.json", "probability_tta_mean.nii.gz", "probability_tta_sd.nii.gz")  # fmt: skip


@dataclass
class ResolvedModel:
    model: LoadedModel
    uri: str
    version: str | None
    threshold: float
    threshold_source: str


@dataclass
class PredictionOutcome:
    out_dir: Path
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds_per_patient: float = float("nan")


def resolve_model(
    model_uri: str, tracker_factory, threshold: float | None = None, device: str | None = None
) -> ResolvedModel:
    """Load the model behind a local folder, `models:/name/version|latest`, `models:/name@alias` or
    `runs:/id/path`; `tracker_factory()` gives the `ctvlab.tracking.Tracker` for registry URIs."""
    version = None
    with tempfile.TemporaryDirectory() as dl:
        if Path(model_uri).is_dir():
            folder = Path(model_uri)
        else:
            tracker = tracker_factory()
            try:
                if model_uri.startswith("models:/"):
                    version = str(tracker.model_version(model_uri).version)
                folder = tracker.download_model(model_uri, dl)
            except Exception as e:
                raise CtvlabError(
                    f"cannot load model {model_uri} from {tracker.tracking_uri}: {e}. Give --model with a "
                    "registered version (models:/ctvlab-unet/3), alias, runs:/ URI or a model folder."
                ) from None
        model = load_model(folder, device)
    if threshold is not None:
        source = "--threshold"
    elif model.spec.get("threshold") is not None:
        threshold, source = float(model.spec["threshold"]), "the model's validation threshold"
    else:
        threshold, source = FALLBACK_THRESHOLD, "default (the model records no validation threshold)"
    return ResolvedModel(model, model_uri, version, float(threshold), source)


def preprocess_for(spec: dict[str, Any], configured: PreprocessConfig) -> tuple[PreprocessConfig, str]:
    """The preprocessing a new patient gets for this model: the settings its training data had (the model's
    `preprocess`), with the configured execution settings (CPUs). A setting the config gives explicitly that
    differs from the model's is an error; a model that records none (made before it did) takes the config's.

    Raises:
        ConfigError: an explicit setting conflicts with the model's.
    """
    recorded = spec.get("preprocess")
    if not recorded:
        return configured, "the config (the model records no preprocessing)"
    from ctvlab.preprocess.prepare import EXECUTION_FIELDS

    own = {
        k: v for k, v in recorded.items() if k in PreprocessConfig.model_fields and k not in EXECUTION_FIELDS
    }
    explicit = configured.model_fields_set
    conflicts = [f"preprocess.{k}: the model's {v}, the config's {getattr(configured, k)}"
                 for k, v in own.items() if k in explicit and getattr(configured, k) != v]  # fmt: skip
    if conflicts:
        raise ConfigError(
            "the model was trained on data prepared otherwise than the config says ("
            + "; ".join(conflicts)
            + "): leave these settings out (the model's are used) or predict with a model trained on them"
        )
    return configured.model_copy(update=own), "the model"


def _native_image(data: np.ndarray, t1c, dtype) -> Any:
    """A NIfTI image of `data` with the T1c's affine, qform and sform (and their codes)."""
    import nibabel as nib

    header = t1c.header.copy()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), t1c.affine, header)
    img.set_qform(t1c.get_qform(), code=int(t1c.header["qform_code"]))
    img.set_sform(t1c.get_sform(), code=int(t1c.header["sform_code"]))
    img.header.set_slope_inter(1.0, 0.0)
    return img


def _native_masks(row, raw_root: Path, t1c) -> dict[str, np.ndarray]:
    """The masks the CTVs need, on the T1c grid (resampled when a mask comes on another grid)."""
    import nibabel as nib

    from ctvlab.preprocess.grid import resample_mask
    from ctvlab.preprocess.prepare import MASK_SOURCES

    paths = row.paths(raw_root)
    out = {}
    for name in ("brain", "cel", "t2l", "cavity", "critical"):
        path = paths[MASK_SOURCES[name]]
        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj).reshape(img.shape[:3]) > 0.5
        except Exception as e:
            raise DataError(f"patient {row.patient_id}: {MASK_SOURCES[name]} file {path}: {e}") from None
        if img.shape[:3] == t1c.shape[:3] and np.allclose(img.affine, t1c.affine, atol=1e-4):
            out[name] = data
        else:
            out[name] = resample_mask(data, img.affine, t1c.affine, tuple(t1c.shape[:3]))
    return out


@dataclass
class NativeCTVs:
    """A patient's CTVs as delivered, on its own T1c grid."""

    t1c: Any  # the T1c image (nibabel)
    prob: np.ndarray  # the probability, resampled to the T1c grid, zero outside the brain
    masks: dict[str, np.ndarray]  # brain, cel, t2l, cavity, critical on the T1c grid
    spacing: tuple[float, float, float]
    ctvs: dict[str, np.ndarray]  # model, rtog, eortc and the coverage CTVs


def native_ctvs(
    prob3: np.ndarray,
    affine3: np.ndarray,
    row,
    raw_root: Path,
    threshold: float,
    ctv_rules: dict[str, Any] | None,
    cfg: StudyConfig,
) -> NativeCTVs:
    """The CTVs on the patient's T1c grid, built one way for `ctvlab predict` and the evaluation alike.

    The probability of the prepared grid is resampled (trilinear) to the T1c grid, so the model CTV is a
    level set of a smooth map there; the masks are the cohort's own files on that grid; the CTVs are built
    there with margins in mm of its spacing (`construct.build_ctvs`), the coverage CTVs at the thresholds of
    `ctv_rules` (a model's `ctv` record, or the evaluation's calibration), and each is then made deliverable
    (`construct.deliverable`: no piece or hole smaller than one prepared voxel).

    Args:
        prob3, affine3: the probability on the prepared grid and that grid's affine.
        row, raw_root: the patient's manifest row and cohort folder.
        threshold: the model CTV's threshold.
        cfg: `ctv` (margins) and `preprocess.voxel_mm` (the prepared voxel).
    """
    import nibabel as nib

    from ctvlab.ctv.construct import build_ctvs, deliverable
    from ctvlab.preprocess.grid import resample

    t1c = nib.load(str(row.paths(raw_root)["t1c"]))
    shape = tuple(int(n) for n in t1c.shape[:3])
    prob = np.clip(resample(prob3, affine3, t1c.affine, shape), 0.0, 1.0).astype(np.float32)
    masks = _native_masks(row, raw_root, t1c)
    prob *= masks["brain"]
    spacing = tuple(float(s) for s in np.linalg.norm(t1c.affine[:3, :3], axis=0))
    ctvs = build_ctvs(prob, threshold, masks, spacing, cfg.ctv)
    ctvs.update(coverage_level_ctvs(prob, masks, {"ctv": ctv_rules or {}}))
    allowed = masks["brain"] & ~masks["critical"]
    made = float(cfg.preprocess.voxel_mm) ** 3
    ctvs = {n: deliverable(c, spacing, made, allowed) for n, c in ctvs.items()}
    return NativeCTVs(t1c, prob, masks, spacing, ctvs)  # type: ignore[arg-type]


def prediction_needs(modality_set: str | None) -> tuple[str, ...]:
    """The manifest columns a patient to predict must give beyond the always-required ones: the masks the
    CTVs use (the cavity for EORTC, the critical structures removed from every CTV, the ventricles of the
    normal-appearing brain the maps are normalised on) and the diffusion maps the model's inputs hold."""
    from ctvlab.data.layout import MODALITY_SETS
    from ctvlab.ingest.validate import PREDICTION_MASKS
    from ctvlab.preprocess.prepare import FEATURE_SOURCES

    channels = MODALITY_SETS.get(modality_set or "all", MODALITY_SETS["all"])
    maps = tuple(FEATURE_SOURCES[c] for c in channels if FEATURE_SOURCES[c] in ("adc", "fa"))
    return (*PREDICTION_MASKS, *maps)


def predict_patient(
    row,
    raw_root: Path,
    resolved: ResolvedModel,
    cfg: StudyConfig,
    dst: Path,
    series_dir: Path | None = None,
    expect=None,
) -> dict[str, Any]:
    """Predict one patient and write its files into the empty folder `dst`; return its report. With a
    planning series, `expect` is the identity it must have (`planning_identity`)."""
    import nibabel as nib

    from ctvlab.ctv.figures import plot_contours
    from ctvlab.preprocess.grid import resample
    from ctvlab.preprocess.prepare import prepare_arrays

    raw_root = Path(raw_root)
    pid = row.patient_id
    t0 = time.perf_counter()
    arrays = prepare_arrays(row, raw_root, cfg.preprocess)
    prob3 = predict_arrays(
        resolved.model, arrays.features, arrays.mask("brain"), arrays.mask("t2l"), arrays.spacing
    )
    t_net = time.perf_counter() - t0

    native = native_ctvs(
        prob3, arrays.affine, row, raw_root, resolved.threshold, resolved.model.spec.get("ctv"), cfg
    )
    t1c, prob, masks, spacing, ctvs = native.t1c, native.prob, native.masks, native.spacing, native.ctvs
    shape = tuple(int(n) for n in t1c.shape[:3])

    nib.save(_native_image(prob, t1c, np.float32), dst / "probability.nii.gz")
    if cfg.ctv.uncertainty == "tta":  # mean and spread over mirrored inputs, on the T1c grid
        from ctvlab.unet.inference import predict_with_spread

        maps3 = predict_with_spread(resolved.model, arrays.features, arrays.mask("brain"), arrays.mask("t2l"),
                                    arrays.spacing)  # fmt: skip
        for name, m3 in zip(("probability_tta_mean", "probability_tta_sd"), maps3, strict=True):
            native = np.clip(resample(m3, arrays.affine, t1c.affine, shape), 0.0, 1.0) * masks["brain"]
            nib.save(_native_image(native.astype(np.float32), t1c, np.float32), dst / f"{name}.nii.gz")
    for name, ctv in ctvs.items():
        nib.save(_native_image(ctv, t1c, np.uint8), dst / f"ctv_{name}.nii.gz")
    background = np.asarray(t1c.get_fdata(dtype=np.float32)).reshape(shape)
    lesion = masks["cel"] | masks["t2l"]
    plot_contours(background, ctvs, lesion, dst / "overlay.png", f"patient {pid}: CTVs (pre-RT lesion hatched)",
                  spacing=spacing, lesion=lesion)  # fmt: skip
    voxel_cm3 = float(np.prod(spacing)) / 1000.0
    report = {
        "patient_id": pid,
        "model_uri": resolved.uri,
        "model_version": resolved.version,
        "model": {k: resolved.model.spec.get(k) for k in MODEL_FIELDS},
        "threshold": resolved.threshold,
        "threshold_source": resolved.threshold_source,
        "volumes_cm3": {name: float(ctv.sum()) * voxel_cm3 for name, ctv in ctvs.items()},
        "grid": {"shape": list(shape), "spacing_mm": list(spacing), "affine": t1c.affine.tolist()},
        "inputs_sha256": {c: sha256_file(p) for c, p in sorted(row.paths(raw_root).items())},
        "seconds": {"network": round(t_net, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    if series_dir is not None:
        from ctvlab.dicom.rtstruct import write_rtstruct

        try:
            ref = write_rtstruct(series_dir, {roi_name(n): c for n, c in ctvs.items()}, t1c.affine,
                                 dst / RTSTRUCT_FILE, description=f"ctvlab research CTVs ({resolved.uri})",
                                 expect=expect, patient=pid, label=RTSTRUCT_LABEL,
                                 algorithms=roi_algorithms(resolved, cfg))  # fmt: skip
        except CtvlabError as e:
            message = (
                str(e)
                if str(e).startswith(f"patient {pid}")
                else f"patient {pid}: RTSTRUCT on {series_dir}: {e}"
            )
            raise DataError(message) from None
        report["rtstruct"] = {"file": RTSTRUCT_FILE, "planning_folder": str(series_dir), **ref,
                              "rois": [roi_name(n) for n, c in ctvs.items() if c.any()]}  # fmt: skip
        from ctvlab import __version__
        from ctvlab.dicom.parametric import write_parametric_map

        try:  # the probability beside the structures, on the same series (a DICOM Parametric Map)
            write_parametric_map(series_dir, prob, t1c.affine, dst / PARAMETRIC_FILE, expect=expect, patient=pid,
                                 software=f"ctvlab {__version__}")  # fmt: skip
        except CtvlabError as e:
            raise DataError(f"patient {pid}: parametric map on {series_dir}: {e}") from None
        report["parametric_map"] = {"file": PARAMETRIC_FILE, "unit": "probability (no units), 0 to 1"}
    write_json_atomic(dst / "report.json", report)
    return report


def roi_name(ctv: str) -> str:
    """The RTSTRUCT ROI of a CTV: CTV_model, CTV_RTOG, CTV_EORTC, and CTV_cov95 for a coverage CTV."""
    return ROI_NAMES.get(ctv, f"CTV_{ctv}")


def coverage_level_ctvs(
    prob: np.ndarray, masks: dict[str, np.ndarray], spec: dict[str, Any]
) -> dict[str, np.ndarray]:
    """The model CTV at each coverage threshold the model records (`cov90`, ...; see
    `ctvlab.stages.calibrate`): nested CTVs, each guaranteeing its mean coverage on patients like the
    model's validation patients."""
    from ctvlab.ctv.construct import model_ctv
    from ctvlab.stages.calibrate import coverage_thresholds

    lesion = masks["cel"] | masks["t2l"]
    return {name: model_ctv(prob, t, lesion, masks["brain"], masks["critical"])
            for name, t in coverage_thresholds(spec.get("ctv")).items()}  # fmt: skip


def roi_algorithms(resolved: ResolvedModel, cfg: StudyConfig) -> dict[str, tuple[str, str]]:
    """Each ROI's ROIGenerationAlgorithm and ROIGenerationDescription (LO, at most 64 characters): what drew
    it. The model is named by its registered version, else by the MLflow run that trained it, else by its
    folder's name."""
    from ctvlab import __version__
    from ctvlab.stages.calibrate import coverage_thresholds

    model = Path(resolved.uri).name
    if resolved.version and resolved.uri.startswith("models:/"):  # the registered version, not an alias
        model = f"models:/{re.split(r'[/@]', resolved.uri[len('models:/') :])[0]}/{resolved.version}"
    elif resolved.uri.startswith("runs:/"):
        model = resolved.uri
    elif resolved.model.spec.get("mlflow_run_id"):
        model = f"runs:/{resolved.model.spec['mlflow_run_id']}"
    return {
        "CTV_model": ("AUTOMATIC", f"ctvlab {__version__} U-Net {model}"[:64]),
        "CTV_RTOG": ("AUTOMATIC", f"ctvlab {__version__} RTOG rule, {cfg.ctv.rtog_margin_mm:g} mm margin"[:64]),
        "CTV_EORTC": ("AUTOMATIC", f"ctvlab {__version__} EORTC rule, {cfg.ctv.eortc_margin_mm:g} mm margin"[:64]),
        **{roi_name(name): ("AUTOMATIC", f"ctvlab {__version__} {name} conformal, {model}"[:64])
           for name in coverage_thresholds(resolved.model.spec.get("ctv"))},
    }  # fmt: skip


def predict_into(row, raw: Path, resolved: ResolvedModel, cfg: StudyConfig, out: Path,
                 series_dir: Path | None, expect=None) -> str | None:  # fmt: skip
    """Predict one patient into `out/<patient_id>/` (written under a temporary name, then renamed); the
    reason it failed, or None."""
    pid = row.patient_id
    try:
        with atomic_folder(out / pid) as tmp:  # replaces this patient's earlier prediction when complete
            predict_patient(row, raw, resolved, cfg, tmp, series_dir, expect)
    except (CtvlabError, ValueError, OSError) as e:
        return str(e) if str(e).startswith(f"patient {pid}") else f"patient {pid}: {e}"
    return None


def _predict_task(row, raw: Path, resolved: ResolvedModel, cfg: StudyConfig, out: Path,
                  series_dir: Path | None, expect=None) -> tuple[str, str | None]:  # fmt: skip
    return row.patient_id, predict_into(row, raw, resolved, cfg, out, series_dir, expect)


def predict_cohort(
    raw: Path,
    out: Path,
    cfg: StudyConfig,
    *,
    model_uri: str = DEFAULT_MODEL_URI,
    patients: Sequence[str] | None = None,
    threshold: float | None = None,
    device: str | None = None,
    progress: bool = True,
    console=None,
    dicom_ref: Path | None = None,
) -> PredictionOutcome:
    """Predict every patient (or the chosen ones) of the cohort `raw` into `out/<patient_id>/`.

    Raises:
        CtvlabError: the manifest cannot be read, a chosen patient is not in it, the model cannot be
            loaded, or (with `dicom_ref`) a patient's planning series is missing, unreadable or not that
            patient's (`planning_identity`): then nothing is predicted and nothing written. A patient whose
            files fail is recorded in `failed` and skipped.
    """
    from ctvlab.ingest.manifest import read_manifest

    raw, out = Path(raw).resolve(), Path(out).resolve()
    rows, problems, ids = read_manifest(raw, "predict")
    if not ids and problems:
        raise DataError(f"{raw}: {problems[0].message}")
    by_id = {r.patient_id: r for r in rows}
    wanted = list(patients) if patients else ids
    unknown = [p for p in wanted if p not in ids]
    if unknown:
        raise DataError(f"{raw / 'manifest.csv'}: no patient {', '.join(unknown)}")

    def tracker():
        from ctvlab.tracking import Tracker

        return Tracker(cfg.tracking.experiment or cfg.name, cfg.tracking.tracking_uri)

    outcome = PredictionOutcome(out)
    todo, refused = [], []
    provenance = {}
    if dicom_ref is not None:
        from ctvlab.dicom.importer import read_provenance

        if not Path(dicom_ref).is_dir():
            raise DataError(f"--dicom-ref {dicom_ref} is {'a file' if Path(dicom_ref).exists() else 'not found'}: "
                            "give the folder of the planning series (or of one <patient_id>/ folder per patient)")  # fmt: skip
        provenance = read_provenance(raw)
    for pid in wanted:
        row = by_id.get(pid)
        if row is None:
            why = "; ".join(f"{p.column}: {p.message}" for p in problems if p.patient_id == pid)
            outcome.failed[pid] = f"patient {pid}: {raw / 'manifest.csv'}: {why or 'row cannot be read'}"
            continue
        series, expect = None, None
        if dicom_ref is not None:
            # Whose series it is, for every patient before anything is predicted or written: an RTSTRUCT
            # on another patient's series is the one output that must never exist.
            try:
                series = planning_series(dicom_ref, pid, len(wanted))
                expect = planning_identity(row, raw, provenance, series)
            except DataError as e:
                refused.append(str(e))
                continue
        todo.append((row, series, expect))
    if refused:
        raise DataError(f"--dicom-ref {dicom_ref}: nothing was predicted: " + " | ".join(refused))
    resolved = resolve_model(model_uri, tracker, threshold, device)
    needs = prediction_needs(resolved.model.spec.get("modality_set"))
    for row, *_ in list(todo):
        missing = row.missing(needs)
        if missing:  # this patient only: the others are predicted
            outcome.failed[row.patient_id] = (
                f"patient {row.patient_id}: {', '.join(missing)} not available; the model's inputs and the "
                "CTVs (critical structures removed, the EORTC cavity) need them: give them in manifest.csv"
            )
    todo = [t for t in todo if t[0].patient_id not in outcome.failed]
    preprocess, preprocess_source = preprocess_for(resolved.model.spec, cfg.preprocess)
    cfg = cfg.model_copy(update={"preprocess": preprocess})
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if cfg.ray.address:
        results = _on_ray(todo, raw, resolved, cfg, out, device, progress, console)
    else:
        results = ((r.patient_id, predict_into(r, raw, resolved, cfg, out, s, x))
                   for r, s, x in _progress(todo, progress, console))  # fmt: skip
    for pid, failure in results:
        if failure is None:
            outcome.done.append(pid)
        else:
            outcome.failed[pid] = failure  # reported by `print_prediction`; the other patients go on
    if outcome.done:
        outcome.seconds_per_patient = (time.perf_counter() - t0) / len(outcome.done)
    write_json_atomic(out / "predict.json", {
        "model_uri": resolved.uri, "model_version": resolved.version, "threshold": resolved.threshold,
        "preprocess": {"source": preprocess_source, "voxel_mm": preprocess.voxel_mm, "ring_mm": preprocess.ring_mm},
        "done": outcome.done, "failed": outcome.failed,
    })  # fmt: skip
    return outcome


def _on_ray(todo, raw, resolved, cfg, out, device, progress, console):
    """One Ray task per patient on the cluster at `cfg.ray.address`; the model goes once into the object
    store. Yields (patient_id, failure) as tasks finish."""
    import ray

    from ctvlab.runtime import init_ray

    init_ray(cfg.ray.address)
    gpus = 1 if (device or "").startswith("cuda") else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(_predict_task)
    model_ref = ray.put(resolved)
    owner = {task.remote(row, raw, model_ref, cfg, out, series, expect): row.patient_id
             for row, series, expect in todo}  # fmt: skip
    pending = list(owner)
    for _ in _progress(list(range(len(pending))), progress, console):
        (done,), pending = ray.wait(pending, num_returns=1)
        try:
            yield ray.get(done)
        except ray.exceptions.RayError as e:  # the task's worker died (after its retry): this patient only
            yield owner[done], f"patient {owner[done]}: its Ray task failed: {str(e).splitlines()[0]}"


def _progress(items, enabled: bool, console):
    if not enabled:
        yield from items
        return
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("predicting", total=len(items))
        for it in items:
            yield it
            bar.advance(task)


def print_prediction(outcome: PredictionOutcome, console) -> None:
    console.print(f"predicted {len(outcome.done)} patient(s) into {outcome.out_dir} "
                  f"({outcome.seconds_per_patient:.1f} s per patient)")  # fmt: skip
    for msg in outcome.failed.values():
        console.print(f"[red]failed:[/] {msg}")
