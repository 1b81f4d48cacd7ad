"""Stage functions: each runs one step of the study on a prepared dataset and records it in MLflow.

They join the pure library code (splits, voxel models, statistics) to the tracking module; the CLI, the
jobs and `ctvlab run` call them. Patient ids never reach MLflow: tables are pseudonymised first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ctvlab.config import StudyConfig
from ctvlab.splits import Split, load_split, pseudonymise, write_split
from ctvlab.tracking import Tracker, base_tags


def tracker_for(cfg: StudyConfig) -> Tracker:
    return Tracker(cfg.tracking.experiment or cfg.name, cfg.tracking.tracking_uri)


def pseudonymised(prep: Path, df: pd.DataFrame, column: str = "patient_id") -> pd.DataFrame:
    """A copy of `df` whose patient ids are replaced by the dataset's keyed pseudonyms."""
    names = pseudonymise(prep, df[column].astype(str).unique())
    out = df.copy()
    out[column] = out[column].astype(str).map(names)
    return out


def split_stage(cfg: StudyConfig, prep: Path) -> tuple[Split, str]:
    """Draw and write the patient splits; log the (pseudonymised) table and its digests. Returns the split
    and the MLflow run id."""
    from ctvlab.data.readers import read_patients

    prep = Path(prep)
    split = write_split(prep, cfg.split)
    patients = read_patients(prep)[["patient_id", "cohort", "progression_type"]]
    table = split.table.merge(patients, on="patient_id")
    tracker = tracker_for(cfg)
    with tracker.run("split", base_tags("split", split.dataset_digest, split.digest)) as run:
        run.params({"split": cfg.split.model_dump(mode="json")})
        run.dataset("prepared", split.dataset_digest, str(prep.resolve()), context="split")
        counts: dict[str, Any] = {f"n_{role}": int((table["dl_role"] == role).sum()) for role in ("train", "val", "test")}
        for (role, cohort), n in table.groupby(["dl_role", "cohort"]).size().items():
            counts[f"n_{role}_{cohort}"] = int(n)
        counts.update({f"n_fold_{k}": int(n) for k, n in table["rf_fold"].value_counts().sort_index().items()})
        run.metrics(counts)
        run.table(pseudonymised(prep, table), "splits.csv", "split")
        run_id = run.run_id
    return split, run_id


def current_split(prep: Path) -> Split:
    return load_split(prep)
