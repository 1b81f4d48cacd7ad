"""A prepared voxel table with known structure, written without any imaging.

Each patient gets `voxels` rows in the layout of `ctvlab.data.layout` (hive partitions
`voxels/patient_id=<id>/part-0.parquet` with `voxel_table_schema()`, plus `patients.parquet`). Features
are normalised like the real table: maps ≈ 1 and indices ≈ 0 in stable tissue, with voxel noise and a
per-patient offset (so that patients differ, as scanners and sessions do).

Progressed voxels carry known shifts:
- normal cohort: a strong shift in the MRSI indices CNI and CCrI, a moderate one in nADC and nLip
  (CEL only), and a weak one in nFLAIR: MRSI and diffusion add information beyond the anatomy;
- null cohort (`null=True`): the same weak nFLAIR and nT1c shifts only; MRSI and diffusion are noise,
  so they cannot add information.
Early progressors (PFS below 7 months) get 1.3 times the shift and late ones 0.7 times, like the study's
better early-progressor models. Some patients have no MRSI at all and in the others a share of voxels
lies outside the PRESS box; their MRSI features are null, independently of the label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ctvlab.config import FEATURES
from ctvlab.data.layout import MRSI_FEATURES, PrepPaths, voxel_table_schema

INDICES = ("CNI", "CCrI", "CrNI")
# Category probabilities of a ring voxel (stable tissue dominates, as in the study's 4 cm ring).
CATEGORY_P = {"NAV->NAV": 0.82, "NAV->NEL": 0.07, "NAV->CEL": 0.03, "NEL->CEL": 0.03, "other": 0.05}
# Mean shift of a progressed voxel, per category and feature (in normalised units).
SIGNAL = {
    "NAV->NEL": {"CNI": 1.2, "CCrI": 1.0, "nFLAIR": 0.04},
    "NAV->CEL": {"CNI": 1.4, "CCrI": 1.1, "nADC": 0.06, "nLip": 0.15, "nFLAIR": 0.05},
    "NEL->CEL": {"CNI": 1.6, "CCrI": 1.2, "nADC": 0.08, "nLip": 0.2, "nFLAIR": 0.08},
}
NULL_SIGNAL = {
    "NAV->NEL": {"nFLAIR": 0.05, "nT1c": 0.02},
    "NAV->CEL": {"nFLAIR": 0.06, "nT1c": 0.04},
    "NEL->CEL": {"nFLAIR": 0.09, "nT1c": 0.05},
}
COHORTS = ("SOC", "ATT", "ENZA")


@dataclass(frozen=True)
class FabricSpec:
    n_patients: int = 14
    voxels: int = 1500
    seed: int = 0
    null: bool = False
    no_mrsi_every: int = 7  # patients i with i % 7 == 5 have no MRSI (2 of 14, 14 of 101)
    outside_press_fraction: float = 0.3
    map_noise: float = 0.12
    index_noise: float = 0.7


def patient_ids(n: int) -> list[str]:
    return [f"P{i:03d}" for i in range(n)]


def fabricate_patient(pid: str, index: int, spec: FabricSpec) -> tuple[pd.DataFrame, dict]:
    """One patient's voxel rows (without patient_id) and its patients.parquet row."""
    rng = np.random.default_rng([spec.seed, index])
    n = spec.voxels
    pfs = float(np.clip(rng.lognormal(np.log(7.0), 0.6), 0.8, 26.0))
    strength = 1.3 if pfs < 7.0 else 0.7
    cats = np.array(list(CATEGORY_P))
    p = rng.dirichlet(np.array(list(CATEGORY_P.values())) * 60)
    category = cats[rng.choice(len(cats), size=n, p=p)]
    data: dict[str, np.ndarray] = {"voxel_index": np.arange(n, dtype=np.int32)}
    for f in FEATURES:
        is_index = f in INDICES
        base = 0.0 if is_index else 1.0
        offset = rng.normal(0, 0.2 if is_index else 0.03)
        noise = spec.index_noise if is_index else spec.map_noise
        data[f] = base + offset + rng.normal(0, noise, size=n)
    for cat, shifts in (NULL_SIGNAL if spec.null else SIGNAL).items():
        rows = category == cat
        for f, shift in shifts.items():
            data[f][rows] += strength * shift
    no_mrsi = index % spec.no_mrsi_every == 5
    outside = np.ones(n, bool) if no_mrsi else rng.random(n) < spec.outside_press_fraction
    for f in MRSI_FEATURES:
        data[f][outside] = np.nan
    cohort = COHORTS[index % len(COHORTS)]
    frame = pd.DataFrame({k: (v.astype(np.float32) if k in FEATURES else v) for k, v in data.items()})
    frame["category"] = category
    frame["cohort"] = cohort
    frame["pfs_months"] = np.float32(pfs)
    # distance to the T2L: progressed voxels lie nearer on average (the baseline has some skill)
    progressed = category != "NAV->NAV"
    frame["dist_t2l_mm"] = np.where(progressed, rng.uniform(0, 20, n), rng.uniform(0, 40, n)).astype(
        np.float32
    )
    progression = "both" if (category == "NAV->NEL").any() and (category != "NAV->NEL").any() else "T2L"
    row = {
        "patient_id": pid,
        "cohort": cohort,
        "progression_type": progression,
        "pfs_months": pfs,
        "has_mrsi": not no_mrsi,
    }
    return frame, row


def write_prepared(root: str | Path, spec: FabricSpec = FabricSpec()) -> Path:
    """Write a prepared-dataset folder holding only patients.parquet and voxels/; return its path."""
    paths = PrepPaths(root)
    schema = voxel_table_schema()
    rows = []
    for i, pid in enumerate(patient_ids(spec.n_patients)):
        frame, row = fabricate_patient(pid, i, spec)
        folder = paths.voxel_partition(pid)
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        pq.write_table(table, folder / "part-0.parquet")
        rows.append(row)
    pd.DataFrame(rows).to_parquet(paths.patients, index=False)
    return paths.root


def round_robin_folds(ids: list[str], n_folds: int = 5) -> dict[str, int]:
    """Patient → fold, round robin over the sorted ids (fabricated patients are exchangeable)."""
    return {pid: i % n_folds for i, pid in enumerate(sorted(ids))}
