"""Write a ctvlab cohort out in a public collection's layout (the inverse of `ctvlab import-layout`), for tests.

Each preset's first file template names the files; the segmentation puts each ctvlab mask back under the
collection's own label numbers (T2L-only voxels under its oedema label, the CEL under its enhancing label).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from ctvlab.ingest.layouts import Preset
from ctvlab.ingest.manifest import ManifestRow

# A patient folder name each collection would use, by patient index.
PATIENT_NAMES = {
    "brats2021": "BraTS2021_{i:05d}",
    "brats2023-glioma": "BraTS-GLI-{i:05d}-000",
    "upenn-gbm": "UPENN-GBM-{i:05d}_11",
    "rhuh-gbm": "RHUH-{i:04d}",
    "lumiere-deepbratumia": "Patient-{i:03d}",
    "lumiere-hd-glio-auto": "Patient-{i:03d}",
}
BASELINE = {"rhuh-gbm": "1", "lumiere-deepbratumia": "week-000-1", "lumiere-hd-glio-auto": "week-000-1"}
TRACE_UNIT = 1e3  # the trace is written in 10⁻³ mm²/s, so that the importer's unit check has work to do


def label_image(cel: np.ndarray, t2l: np.ndarray, preset: Preset) -> np.ndarray:
    seg = np.zeros(cel.shape, dtype=np.uint8)
    seg[t2l.astype(bool)] = preset.labels.oedema[0]
    seg[cel.astype(bool)] = preset.labels.cel[0]
    return seg


def _save_like(path: Path, data: np.ndarray, like: nib.Nifti1Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, like.affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _target(dst: Path, preset: Preset, pid: str, role: str, tp: str | None = None) -> Path:
    return dst / preset.files[role][0].format(
        id=pid, tp=tp if tp is not None else BASELINE.get(preset.name, "")
    )


def _load(cohort: Path, row: ManifestRow, column: str) -> nib.Nifti1Image:
    return nib.load(str(cohort / getattr(row, column)))


def write_layout(
    cohort: Path,
    rows: list[ManifestRow],
    preset: Preset,
    dst: Path,
    *,
    followup_shift_mm: float | None = 0.0,
) -> dict[str, str]:
    """Write `rows` (a cohort in `cohort`) under `dst` in `preset`'s layout; return ctvlab id → folder name.

    Args:
        followup_shift_mm: for a preset with a follow-up time point, move the follow-up grid by this much
            (0: the same grid as the pre-RT scan; None: no follow-up written).
    """
    names = {}
    for i, row in enumerate(rows, start=1):
        pid = PATIENT_NAMES[preset.name].format(i=i)
        names[row.patient_id] = pid

        target = functools.partial(_target, dst, preset, pid)
        load = functools.partial(_load, cohort, row)
        for column in ("t1c", "t1", "flair"):
            target(column).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cohort / getattr(row, column), target(column))
        ref = load("t1c")
        cel, t2l = (np.asarray(load(c).dataobj) for c in ("cel_mask", "t2l_mask"))
        _save_like(target("seg"), label_image(cel, t2l, preset), ref)
        if "brain_mask" in preset.files:
            shutil.copyfile(cohort / row.brain_mask, target("brain_mask"))
        if "adc" in preset.files:
            shutil.copyfile(cohort / row.adc, target("adc"))
        if "trace" in preset.files:
            adc = load("adc")
            _save_like(target("trace"), np.asarray(adc.dataobj, dtype=np.float32) * 3 * TRACE_UNIT, adc)
        if "fa" in preset.files:
            shutil.copyfile(cohort / row.fa, target("fa"))
        if "volumes" in preset.files:
            seg = label_image(cel, t2l, preset)
            voxel = float(abs(np.linalg.det(ref.affine[:3, :3])))
            volumes = {
                key: float((seg == label).sum()) * voxel for label, key in preset.labels.volume_keys.items()
            }
            target("volumes").write_text(json.dumps(volumes))
        if preset.followup is not None and followup_shift_mm is not None:
            cel_p, t2l_p = (
                np.asarray(load(c).dataobj) for c in ("cel_progression_mask", "t2l_progression_mask")
            )
            moved = ref.affine.copy()
            moved[:3, 3] += followup_shift_mm
            img = nib.Nifti1Image(label_image(cel_p, t2l_p, preset), moved)
            path = target("seg", preset.followup)
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(img, str(path))
            # the follow-up's own T1c, on the follow-up segmentation's grid
            nib.save(
                nib.Nifti1Image(np.asarray(load("t1c").dataobj), moved), str(target("t1c", preset.followup))
            )
    return names
