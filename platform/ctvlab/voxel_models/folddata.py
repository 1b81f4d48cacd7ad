"""Reading a prepared voxel table into per-fold frames through Ray Data, with the fold map checked for
leakage (a patient in two folds, or named without data)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctvlab.data.layout import CATEGORY_CODES, DISTANCE_COLUMN
from ctvlab.errors import DataError, LeakageError
from ctvlab.splits import check_disjoint
from ctvlab.study import FEATURES
from ctvlab.voxel_models.labels import (
    resolve_features,
)

# Category labels of the voxel table, as a fixed pandas categorical so that fold frames concatenate
# without falling back to Python strings.
_CATEGORY_DTYPE = pd.CategoricalDtype([c for c in CATEGORY_CODES.values() if c != "outside"])

# --- reading folds -------------------------------------------------------------------------------


@dataclass
class FoldData:
    """The voxel rows of a fold map's patients, one compact frame per fold, read once and reused.

    Frames hold `patient_id` and `category` (pandas categoricals) and the feature columns (float32,
    NaN where missing). Rows of category "other" are dropped (no target uses them).
    """

    frames: dict[int, pd.DataFrame]
    features: list[str]
    folds: dict[str, int]
    read_s: float
    n_unassigned: int = 0
    _refs: dict[int, Any] | None = field(default=None, repr=False)

    def refs(self) -> dict[int, Any]:
        """The frames in Ray's object store (put once, shared by every run on this data)."""
        if self._refs is None:
            import ray

            self._refs = {k: ray.put(df) for k, df in self.frames.items()}
        return self._refs


def validate_fold_map(folds: Mapping[str, int] | pd.Series) -> dict[str, int]:
    """Patient → fold as a dict; LeakageError if a patient is listed twice or fewer than 2 folds are used."""
    items = list(folds.items())
    ids = [str(p) for p, _ in items]
    if len(set(ids)) != len(ids):
        dup = sorted({p for p in ids if ids.count(p) > 1})
        raise LeakageError(f"fold map lists patients in more than one fold: {', '.join(dup[:5])}")
    out = {}
    for pid, k in items:
        if isinstance(k, bool) or not float(k).is_integer() or k < 0:
            raise LeakageError(f"fold map: patient {pid} has fold {k!r}; folds are integers 0..k-1")
        out[str(pid)] = int(k)
    if len(set(out.values())) < 2:
        raise LeakageError("cross-validation needs patients in at least two folds")
    return out


def load_fold_data(
    prep: str | Path, folds: Mapping[str, int], features: Sequence[str] | None = None
) -> FoldData:
    """Read the voxel rows of every patient in `folds` through Ray Data (only the needed columns).

    Raises:
        LeakageError: the fold map lists a patient twice, uses one fold only, or names a patient that the
            prepared data does not hold (a split drawn for other data).
    """
    from ctvlab.data.layout import PrepPaths
    from ctvlab.data.readers import read_voxels

    fold_of = validate_fold_map(folds)
    features = resolve_features(features, FEATURES)
    paths = PrepPaths(prep)
    missing = sorted(p for p in fold_of if not paths.voxel_partition(p).is_dir())
    if missing:
        raise LeakageError(
            f"the fold map names {len(missing)} patient(s) without voxels in {paths.voxels}: "
            f"{', '.join(missing[:5])}. The split does not match this prepared dataset; draw it again "
            "(`ctvlab split`)."
        )
    on_disk = {p.name.split("=", 1)[1] for p in paths.voxels.glob("patient_id=*") if p.is_dir()}
    t0 = time.perf_counter()
    ids = sorted(fold_of)
    with _parquet_datasource_v1():
        table = _concat_arrow(
            read_voxels(prep, ids, columns=["voxel_index", "category", DISTANCE_COLUMN, *features])
        )
    frame = _compact_frame(table, features, ids)
    # Ray Data returns blocks in completion order; a fixed row order keeps bootstraps, and so results,
    # identical from run to run.
    order = np.lexsort((table.column("voxel_index").to_numpy(), frame["patient_id"].cat.codes.to_numpy()))
    frame = frame.iloc[order]
    frame = frame.loc[frame["category"] != "other"]
    fold_col = frame["patient_id"].map(fold_of).astype(np.int64).to_numpy()
    frames = {k: frame.loc[fold_col == k].reset_index(drop=True) for k in sorted(set(fold_of.values()))}
    check_disjoint(**{f"fold {k}": df["patient_id"].unique().astype(str) for k, df in frames.items()})
    return FoldData(
        frames=frames,
        features=list(features),
        folds=fold_of,
        read_s=time.perf_counter() - t0,
        n_unassigned=len(on_disk - set(fold_of)),
    )


@contextlib.contextmanager
def _parquet_datasource_v1():
    """Read Parquet with Ray Data's V1 datasource for the duration of the block.

    Ray 2.60's default V2 Parquet reader cost a fixed 20–30 s per read on a loaded 2-core machine (its
    listing stage waits with almost no CPU time), against 4–7 s for V1 on the same 400k rows.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = previous


def _concat_arrow(ds):
    import pyarrow as pa
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        raise DataError("the voxel table holds no rows for the patients of the fold map")
    return pa.concat_tables(tables, promote_options="permissive")


def _compact_frame(table, features: Sequence[str], patient_ids: Sequence[str]) -> pd.DataFrame:
    """Arrow voxel rows → pandas with categoricals and float32 NumPy columns (NaN where null), the features
    and the distance to the T2L."""
    category = _categorical(table.column("category"), _CATEGORY_DTYPE)
    if (category.codes < 0).any():
        bad = sorted(set(table.column("category").to_pandas()[category.codes < 0].astype(str)))
        raise DataError(
            f"voxel table has unknown categories {bad[:5]}; expected {list(_CATEGORY_DTYPE.categories)}"
        )
    data: dict[str, Any] = {
        "patient_id": _categorical(table.column("patient_id"), pd.CategoricalDtype(list(patient_ids))),
        "category": category,
    }
    for f in (*features, DISTANCE_COLUMN):
        data[f] = table.column(f).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return pd.DataFrame(data)


def _categorical(column, dtype: pd.CategoricalDtype) -> pd.Categorical:
    """A pyarrow string column as a pandas categorical of `dtype` (code -1 for values outside it)."""
    import pyarrow as pa

    encoded = column.cast(pa.string()).combine_chunks().dictionary_encode()
    lookup = pd.Index(dtype.categories).get_indexer(encoded.dictionary.to_pylist())
    codes = lookup[encoded.indices.to_numpy(zero_copy_only=False)] if len(encoded) else np.empty(0, int)
    return pd.Categorical.from_codes(codes, dtype=dtype)
