"""Readers over a prepared dataset: Ray Datasets for the distributed stages, NumPy for one patient.

Later stages stream shards of these datasets to their workers instead of each worker reading the whole
folder. Filtering by patient happens by choosing partition folders, so a fold's reader never opens
another patient's files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctvlab.data.layout import MASKS, PrepPaths
from ctvlab.errors import DataError


@dataclass
class PreparedPatient:
    """One patient's prepared arrays: features (C, X, Y, Z) float32, masks (M, X, Y, Z) uint8."""

    patient_id: str
    features: np.ndarray
    masks: np.ndarray
    sidecar: dict[str, Any]

    def mask(self, name: str) -> np.ndarray:
        return self.masks[MASKS.index(name)]

    def feature(self, name: str) -> np.ndarray:
        return self.features[self.sidecar["features"].index(name)]

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.sidecar["affine"], dtype=float)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.sidecar["spacing_mm"])


# (path, size, mtime) of the volume files this process has checked against their sidecar's sha256.
_VERIFIED: set[tuple[str, int, int]] = set()


def _verify(patient_id: str, path: Path, expected: str | None) -> None:
    """The first time this process loads a volume file (as it is now), its sha256 must be the one its
    sidecar recorded when preprocessing wrote it."""
    from ctvlab.atomic import sha256_file

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    if expected is not None and sha256_file(path) != expected:
        raise DataError(f"patient {patient_id}: prepared file {path} changed since preprocessing wrote it (its "
                        "sha256 differs from the sidecar's): run `ctvlab preprocess` again")  # fmt: skip
    _VERIFIED.add(key)


def load_patient(prep: str | Path, patient_id: str, mmap: bool = False) -> PreparedPatient:
    """A prepared patient's volumes and sidecar; each volume file is checked against the sha256 its sidecar
    recorded the first time this process loads it.

    Raises:
        DataError: a file is missing or changed since preprocessing.
    """
    paths = PrepPaths(prep)
    try:
        sidecar = json.loads(paths.sidecar(patient_id).read_text())
        outputs = sidecar.get("outputs", {})
        for name, path in (("features", paths.features(patient_id)), ("masks", paths.masks(patient_id))):
            _verify(patient_id, path, outputs.get(name, {}).get("sha256"))
        mode = "r" if mmap else None
        features = np.load(paths.features(patient_id), mmap_mode=mode, allow_pickle=False)
        masks = np.load(paths.masks(patient_id), mmap_mode=mode, allow_pickle=False)
    except FileNotFoundError as e:
        raise DataError(
            f"patient {patient_id}: prepared file {e.filename} is missing; run `ctvlab preprocess` again"
        ) from None
    return PreparedPatient(patient_id, features, masks, sidecar)


def read_patients(prep: str | Path):
    """The per-patient summary table as a pandas DataFrame."""
    import pandas as pd

    path = PrepPaths(prep).patients
    if not path.exists():
        raise DataError(f"{path} not found: is {prep} a prepared dataset (`ctvlab preprocess`)?")
    return pd.read_parquet(path)


def read_voxels(prep: str | Path, patient_ids: Sequence[str], columns: Sequence[str] | None = None):
    """Ray Dataset of voxel rows for `patient_ids` only (each row carries its `patient_id`).

    Args:
        prep: prepared dataset folder.
        patient_ids: the patients to read; only their partition folders are opened.
        columns: columns to read besides `patient_id` (default: all).
    """
    import ray.data

    paths = PrepPaths(prep)
    folders = [paths.voxel_partition(p) for p in patient_ids]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise DataError(f"voxel table has no partition for: {', '.join(missing[:5])}")
    if not folders:
        raise DataError("read_voxels needs at least one patient id")
    ds = ray.data.read_parquet(
        [str(f) for f in folders],
        partitioning=ray.data.datasource.Partitioning("hive", base_dir=str(paths.voxels)),
    )
    if columns is None:
        return ds
    # The partition column must be named, or a projection drops it.
    return ds.select_columns([*(c for c in columns if c != "patient_id"), "patient_id"])


def load_dataset_meta(prep: str | Path) -> dict[str, Any]:
    """dataset.json of a prepared dataset (digest, settings, patients, channel names, max_shape).

    Raises:
        DataError: the file is missing or not JSON.
    """
    path = PrepPaths(prep).dataset_json
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found: is {prep} a prepared dataset (`ctvlab preprocess`)?") from None
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}): run `ctvlab preprocess` again") from None


def _load_volume_row(row: dict[str, Any], prep: str) -> dict[str, Any]:
    p = load_patient(prep, row["patient_id"])
    return {"patient_id": p.patient_id, "features": p.features, "masks": p.masks}


def read_volumes(prep: str | Path, patient_ids: Sequence[str], num_cpus: float = 0.5):
    """Ray Dataset with one row per patient: {"patient_id", "features" (13, X, Y, Z) float32,
    "masks" (M, X, Y, Z) uint8}, channels in `layout.FEATURES` and `layout.MASKS` order.

    Volumes are loaded lazily by Ray tasks (one patient per block), so a training loop that takes
    `ray.train.get_dataset_shard(...)` streams only its own shard's patients.

    Args:
        prep: prepared dataset folder.
        patient_ids: the patients to read, in this order.
        num_cpus: Ray CPUs per load task (small: loading is I/O, and training workers hold the rest).

    Raises:
        DataError: no patient ids, or a patient has no prepared volumes.
    """
    import ray.data

    paths = PrepPaths(prep)
    ids = list(patient_ids)
    if not ids:
        raise DataError("read_volumes needs at least one patient id")
    missing = [p for p in ids if not (paths.features(p).is_file() and paths.sidecar(p).is_file())]
    if missing:
        raise DataError(
            f"no prepared volumes for {', '.join(missing[:5])} in {paths.volumes}; "
            "run `ctvlab preprocess` for this cohort"
        )
    ds = ray.data.from_items([{"patient_id": p} for p in ids], override_num_blocks=len(ids))
    return ds.map(_load_volume_row, fn_kwargs={"prep": str(Path(prep).resolve())}, num_cpus=num_cpus)
