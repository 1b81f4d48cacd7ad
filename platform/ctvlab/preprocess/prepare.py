"""One patient end to end: native NIfTI files in, prepared volumes, voxel rows and a sidecar out.

`prepare_arrays` is the computation (pure: files in, arrays out); `write_outputs` writes them atomically
with the sidecar last; `preprocess_patient` does both; `process_or_skip` is what each Ray task runs: it
hashes the inputs, skips a patient whose outputs are current, and turns any failure into a result row
instead of an exception.

Order of writes (each file under a temporary name, then renamed): the old sidecar is removed first, then
volumes/<id>.npy, volumes/<id>_masks.npy, voxels/patient_id=<id>/, and the sidecar volumes/<id>.json
last. A sidecar whose input_hash and settings_hash match the current inputs and settings therefore
means the patient is complete; killing a run at any point leaves complete files, at worst a patient
without a sidecar, which the next run redoes.

About 450 lines: one patient's preparation is one sequence (resample, regions, normalise, tables, files),
kept in one module so that its order and its failure handling read in one place.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctvlab import __version__
from ctvlab.atomic import atomic_folder, digest, save_npy_atomic, sha256_file, write_json_atomic
from ctvlab.config import PreprocessConfig
from ctvlab.data.layout import (
    CATEGORIES,
    CATEGORY_CODES,
    MASKS,
    PREPARED_FORMAT,
    PrepPaths,
    voxel_table_schema,
)
from ctvlab.errors import DataError, storage_error
from ctvlab.ingest.manifest import CLINICAL_COLUMNS, PROGRESSION_MASK_COLUMNS, ManifestRow
from ctvlab.preprocess import regions
from ctvlab.preprocess.grid import (
    reference_grid,
    resample,
    resample_mask,
    resample_with_coverage,
    source_coords,
)
from ctvlab.preprocess.normalize import INDEX_FEATURES, NAVModeError, normalise_to_nav
from ctvlab.study import FEATURES

__all__ = [
    "FEATURE_SOURCES",
    "MASK_SOURCES",
    "PreparedArrays",
    "input_hash",
    "is_current",
    "is_infrastructure_error",
    "prepare_arrays",
    "preprocess_patient",
    "process_or_skip",
    "settings_hash",
    "write_outputs",
]

# Manifest column of each feature channel, in FEATURES order.
FEATURE_SOURCES: dict[str, str] = {
    "nT1c": "t1c", "nT1": "t1", "nFLAIR": "flair", "nADC": "adc", "nFA": "fa",
    "nCho": "cho", "nCre": "cre", "nNAA": "naa", "nLac": "lac", "nLip": "lip",
    "CNI": "cni", "CCrI": "ccri", "CrNI": "crni",
}  # fmt: skip
MRSI_SOURCES: frozenset[str] = frozenset(("cho", "cre", "naa", "lac", "lip", "cni", "ccri", "crni"))
# Manifest column of each binary mask channel that comes straight from an input file.
MASK_SOURCES: dict[str, str] = {
    "brain": "brain_mask", "cel": "cel_mask", "t2l": "t2l_mask", "cavity": "cavity_mask",
    "ventricles": "ventricles_mask", "critical": "critical_mask",
    "cel_prog": "cel_progression_mask", "t2l_prog": "t2l_progression_mask",
}  # fmt: skip
# What the study's prepared data cannot do without: the clinical fields fill patients.parquet and the voxel
# tables (split strata, early/late progressors); the progression masks make the voxel categories and the
# U-Net target; the cavity and the ventricles are cut from normal-appearing brain (NAV, the normalisation's
# reference) and the cavity and the critical structures shape the standard CTVs. A patient without one is
# refused by name (prediction checks its own needs: `stages.predict.prediction_needs`).
STUDY_NEEDS: tuple[str, ...] = (
    *CLINICAL_COLUMNS[1:], *PROGRESSION_MASK_COLUMNS, "cavity_mask", "ventricles_mask", "critical_mask",
)  # fmt: skip
# Settings that change how a run is scheduled, not what it writes: left out of the settings hash.
EXECUTION_FIELDS: frozenset[str] = frozenset(("cpus_per_patient", "max_concurrent_patients"))
VOXEL_FILE = "part-0.parquet"
# The four categories of the study; the rest of the ring is "other".
_FOUR = ("NAV->NAV", "NAV->NEL", "NAV->CEL", "NEL->CEL")


def output_settings(cfg: PreprocessConfig) -> dict[str, Any]:
    """The settings that determine the prepared files (execution settings left out), with the layout's
    version."""
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in EXECUTION_FIELDS}
    return {"prepared_format": PREPARED_FORMAT, **settings}


def settings_hash(cfg: PreprocessConfig) -> str:
    return digest(output_settings(cfg))


def input_hash(row: ManifestRow, raw_root: Path) -> str:
    """sha256 over the manifest row (JSON) and the sha256 of every input file's bytes, by column.

    Raises:
        DataError: an input file is missing.
    """
    h = hashlib.sha256(row.model_dump_json().encode("utf-8"))
    for column, path in sorted(row.paths(Path(raw_root)).items()):
        try:
            file_hash = sha256_file(path)
        except FileNotFoundError:
            raise DataError(
                f"patient {row.patient_id}: {column} file {path} is missing; fix the manifest or restore "
                "the file"
            ) from None
        h.update(f"{column}:{file_hash}\n".encode())
    return h.hexdigest()


@dataclass
class PreparedArrays:
    """A patient on the prepared grid. features (13, X, Y, Z) float32; masks (M, X, Y, Z) uint8."""

    features: np.ndarray
    masks: np.ndarray
    affine: np.ndarray
    native_affine: np.ndarray
    native_shape: tuple[int, int, int]
    nav_modes: dict[str, float | None] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.features.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.diag(self.affine)[:3])  # type: ignore[return-value]

    def mask(self, name: str) -> np.ndarray:
        return self.masks[MASKS.index(name)]


def open_nifti(path: Path):
    """A NIfTI-1/2 image read by its content, not its name: gzip when the bytes say so, whatever the
    extension (validation reports a misnamed file; preprocessing still reads what is there)."""
    import gzip

    import nibabel as nib

    from ctvlab.ingest.safety import nifti_class

    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return (nifti_class(raw) or nib.Nifti1Image).from_bytes(raw)  # not NIfTI: nibabel says why


def _load_nifti(row: ManifestRow, column: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data float32 (X, Y, Z), affine) of one input file."""
    try:
        img = open_nifti(path)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except FileNotFoundError:
        raise DataError(f"patient {row.patient_id}: {column} file {path} is missing") from None
    except Exception as e:
        if is_infrastructure_error(e):
            raise  # the disk or the share failed, not the file's content
        raise DataError(
            f"patient {row.patient_id}: {column} file {path} cannot be read as NIfTI: {e}"
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(
            f"patient {row.patient_id}: {column} file {path} has shape {data.shape}; a 3-D volume is needed"
        )
    return data, np.asarray(img.affine, dtype=np.float64)


def prepare_arrays(row: ManifestRow, raw_root: Path, cfg: PreprocessConfig) -> PreparedArrays:
    """Resample, normalise and derive the regions of one patient (nothing is written).

    1. The reference grid (`grid.reference_grid`) over the brain mask's world box + `bbox_margin_mm`.
    2. Masks: trilinear, then `≥ mask_threshold`; a mask the manifest leaves empty is all 0. Anatomy and
       diffusion: trilinear, 0 outside their grid; a diffusion map the manifest leaves empty is NaN. MRSI: trilinear with coverage (`grid.resample_with_coverage`), NaN where coverage <
       `mrsi_coverage_threshold`; a voxel has MRSI when every map has it. No MRSI: every MRSI channel NaN.
    3. Regions (`regions`), the ring, the target and the voxel categories on the 3 mm grid.
    4. Every intensity map divided by its NAV mode (`normalize.nav_mode`; for MRSI over NAV voxels with
       MRSI); CNI, CCrI, CrNI kept as they are.

    Raises:
        DataError: a file is missing or unreadable, the brain mask or the pre-RT T2L is empty on the
            prepared grid, or a NAV mode cannot be estimated; the message names the patient and map.
    """
    raw_root = Path(raw_root)
    paths = row.paths(raw_root)
    pid = row.patient_id

    brain_native, brain_aff = _load_nifti(row, "brain_mask", paths["brain_mask"])
    if not (brain_native > 0.5).any():
        raise DataError(f"patient {pid}: brain mask {paths['brain_mask']} is empty")
    affine, shape = reference_grid(brain_native > 0.5, brain_aff, cfg.voxel_mm, cfg.bbox_margin_mm)
    del brain_native

    t1c_img = open_nifti(paths["t1c"])
    native_affine = np.asarray(t1c_img.affine, dtype=np.float64)
    native_shape = tuple(int(n) for n in t1c_img.shape[:3])

    coords_of: dict[bytes, np.ndarray] = {}

    def coords(src_affine: np.ndarray) -> np.ndarray:
        """Source coordinates of the output grid, shared by every map on the same source grid."""
        key = src_affine.tobytes()
        if key not in coords_of:
            coords_of[key] = source_coords(src_affine, affine, shape)
        return coords_of[key]

    masks: dict[str, np.ndarray] = {}
    for name, column in MASK_SOURCES.items():
        if column not in paths:  # a progression mask of a patient to predict: no follow-up yet
            masks[name] = np.zeros(shape, dtype=bool)
            continue
        data, aff = _load_nifti(row, column, paths[column])
        masks[name] = resample_mask(data > 0.5, aff, affine, shape, cfg.mask_threshold, coords(aff))
    brain = masks["brain"]
    if not brain.any():
        raise DataError(f"patient {pid}: the brain mask is empty on the {cfg.voxel_mm} mm grid")

    features = np.full((len(FEATURES), *shape), np.nan, dtype=np.float32)
    mrsi_valid = np.zeros(shape, dtype=bool)
    if row.has_mrsi:
        mrsi_valid[:] = True
        for c, name in enumerate(FEATURES):
            column = FEATURE_SOURCES[name]
            if column in MRSI_SOURCES:
                data, aff = _load_nifti(row, column, paths[column])
                features[c], valid = resample_with_coverage(
                    data, aff, affine, shape, cfg.mrsi_coverage_threshold, coords(aff)
                )
                mrsi_valid &= valid
        for c, name in enumerate(FEATURES):
            if FEATURE_SOURCES[name] in MRSI_SOURCES:
                features[c][~mrsi_valid] = np.nan
    for c, name in enumerate(FEATURES):
        column = FEATURE_SOURCES[name]
        if column not in MRSI_SOURCES and column in paths:  # a missing ADC or FA stays NaN, like MRSI
            data, aff = _load_nifti(row, column, paths[column])
            finite = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
            features[c] = resample(finite, aff, affine, shape, coords=coords(aff))

    nav = regions.nav(brain, masks["cavity"], masks["ventricles"], masks["t2l"], masks["cel"])
    nel = regions.nel(masks["t2l"], masks["cel"])
    spacing = (cfg.voxel_mm,) * 3
    if not masks["t2l"].any():
        raise DataError(
            f"patient {pid}: the pre-RT T2L mask {paths['t2l_mask']} is empty on the {cfg.voxel_mm} mm grid; "
            "the ring and the voxel categories are defined around it"
        )
    ring = regions.ring(brain, masks["t2l"], spacing, cfg.ring_mm)
    category = regions.categories(ring, nav, nel, masks["t2l_prog"], masks["cel_prog"])
    target = regions.target(masks["t2l"], masks["cel"], masks["t2l_prog"], masks["cel_prog"], brain)

    nav_modes: dict[str, float | None] = {}
    for c, name in enumerate(FEATURES):
        if name in INDEX_FEATURES:
            continue
        is_mrsi = FEATURE_SOURCES[name] in MRSI_SOURCES
        if (is_mrsi and not row.has_mrsi) or FEATURE_SOURCES[name] not in paths:
            nav_modes[name] = None  # not acquired: `unet.inputs.require_channels` refuses it by name
            continue
        region = nav & mrsi_valid if is_mrsi else nav
        try:
            features[c], nav_modes[name] = normalise_to_nav(
                features[c], region, cfg.mode_bins, cfg.mode_smoothing, cfg.min_nav_voxels
            )
        except NAVModeError as e:
            where = " inside the MRSI (PRESS) box" if is_mrsi else ""
            raise DataError(
                f"patient {pid}: cannot normalise {name} ({paths[FEATURE_SOURCES[name]]}): {e}{where}. "
                "Check that the map and the masks describe the same patient and that the brain mask is "
                "not mostly lesion."
            ) from None

    derived = {
        "nel": nel, "nav": nav, "ring": ring, "target": target, "mrsi": mrsi_valid, "category": category,
    }  # fmt: skip
    stacked = np.zeros((len(MASKS), *shape), dtype=np.uint8)
    for m, name in enumerate(MASKS):
        stacked[m] = masks[name] if name in masks else derived[name]
    return PreparedArrays(features, stacked, affine, native_affine, native_shape, nav_modes)


def summarise(row: ManifestRow, arrays: PreparedArrays, in_hash: str) -> dict[str, Any]:
    """The patient's row of patients.parquet (`data.schemas.patients_table_schema`)."""
    brain = arrays.mask("brain").astype(bool)
    lesion = regions.lesion(arrays.mask("t2l").astype(bool), arrays.mask("cel").astype(bool))
    ring = arrays.mask("ring").astype(bool)
    category = arrays.mask("category")
    voxel_cm3 = float(np.prod(arrays.spacing)) / 1000.0
    n_brain = int(brain.sum())
    n_lesion = int(lesion.sum())
    n_target = int(arrays.mask("target").sum())
    n_ring = int(ring.sum())
    return {
        **row.clinical(),
        "has_mrsi": row.has_mrsi,
        "shape": list(arrays.shape),
        "voxel_mm": arrays.spacing[0],
        "brain_voxels": n_brain,
        "lesion_voxels": n_lesion,
        "lesion_volume_cm3": n_lesion * voxel_cm3,
        "lesion_fraction": n_lesion / n_brain,
        "target_voxels": n_target,
        "target_fraction": n_target / n_brain,
        "ring_voxels": n_ring,
        **{f"n_{k.replace('->', '_')}": int((category == CATEGORIES[k]).sum()) for k in _FOUR},
        "mrsi_coverage": float((arrays.mask("mrsi").astype(bool) & ring).sum() / max(n_ring, 1)),
        "input_hash": in_hash,
    }


def voxel_table(row: ManifestRow, arrays: PreparedArrays):
    """The patient's voxel rows (`layout.voxel_table_schema`): one per voxel inside the ring.

    voxel_index is the C-order flat index into (X, Y, Z); NaN features become nulls; dist_t2l_mm is the
    distance (mm, with the grid's spacing) to the nearest pre-RT T2L voxel.
    """
    import pyarrow as pa

    schema = voxel_table_schema()
    idx = np.flatnonzero(arrays.mask("ring").ravel())
    values = arrays.features.reshape(len(FEATURES), -1)[:, idx]
    names = np.array([CATEGORY_CODES[k] for k in range(len(CATEGORY_CODES))], dtype=object)
    codes = arrays.mask("category").ravel()[idx]
    distance = regions.distance_mm(arrays.mask("t2l").astype(bool), arrays.spacing)
    columns = [pa.array(idx.astype(np.int32), type=pa.int32())]
    columns += [pa.array(v, mask=np.isnan(v), type=pa.float32()) for v in values]
    columns += [
        pa.array(names[codes].tolist(), type=pa.string()),
        pa.array([row.cohort.value] * idx.size, type=pa.string()),
        pa.array(np.full(idx.size, row.pfs_months, dtype=np.float32), type=pa.float32()),
        pa.array(distance.ravel()[idx].astype(np.float32), type=pa.float32()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _write_partition(voxels_dir: Path, patient_id: str, table) -> Path:
    """Write voxels/patient_id=<id>/part-0.parquet atomically: a temporary folder swapped into place
    (`atomic.atomic_folder`; readers skip the ".tmp-" names it uses meanwhile)."""
    import pyarrow.parquet as pq

    final = voxels_dir / f"patient_id={patient_id}"
    with atomic_folder(final) as tmp:
        pq.write_table(table, tmp / VOXEL_FILE)
    return final / VOXEL_FILE


def write_outputs(
    out: Path, row: ManifestRow, arrays: PreparedArrays, in_hash: str, cfg: PreprocessConfig
) -> dict[str, Any]:
    """Write one patient's files atomically, the sidecar last; return the sidecar."""
    paths = PrepPaths(out)
    pid = row.patient_id
    paths.sidecar(pid).unlink(missing_ok=True)  # incomplete until the new sidecar lands
    save_npy_atomic(paths.features(pid), arrays.features)
    save_npy_atomic(paths.masks(pid), arrays.masks)
    voxel_file = _write_partition(paths.voxels, pid, voxel_table(row, arrays))
    outputs = {
        "features": paths.features(pid),
        "masks": paths.masks(pid),
        "voxels": voxel_file,
    }
    sidecar = {
        "patient_id": pid,
        "affine": arrays.affine.tolist(),
        "spacing_mm": list(arrays.spacing),
        "shape": list(arrays.shape),
        "features": list(FEATURES),
        "masks": list(MASKS),
        "category_codes": {str(k): v for k, v in CATEGORY_CODES.items()},
        "input_hash": in_hash,
        "settings_hash": settings_hash(cfg),
        "settings": output_settings(cfg),
        "ctvlab_version": __version__,
        "has_mrsi": row.has_mrsi,
        "native_affine": arrays.native_affine.tolist(),
        "native_shape": list(arrays.native_shape),
        "nav_modes": arrays.nav_modes,
        "outputs": {
            k: {"path": str(p.relative_to(paths.root)), "sha256": sha256_file(p)} for k, p in outputs.items()
        },
        "summary": summarise(row, arrays, in_hash),
    }
    write_json_atomic(paths.sidecar(pid), sidecar)
    return sidecar


def read_sidecar(out: Path, patient_id: str) -> dict[str, Any] | None:
    """The patient's sidecar, or None when it is missing or unreadable."""
    try:
        return json.loads(PrepPaths(out).sidecar(patient_id).read_text())
    except (OSError, ValueError):
        return None


def missing_channels(out: Path, patient_ids: list[str], channels: list[str]) -> dict[str, list[str]]:
    """Channel → the patients prepared without it: a map the manifest left empty is NaN in the prepared volume
    and its NAV mode is null in the sidecar. MRSI channels are left out (a patient without MRSI is part of the
    study's design); a patient without a sidecar is taken as having every channel."""
    from ctvlab.data.layout import MRSI_FEATURES

    lacking: dict[str, list[str]] = {}
    for pid in patient_ids:
        modes = (read_sidecar(out, pid) or {}).get("nav_modes", {})
        for channel in channels:
            if channel not in MRSI_FEATURES and channel in modes and modes[channel] is None:
                lacking.setdefault(channel, []).append(pid)
    return lacking


def describe_missing(lacking: dict[str, list[str]]) -> str:
    """`nFA for 2 patient(s): P1, P2` per channel, for a refusal's message."""
    return "; ".join(f"{c} for {len(p)} patient(s): {', '.join(p[:10])}{' …' if len(p) > 10 else ''}"
                     for c, p in lacking.items())  # fmt: skip


def is_current(out: Path, patient_id: str, in_hash: str, cfg: PreprocessConfig) -> bool:
    """True when the patient's sidecar matches `in_hash` and the settings and every output file is intact."""
    sidecar = read_sidecar(out, patient_id)
    if sidecar is None:
        return False
    if sidecar.get("input_hash") != in_hash or sidecar.get("settings_hash") != settings_hash(cfg):
        return False
    root = PrepPaths(out).root
    try:
        return all(sha256_file(root / o["path"]) == o["sha256"] for o in sidecar["outputs"].values())
    except (OSError, KeyError, TypeError):
        return False


def preprocess_patient(row: ManifestRow, raw_root: Path, out: Path, cfg: PreprocessConfig) -> dict[str, Any]:
    """Prepare one patient and write its outputs; return its summary row (patients.parquet).

    Raises:
        DataError: see `prepare_arrays`.
    """
    require_study_inputs(row)
    in_hash = input_hash(row, Path(raw_root))
    arrays = prepare_arrays(row, Path(raw_root), cfg)
    return write_outputs(Path(out), row, arrays, in_hash, cfg)["summary"]


def require_study_inputs(row: ManifestRow) -> None:
    """Refuse a patient that lacks what the study's prepared data needs (`STUDY_NEEDS`), naming it.

    Raises:
        DataError: the patient and the empty manifest columns.
    """
    missing = row.missing(STUDY_NEEDS)
    if missing:
        raise DataError(
            f"patient {row.patient_id}: {', '.join(missing)} not available; the study's preprocessing needs "
            "them (clinical fields for the tables and splits, progression masks for the voxel categories and "
            "the target, cavity, ventricles and critical structures for normal-appearing brain and the CTVs): "
            "fill them in manifest.csv"
        )


def is_infrastructure_error(e: BaseException) -> bool:
    """True for a failure of the machine rather than of a patient's data: out of memory, or an OS-level
    I/O error (a full disk, EIO, a stale NFS handle). OSErrors without an errno are format errors raised
    by readers (gzip's BadGzipFile) and count as data."""
    return isinstance(e, MemoryError) or (
        isinstance(e, OSError) and e.errno is not None and not isinstance(e, FileNotFoundError)
    )


def process_or_skip(row: ManifestRow, raw_root: Path, out: Path, cfg: PreprocessConfig) -> dict[str, str]:
    """Skip a current patient, else prepare it; never raises.

    Returns:
        {"patient_id", "status": "processed" | "skipped" | "failed" | "error", "reason": "" or why}.
        "failed" is a problem with the patient's own data (`DataError`): the patient is left out.
        "error" is anything else (out of memory, a full disk, an I/O error, a bug): not the patient's
        fault, so it fails the stage instead. The summary stays in the sidecar: tasks return only this
        small row, so nothing large travels through the driver.
    """
    pid = row.patient_id
    try:
        require_study_inputs(row)
        in_hash = input_hash(row, Path(raw_root))
        if is_current(Path(out), pid, in_hash, cfg):
            return {"patient_id": pid, "status": "skipped", "reason": ""}
        arrays = prepare_arrays(row, Path(raw_root), cfg)
        write_outputs(Path(out), row, arrays, in_hash, cfg)
        return {"patient_id": pid, "status": "processed", "reason": ""}
    except DataError as e:  # one patient's bad data is reported, never fatal for the cohort
        return {"patient_id": pid, "status": "failed", "reason": str(e)}
    except Exception as e:
        storage = storage_error(e)
        if storage is not None:  # the folder cannot be written: the stage says it once, with the estimate
            return {"patient_id": pid, "status": "error", "storage": str(storage.errno),
                    "reason": f"patient {pid}: {storage.cause}" + (f" ({storage.folder})" if storage.folder else "")}  # fmt: skip
        return {"patient_id": pid, "status": "error", "reason": f"patient {pid}: {type(e).__name__}: {e}"}
