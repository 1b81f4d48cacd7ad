"""The layout of a prepared dataset (the output of `ctvlab preprocess`), in one place.

```
PREP/
  dataset.json                 digest of the whole dataset, ctvlab version, settings, channel names
  patients.parquet             one row per patient: clinical fields and the per-patient summary
  volumes/<id>.npy             float32 (C, X, Y, Z): the 13 feature channels of FEATURES, NaN where
                               a value is missing (MRSI outside its PRESS box, or no MRSI at all)
  volumes/<id>_masks.npy       uint8 (M, X, Y, Z): the channels of MASKS; CATEGORY holds codes
  volumes/<id>.json            sidecar: affine, spacing, shape, channel names, input hash, native grid
  voxels/patient_id=<id>/      Parquet, one row per brain voxel within the ring (hive-partitioned)
  splits.parquet, splits.json  patient-level splits and their digest (`ctvlab split`)
  pseudonym_salt               secret salt for patient pseudonyms sent to MLflow (never logged)
```
Axis order is (X, Y, Z) in RAS+ orientation: the affine's rotation part is diagonal and positive, so
voxel (i, j, k) lies at world `affine @ (i, j, k, 1)` in millimetres.
"""

from __future__ import annotations

from pathlib import Path

from ctvlab.study import FEATURES

__all__ = [
    "CATEGORIES",
    "CATEGORY_CODES",
    "DIFFUSION_FEATURES",
    "FEATURES",
    "MASKS",
    "MODALITY_SETS",
    "MRSI_FEATURES",
    "PrepPaths",
]

MRSI_FEATURES: tuple[str, ...] = ("nCho", "nCre", "nNAA", "nLac", "nLip", "CNI", "CCrI", "CrNI")
DIFFUSION_FEATURES: tuple[str, ...] = ("nADC", "nFA")

# Mask channels of volumes/<id>_masks.npy, in order. All binary (0/1) except "category".
MASKS: tuple[str, ...] = (
    "brain",       # skull-stripped brain
    "cel",         # pre-RT contrast-enhancing lesion
    "t2l",         # pre-RT T2 lesion (includes the CEL)
    "nel",         # pre-RT non-enhancing lesion = T2L − CEL
    "cavity",      # resection cavity
    "ventricles",
    "critical",    # brainstem and thalamus: removed from every CTV
    "nav",         # normal-appearing voxels = brain − cavity − ventricles − T2L − CEL
    "cel_prog",    # CEL at progression (aligned to pre-RT space)
    "t2l_prog",    # T2L at progression
    "ring",        # brain voxels within ring_mm of the pre-RT T2L (Euclidean, world mm)
    "target",      # U-Net target: (NEL ∪ CEL pre-RT) ∪ (NEL ∪ CEL at progression), within the brain
    "mrsi",        # voxels with MRSI values (inside the resampled PRESS box)
    "category",    # voxel category code (CATEGORY_CODES), 0 outside the ring
)  # fmt: skip

# Voxel categories between the two time points (the study's Methods: Regions). "other" is a ring voxel in none of
# the four (pre-RT lesion that stays lesion, cavity, ventricles).
CATEGORY_CODES: dict[int, str] = {
    0: "outside",
    1: "NAV->NAV",
    2: "NAV->NEL",
    3: "NAV->CEL",
    4: "NEL->CEL",
    5: "other",
}
CATEGORIES: dict[str, int] = {v: k for k, v in CATEGORY_CODES.items()}

# U-Net input channel sets (the study's Methods: Deep learning CTV, modality ablations), in channel order.
MODALITY_SETS: dict[str, tuple[str, ...]] = {
    "anat": ("nFLAIR", "nT1c"),
    "anat_diff": ("nFLAIR", "nT1c", "nADC", "nFA"),
    "anat_mrsi": ("nFLAIR", "nT1c", "CNI", "CCrI"),
    "all": ("nFLAIR", "nT1c", "nADC", "nFA", "CNI", "CCrI"),
}


class PrepPaths:
    """Paths inside a prepared dataset folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    @property
    def patients(self) -> Path:
        return self.root / "patients.parquet"

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    @property
    def voxels(self) -> Path:
        return self.root / "voxels"

    @property
    def splits(self) -> Path:
        return self.root / "splits.parquet"

    @property
    def splits_json(self) -> Path:
        return self.root / "splits.json"

    @property
    def salt(self) -> Path:
        return self.root / "pseudonym_salt"

    @property
    def report(self) -> Path:
        return self.root / "preprocess_report.json"

    def features(self, patient_id: str) -> Path:
        return self.volumes / f"{patient_id}.npy"

    def masks(self, patient_id: str) -> Path:
        return self.volumes / f"{patient_id}_masks.npy"

    def sidecar(self, patient_id: str) -> Path:
        return self.volumes / f"{patient_id}.json"

    def voxel_partition(self, patient_id: str) -> Path:
        return self.voxels / f"patient_id={patient_id}"


# Distance (mm) from a voxel's centre to the nearest pre-RT T2L voxel (0 inside): the baseline a sceptic
# tries first ("progression happens next to the lesion"), scored beside every voxel model.
DISTANCE_COLUMN = "dist_t2l_mm"
# Version of the prepared files' layout; part of preprocessing's settings hash, so a dataset prepared
# under an older layout is prepared again rather than read with missing columns.
PREPARED_FORMAT = 2


def voxel_table_schema():
    """Arrow schema of the files under voxels/ (patient_id comes from the hive partition folder).

    One row per brain voxel within the ring. Features are null where the value is missing (MRSI
    outside the PRESS box or not acquired). `voxel_index` is the C-order flat index into (X, Y, Z);
    `dist_t2l_mm` the voxel's distance to the pre-RT T2L in mm.
    """
    import pyarrow as pa

    return pa.schema(
        [pa.field("voxel_index", pa.int32(), nullable=False)]
        + [pa.field(f, pa.float32()) for f in FEATURES]
        + [
            pa.field("category", pa.string(), nullable=False),
            pa.field("cohort", pa.string(), nullable=False),
            pa.field("pfs_months", pa.float32(), nullable=False),
            pa.field(DISTANCE_COLUMN, pa.float32(), nullable=False),
        ]
    )
