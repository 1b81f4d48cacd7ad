"""`ctvlab import-layout`: a public collection (`ingest.layouts.PRESETS`) into a cohort folder in ctvlab's layout.

Per patient: find the preset's files for the pre-RT time point, check that T1, FLAIR and the segmentation lie
on the T1c grid, turn the segmentation's labels into ctvlab's masks (CEL, T2L, and the cavity where the
collection labels one), take the brain mask from the collection or from the skull-stripped T1c, and the
ADC as given or from the DTI trace (mean diffusivity = trace / 3). A follow-up segmentation becomes the
progression masks only when it already lies on the pre-RT T1c grid: registration is a later step.

What a collection lacks stays empty in the manifest, with a note in `import_report.json`; `ctvlab validate`
checks what is there. A patient whose files are missing, off the T1c grid, or labelled with numbers the
preset does not know is reported and skipped; the others are imported. The cohort is built in a temporary
folder and renamed into place at the end (`atomic.atomic_folder`), so `--out` is complete or absent. The
array maths (labels to masks, the volume check, the brain, the ADC) is in `ingest.conventions`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctvlab.errors import ConfigError, DataError
from ctvlab.ingest.conventions import (
    adc_from_trace,
    brain_from_t1c,
    masks_from_labels,
    on_grid,
    volume_mismatches,
)
from ctvlab.ingest.layouts import REQUIRED_ROLES, Labels, Preset
from ctvlab.ingest.manifest import PATIENT_ID_PATTERN, ManifestRow, write_manifest

REPORT_NAME = "import_report.json"


@dataclass
class ImportOutcome:
    out: Path
    rows: list[ManifestRow]
    skipped: dict[str, str]  # patient → why
    notes: dict[str, list[str]] = field(default_factory=dict)  # patient → what is missing or derived
    lacks: tuple[str, ...] = ()  # what the whole collection lacks (the preset's notes)


class _Patient:
    """One patient's files in the collection, named in messages as the user gave the collection folder."""

    def __init__(self, src: Path, preset: Preset, folder: str, timepoint: str | None):
        self.src, self.preset, self.folder, self.timepoint = src, preset, folder, timepoint
        self.id = Path(folder).name

    def find(self, role: str, timepoint: str | None = None) -> Path | None:
        tp = timepoint if timepoint is not None else self.timepoint
        for template in self.preset.files.get(role, ()):  # type: ignore[call-overload]
            rel = template.format(id=self.id, tp=tp or "")
            path = self.src / rel
            if path.is_file() and _inside(self.src, path):
                return path
        return None

    def need(self, role: str) -> Path:
        path = self.find(role)
        if path is None:
            tried = ", ".join(str(self.src / t.format(id=self.id, tp=self.timepoint or ""))
                              for t in self.preset.files.get(role, ()))  # type: ignore[call-overload]  # fmt: skip
            raise DataError(f"patient {self.id}: no {role} file ({tried} not found)")
        return path


def _inside(root: Path, path: Path) -> bool:
    """A template or a link must not lead out of the collection folder."""
    return path.resolve().is_relative_to(root.resolve())


def _load(pid: str, role: str, path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises several types for a damaged file; each is this file's problem
        raise DataError(f"patient {pid}: {role} file {path} cannot be read as NIfTI: {e}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"patient {pid}: {role} file {path} has shape {data.shape}; a 3-D volume is needed")
    return img, data


def _save(path: Path, data: np.ndarray, ref, dtype: type) -> None:
    """Write `data` as `dtype` with `ref`'s affine and its qform/sform codes (a scanner code stays one)."""
    import nibabel as nib

    img = nib.Nifti1Image(data.astype(dtype), ref.affine)
    img.set_qform(ref.affine, code=int(ref.header["qform_code"]) or 1)
    img.set_sform(ref.affine, code=int(ref.header["sform_code"]) or 1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _copy_image(source: Path, folder: Path, name: str) -> str:
    """Copy an image as it is (its header and geometry untouched); return its file name in the cohort."""
    suffix = ".nii.gz" if source.name.endswith(".nii.gz") else source.suffix
    shutil.copyfile(source, folder / f"{name}{suffix}")
    return f"{name}{suffix}"


def _baseline(patient_dir: Path, preset: Preset, chosen: str | None) -> str | None:
    """The pre-RT time point of a patient (None for a collection without time points)."""
    if preset.timepoints is None:
        return None
    points = sorted(p.name for p in patient_dir.glob(preset.timepoints) if p.is_dir())
    for want in (chosen,) if chosen else preset.baseline:
        if want == "first" and points:
            return points[0]
        if want in points:
            return want
    wanted = chosen or " or ".join(preset.baseline)
    raise DataError(
        f"patient {patient_dir.name}: no time point {wanted} in {patient_dir} (it has: {', '.join(points) or 'none'})"
    )


def import_patient(src: Path, preset: Preset, patient_dir: Path, folder: Path, timepoint: str | None = None
                   ) -> tuple[ManifestRow, list[str]]:  # fmt: skip
    """Write one patient's files into `folder` (the cohort's `<id>/`); return its row and its notes.

    Raises:
        DataError: naming the patient and the file, for anything that keeps it out of the cohort.
    """
    pid = patient_dir.name
    if not re.fullmatch(PATIENT_ID_PATTERN, pid) or pid.endswith("_masks"):
        raise DataError(
            f"patient folder {patient_dir} is not a usable patient id (letters, digits, '_', '.', '-')"
        )
    tp = _baseline(patient_dir, preset, timepoint)
    p = _Patient(src, preset, str(patient_dir.relative_to(src)), tp)
    notes: list[str] = [f"pre-RT time point: {tp}"] if tp is not None else []
    paths = {role: p.need(role) for role in REQUIRED_ROLES}
    t1c_img, t1c = _load(pid, "t1c", paths["t1c"])
    seg_img, seg = _load(pid, "seg", paths["seg"])
    for role in ("t1", "flair", "seg"):
        img = seg_img if role == "seg" else _load(pid, role, paths[role])[0]
        if not on_grid(img.shape, img.affine, t1c_img.shape, t1c_img.affine):
            raise DataError(
                f"patient {pid}: {role} file {paths[role]} is not on the T1c grid ({paths['t1c']}): shape "
                f"{img.shape[:3]} vs {t1c_img.shape[:3]} or a different affine; ctvlab needs T1, FLAIR and "
                "masks co-registered and resampled onto the T1c (see docs/guides/own-cohort.md)"
            )
    try:
        masks = masks_from_labels(np.asarray(seg), preset.labels)
    except ValueError as e:
        raise DataError(f"patient {pid}: seg file {paths['seg']} {e}") from None
    notes += _check_volume_file(p, preset.labels, np.asarray(seg), seg_img)

    columns: dict[str, str] = {}

    def put(column: str, name: str) -> None:
        columns[column] = f"{pid}/{name}"

    for role in ("t1c", "t1", "flair"):
        put(role, _copy_image(paths[role], folder, role))
    brain, how = _brain(p, t1c_img, np.asarray(t1c), masks["t2l_mask"])
    notes += how
    for column, mask in {"brain_mask": brain, **masks}.items():
        _save(folder / f"{column}.nii.gz", mask, t1c_img, np.uint8)
        put(column, f"{column}.nii.gz")
    notes += _diffusion(p, folder, put)
    if preset.followup is not None:
        notes += _progression(p, pid, preset, t1c_img, folder, put)
    missing = [c for c in ("adc", "fa", "cavity_mask", "cel_progression_mask") if c not in columns]
    if missing:
        notes.append(f"not available: {', '.join(missing)}")
    row = ManifestRow.model_validate({"patient_id": pid, **columns})
    return row, notes


def _check_volume_file(p: _Patient, labels: Labels, seg: np.ndarray, seg_img) -> list[str]:
    """Refuse a label mapping that disagrees with the collection's volume file, when it ships one.

    Raises:
        DataError: the file cannot be read, or a label's volume is not the one the file gives it.
    """
    if not labels.volume_keys:
        return []
    volumes = p.find("volumes")
    if volumes is None:
        return ["no volume file: the label mapping was not checked"]
    try:
        stated = json.loads(volumes.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"patient {p.id}: volume file {volumes} cannot be read as JSON: {e}") from None
    voxel_mm3 = float(abs(np.linalg.det(seg_img.affine[:3, :3])))
    wrong = volume_mismatches(seg, voxel_mm3, stated, labels)
    if wrong:
        raise DataError(
            f"patient {p.id}: the label mapping disagrees with the volume file {volumes}: {'; '.join(wrong)}. "
            "The labels are numbered otherwise in this copy: correct them with --labels FILE"
        )
    return [f"label mapping checked against {volumes.name}"]


def _brain(p: _Patient, t1c_img, t1c: np.ndarray, lesion: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The collection's brain mask, else the one derived from the skull-stripped T1c; and how it was made."""
    brain_file = p.find("brain_mask")
    if brain_file is None:
        return brain_from_t1c(t1c, lesion), ["brain mask derived from the skull-stripped T1c"]
    img, brain = _load(p.id, "brain_mask", brain_file)
    if not on_grid(img.shape, img.affine, t1c_img.shape, t1c_img.affine):
        raise DataError(f"patient {p.id}: brain_mask file {brain_file} is not on the T1c grid")
    return np.asarray(brain) > 0.5, []


def _diffusion(p: _Patient, folder: Path, put: Callable) -> list[str]:
    """The ADC (as given, else from the DTI trace) and the FA, where the collection has them."""
    notes = []
    adc, trace, fa = p.find("adc"), p.find("trace"), p.find("fa")
    if adc is not None:
        put("adc", _copy_image(adc, folder, "adc"))
    elif trace is not None:
        trace_img, trace_data = _load(p.id, "trace", trace)
        try:
            adc_data, unit = adc_from_trace(trace_data)
        except ValueError as e:
            raise DataError(f"patient {p.id}: trace file {trace} {e}") from None
        _save(folder / "adc.nii.gz", adc_data, trace_img, np.float32)
        put("adc", "adc.nii.gz")
        notes.append(f"ADC = DTI trace / 3 (trace in {unit}, ADC written in mm²/s)")
    if fa is not None:
        put("fa", _copy_image(fa, folder, "fa"))
    return notes


def _progression(p: _Patient, pid: str, preset: Preset, t1c_img, folder: Path, put: Callable) -> list[str]:
    """The follow-up segmentation as progression masks, when it lies on the pre-RT T1c grid; otherwise the
    follow-up T1c and its masks declared as a follow-up (`<patient>/followup/`, `ctvlab.ingest.followup`),
    for `ctvlab register` to bring onto the pre-RT grid."""
    seg_file = p.find("seg", preset.followup)
    if seg_file is None:
        return [f"no segmentation at time point {preset.followup}: no progression masks"]
    img, seg = _load(pid, "follow-up seg", seg_file)
    try:
        masks = masks_from_labels(np.asarray(seg), preset.labels)
    except ValueError as e:
        raise DataError(f"patient {pid}: follow-up seg file {seg_file} {e}") from None
    if not on_grid(img.shape, img.affine, t1c_img.shape, t1c_img.affine):
        return _declare_followup(p, preset, img, masks, seg_file, folder)
    for name, mask in (
        ("cel_progression_mask", masks["cel_mask"]),
        ("t2l_progression_mask", masks["t2l_mask"]),
    ):
        _save(folder / f"{name}.nii.gz", mask, t1c_img, np.uint8)
        put(name, f"{name}.nii.gz")
    return [f"progression masks from time point {preset.followup} (already on the pre-RT grid)"]


def _declare_followup(p: _Patient, preset: Preset, seg_img, masks, seg_file: Path, folder: Path) -> list[str]:
    """The follow-up T1c and its progression masks, in the follow-up's own space, in `<patient>/followup/`."""
    from ctvlab.ingest.followup import FOLLOWUP_FOLDER

    where = f"the time point {preset.followup} segmentation ({seg_file}) is not on the pre-RT T1c grid"
    image = p.find("t1c", preset.followup)
    if image is None:
        return [
            f"progression: {where} and there is no T1c at that time point: the progression masks are left empty"
        ]
    t1c_img, _ = _load(p.id, "follow-up t1c", image)
    if not on_grid(seg_img.shape, seg_img.affine, t1c_img.shape, t1c_img.affine):
        return [
            f"progression: {where} nor on its own time point's T1c ({image}): the progression masks are left empty"
        ]
    out = folder / FOLLOWUP_FOLDER
    out.mkdir()
    _copy_image(image, out, "t1c")
    for name, mask in (
        ("cel_progression_mask", masks["cel_mask"]),
        ("t2l_progression_mask", masks["t2l_mask"]),
    ):
        _save(out / f"{name}.nii.gz", mask, seg_img, np.uint8)
    return [
        f"progression: {where}; declared as a follow-up ({FOLLOWUP_FOLDER}/: its T1c and masks in their own "
        "space): `ctvlab register` brings the masks onto the pre-RT grid"
    ]


def find_patients(src: Path, preset: Preset, only: list[str] | None = None) -> list[Path]:
    """The collection's patient folders, sorted; `only` keeps those whose folder name it lists."""
    found = sorted(p for p in src.glob(preset.patients) if p.is_dir() and _inside(src, p))
    if only:
        names = {p.name for p in found}
        absent = [o for o in only if o not in names]
        if absent:
            raise ConfigError(
                f"--patient {', '.join(absent)}: no such patient folder in {src} ({preset.patients})"
            )
        found = [p for p in found if p.name in only]
    return found


def import_layout(
    preset: Preset,
    src: Path,
    out: Path,
    patients: list[str] | None = None,
    timepoint: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ImportOutcome:
    """Convert the collection in `src` (laid out as `preset`) into the new cohort folder `out`.

    Raises:
        ConfigError: `out` exists, `src` is not a folder, or no patient folder matches the preset.
        DataError: no patient could be imported (each one's reason in the message); nothing is written.
    """
    from ctvlab.atomic import atomic_folder, write_json_atomic

    src, out = Path(src), Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists: import-layout writes a new cohort folder and never into an old one")
    if not src.is_dir():
        raise ConfigError(
            f"{src} is {'a file' if src.exists() else 'not found'}: give the collection's folder"
        )
    found = find_patients(src, preset, patients)
    if not found:
        raise ConfigError(
            f"no patient folder in {src} matches {preset.patients!r} ({preset.title}): is this the folder "
            "you downloaded, and the right layout?"
        )
    rows: list[ManifestRow] = []
    skipped: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    with atomic_folder(out) as tmp:
        for patient_dir in found:
            folder = tmp / patient_dir.name
            folder.mkdir()
            try:
                row, notes[patient_dir.name] = import_patient(src, preset, patient_dir, folder, timepoint)
            except DataError as e:  # this patient only: nothing of it stays in the cohort
                shutil.rmtree(folder, ignore_errors=True)
                skipped[patient_dir.name] = str(e)
                continue
            rows.append(row)
            if progress is not None:
                progress(row.patient_id)
        if not rows:
            raise DataError("no patient could be imported:\n" + "\n".join(skipped.values()))
        write_manifest(tmp, rows)
        write_json_atomic(tmp / REPORT_NAME, {
            "layout": preset.name, "source": str(src), "sources": list(preset.sources),
            "labels": preset.labels.model_dump(mode="json"), "collection_lacks": list(preset.notes),
            "patients": notes, "skipped": skipped,
        })  # fmt: skip
    return ImportOutcome(out=out, rows=rows, skipped=skipped, notes=notes, lacks=preset.notes)
