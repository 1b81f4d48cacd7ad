"""Patient-level splits and the leakage guard.

Two splits are drawn once per prepared dataset and written to `PREP/splits.parquet`:

- `dl_role`: train / val / test for the U-Net, 67/16/17 % of patients, stratified by treatment cohort
  (the study's Methods: Deep learning CTV; the paper's Methods give 67/16/18).
- `rf_fold`: 0..4 for the voxel models' five-fold cross-validation, grouped by patient and stratified by
  cohort and progression type (the study's Methods: Voxel-wise random forest).

`splits.json` records the digest of the table, the digest of the prepared dataset it was drawn for, and
the settings. Every later stage loads the split through `load_split`, which refuses to run when the
table was edited after it was written, when it does not match the prepared data, or when a patient is
on both sides of a split; and stages that consume a model check it with `check_disjoint`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctvlab.atomic import atomic_path, digest, write_json_atomic
from ctvlab.config import SplitConfig
from ctvlab.data.layout import PrepPaths
from ctvlab.errors import DataError, LeakageError

DL_ROLES = ("train", "val", "test")


def draw_dl_roles(
    patients: pd.DataFrame,
    fractions: tuple[float, float, float],
    seed: int,
    counts: tuple[int, int, int] | None = None,
) -> pd.Series:
    """Assign train/val/test by patient, stratified by cohort.

    Within each cohort, patients are shuffled and cut by the fractions with largest-remainder rounding;
    then, if the cohort as a whole left val or test empty (tiny cohorts), one training patient of the
    largest cohort moves there, so every role has at least one patient when there are three or more.
    When `counts` is given and the cohort has exactly their sum of patients, the roles get exactly those
    counts (the study's 67/16/18 of 101), still stratified: each treatment cohort's share of a role is its
    proportional share rounded so that rows and columns both add up (`stratified_counts`).

    Args:
        patients: one row per patient with `patient_id` and `cohort`.
        fractions: (train, val, test), summing to 1.
        seed: random seed; the same seed and patients give the same roles.
        counts: (train, val, test) patient counts for a cohort of exactly their sum.

    Returns:
        Series of roles indexed like `patients`.
    """
    rng = np.random.default_rng(seed)
    roles = pd.Series("train", index=patients.index, dtype=object)
    groups = sorted(patients.groupby("cohort"), key=lambda kv: str(kv[0]))
    exact = counts is not None and sum(counts) == len(patients)
    table = stratified_counts([len(g) for _, g in groups], counts) if exact else None
    for k, (_, group) in enumerate(groups):
        idx = group.sort_values("patient_id").index.to_numpy()
        idx = idx[rng.permutation(len(idx))]
        per_role = table[k] if table is not None else _largest_remainder(len(idx), fractions)
        cut = np.cumsum(per_role)
        roles.loc[idx[cut[0] : cut[1]]] = "val"
        roles.loc[idx[cut[1] :]] = "test"
    if len(patients) >= 3:
        for role in ("val", "test"):
            if not (roles == role).any():
                train = roles[roles == "train"]
                largest = patients.loc[train.index, "cohort"].value_counts().index[0]
                candidates = sorted(train.index[patients.loc[train.index, "cohort"] == largest])
                roles.loc[candidates[rng.integers(len(candidates))]] = role
    return roles


def stratified_counts(sizes: list[int], totals: tuple[int, ...]) -> np.ndarray:
    """An integer table (group × role) whose rows sum to the group sizes and columns to the role totals,
    each cell within one of its proportional share `size × total / n` (largest remainders first)."""
    sizes_a, totals_a = np.asarray(sizes), np.asarray(totals)
    n = int(sizes_a.sum())
    if n != int(totals_a.sum()):
        raise ValueError(f"group sizes sum to {n}, role totals to {int(totals_a.sum())}")
    share = sizes_a[:, None] * totals_a[None, :] / n
    table = np.floor(share).astype(int)
    remainder = share - table
    for flat in np.argsort(-remainder, axis=None, kind="stable"):
        g, r = np.unravel_index(flat, table.shape)
        if table[g].sum() < sizes_a[g] and table[:, r].sum() < totals_a[r]:
            table[g, r] += 1
    while (table.sum(axis=1) < sizes_a).any():  # rare: the greedy pass filled a column a row still needed
        g = int(np.flatnonzero(table.sum(axis=1) < sizes_a)[0])
        r = int(np.flatnonzero(table.sum(axis=0) < totals_a)[0])
        table[g, r] += 1
    return table


def _largest_remainder(n: int, fractions: Iterable[float]) -> np.ndarray:
    exact = np.asarray(list(fractions)) * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts


def draw_rf_folds(patients: pd.DataFrame, n_folds: int, seed: int) -> pd.Series:
    """Assign each patient a cross-validation fold, stratified by cohort and progression type.

    Folds are drawn over patients (never voxels), so a patient's voxels are all in one fold. A small
    cohort whose every stratum is smaller than the number of folds cannot be stratified that finely: the
    strata are then coarsened to the cohort alone, and at last to none (shuffled folds of equal size).
    """
    from sklearn.model_selection import KFold, StratifiedGroupKFold

    if len(patients) < n_folds:
        raise DataError(f"{len(patients)} patients cannot fill {n_folds} folds; lower split.n_folds")
    ordered = patients.sort_values("patient_id")
    groups = ordered["patient_id"].to_numpy()
    x = np.zeros(len(ordered))
    candidates = [
        (ordered["cohort"].astype(str) + "/" + ordered["progression_type"].astype(str)).to_numpy(),
        ordered["cohort"].astype(str).to_numpy(),
    ]
    splits = None
    for strata in candidates:
        if pd.Series(strata).value_counts().max() >= n_folds:
            cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            splits = cv.split(x, strata, groups=groups)
            break
    if splits is None:
        splits = KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x)
    folds = pd.Series(-1, index=patients.index, dtype=int)
    with warnings.catch_warnings():
        # A stratum rarer than the folds (e.g. the study's 7 CEL-only progressors) is spread over as many
        # folds as it has patients; scikit-learn warns about it, which is expected here.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, test) in enumerate(splits):
            folds.loc[ordered.index[test]] = k
    return folds


def make_splits(patients: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """The split table: patient_id, dl_role, rf_fold; sorted by patient_id."""
    for col in ("patient_id", "cohort", "progression_type"):
        if col not in patients.columns:
            raise DataError(f"patients table has no column {col!r}")
    table = pd.DataFrame(
        {
            "patient_id": patients["patient_id"].astype(str),
            "dl_role": draw_dl_roles(patients, cfg.dl_fractions, cfg.seed, cfg.dl_counts),
            "rf_fold": draw_rf_folds(patients, cfg.n_folds, cfg.seed),
        }
    )
    return table.sort_values("patient_id").reset_index(drop=True)


def table_digest(table: pd.DataFrame) -> str:
    records = table.sort_values("patient_id")[["patient_id", "dl_role", "rf_fold"]].to_dict("records")
    return digest([{k: (int(v) if k == "rf_fold" else str(v)) for k, v in r.items()} for r in records])


@dataclass(frozen=True)
class Split:
    """A loaded, verified split."""

    table: pd.DataFrame
    digest: str
    dataset_digest: str
    seed: int

    def patients(self, role: str) -> list[str]:
        if role not in DL_ROLES:
            raise ValueError(f"unknown role {role!r}; one of {DL_ROLES}")
        return sorted(self.table.loc[self.table["dl_role"] == role, "patient_id"])

    def folds(self) -> dict[str, int]:
        return dict(zip(self.table["patient_id"], self.table["rf_fold"].astype(int), strict=True))


def write_split(prep: str | Path, cfg: SplitConfig) -> Split:
    """Draw the splits for a prepared dataset and write splits.parquet and splits.json atomically."""
    from ctvlab.data.readers import load_dataset_meta, read_patients

    paths = PrepPaths(prep)
    meta = load_dataset_meta(prep)
    table = make_splits(read_patients(prep), cfg)
    d = table_digest(table)
    with atomic_path(paths.splits) as tmp:
        table.to_parquet(tmp, index=False)
    write_json_atomic(
        paths.splits_json,
        {
            "digest": d,
            "dataset_digest": meta["digest"],
            "seed": cfg.seed,
            "settings": cfg.model_dump(mode="json"),
        },
    )
    ensure_salt(prep)
    return Split(table, d, meta["digest"], cfg.seed)


def load_split(prep: str | Path, expected_digest: str | None = None) -> Split:
    """Load and verify the split of a prepared dataset: the leakage guard every stage goes through.

    Raises:
        DataError: no split yet.
        LeakageError: the table changed after it was written, it does not cover exactly the prepared
            patients, its dataset digest is not the current one, it is not the split a caller recorded
            (`expected_digest`), or a patient appears in more than one row.
    """
    from ctvlab.data.readers import load_dataset_meta

    paths = PrepPaths(prep)
    if not paths.splits.exists() or not paths.splits_json.exists():
        raise DataError(f"{paths.splits} not found: run `ctvlab split --data {prep}` first")
    table = pd.read_parquet(paths.splits)
    recorded = json.loads(paths.splits_json.read_text())
    if table["patient_id"].duplicated().any():
        dup = sorted(table.loc[table["patient_id"].duplicated(), "patient_id"])
        raise LeakageError(f"{paths.splits}: patients listed more than once: {', '.join(dup[:5])}")
    d = table_digest(table)
    if d != recorded["digest"]:
        raise LeakageError(
            f"{paths.splits} does not match the digest recorded in {paths.splits_json.name}: the split was "
            "edited after it was drawn. Run `ctvlab split` again (results made with the old split will "
            "no longer match it)."
        )
    meta = load_dataset_meta(prep)
    if recorded["dataset_digest"] != meta["digest"]:
        raise LeakageError(
            f"the split in {prep} was drawn for another version of the prepared data (dataset digest "
            f"{recorded['dataset_digest'][:12]} vs now {meta['digest'][:12]}). Run `ctvlab split` again."
        )
    prepared = {p["patient_id"] if isinstance(p, dict) else p for p in meta["patients"]}
    listed = set(table["patient_id"])
    if prepared != listed:
        extra, missing = sorted(listed - prepared), sorted(prepared - listed)
        raise LeakageError(
            f"the split does not match the prepared patients (in split only: {extra[:5]}, prepared only: "
            f"{missing[:5]}). Run `ctvlab split` again."
        )
    if expected_digest is not None and expected_digest != d:
        raise LeakageError(
            f"this stage expects split {expected_digest[:12]} but {prep} holds split {d[:12]}: the model "
            "or results were made with another split."
        )
    return Split(table, d, meta["digest"], int(recorded.get("seed", 0)))


def check_disjoint(**groups: Iterable[str]) -> None:
    """Raise LeakageError when any patient is in two of the named groups (e.g. train=..., test=...)."""
    sets = {name: set(ids) for name, ids in groups.items()}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = sets[a] & sets[b]
            if both:
                shown = ", ".join(sorted(both)[:5])
                raise LeakageError(f"{len(both)} patient(s) in both {a} and {b}: {shown}")


def check_fold_map(folds: Mapping[str, int]) -> None:
    """A fold map assigns each patient exactly one fold (guaranteed by a dict) and uses ≥ 2 folds."""
    if len(set(folds.values())) < 2:
        raise LeakageError("cross-validation needs patients in at least two folds")


# --- pseudonyms -----------------------------------------------------------------------------------


SALT_HEX_CHARS = 64  # 32 random bytes


def ensure_salt(prep: str | Path) -> bytes:
    """The dataset's secret pseudonym salt, created on first use; it never leaves the prepared folder.

    Created exclusively (two processes starting at once get the same salt, never two), readable by its
    owner alone, and on disk before anything pseudonymised with it is logged. On every read it must still
    be one of those files: anything else means the pseudonyms could be reversed or could change.

    Raises:
        DataError: the salt file has the wrong length or content, or others may read or write it.
    """
    path = PrepPaths(prep).salt
    if not path.exists():
        _create_salt(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise DataError(
            f"{path}: the pseudonym salt is accessible to other users (mode {mode:o}); it must be 600. "
            f"Fix it with `chmod 600 {path}` and check who may have read it: with the salt, the pseudonyms "
            "in the tracking store can be linked back to patients."
        )
    text = path.read_text(errors="replace").strip()
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = b""
    if len(text) != SALT_HEX_CHARS or len(salt) * 2 != SALT_HEX_CHARS:
        raise DataError(
            f"{path}: not a pseudonym salt ({SALT_HEX_CHARS} hex characters expected). Restore it from a "
            "backup: a new salt would give every patient a new pseudonym and break the link to earlier runs."
        )
    return salt


def _create_salt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{secrets.token_hex(4)}-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(SALT_HEX_CHARS // 2) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created the salt first: keep theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def salt_fingerprint(prep: str | Path) -> str:
    """A digest of the dataset's pseudonym salt (never the salt): models record it, so that pseudonyms made
    under another salt are never compared with this dataset's."""
    return hashlib.sha256(b"ctvlab salt fingerprint\0" + ensure_salt(prep)).hexdigest()[:16]


def pseudonym(patient_id: str, salt: bytes) -> str:
    """Stable keyed pseudonym of a patient id (HMAC-SHA256): what MLflow sees instead of the id."""
    return "pt-" + hmac.new(salt, patient_id.encode(), hashlib.sha256).hexdigest()[:12]


def pseudonymise(prep: str | Path, ids: Iterable[str]) -> dict[str, str]:
    salt = ensure_salt(prep)
    return {pid: pseudonym(pid, salt) for pid in ids}


def pseudonymised(prep: str | Path, df, column: str = "patient_id"):
    """A copy of DataFrame `df` whose patient ids are replaced by the dataset's keyed pseudonyms."""
    names = pseudonymise(prep, df[column].astype(str).unique())
    out = df.copy()
    out[column] = out[column].astype(str).map(names)
    return out
