"""Typed settings for every stage, loaded from YAML.

One place defines each default (the study's value where the paper gives one, with its section). Variants
such as the loss, the β schedule or the modality set are values chosen by name, not subclasses. Unknown
keys are errors that name the key and the file, so a typo never silently falls back to a default.

The JSON Schema of `StudyConfig` is exported to `schemas/config.schema.json` (see `ctvlab.schemas`).

About 700 lines in one module on purpose: the settings of every stage form one validated document (one
JSON Schema, one `--set` namespace), and each default sits beside its description.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ctvlab.errors import ConfigError
from ctvlab.study import FEATURES, TVERSKY_ALPHA, TVERSKY_BETA

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Strict(BaseModel):
    """Base for every settings model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --- cohort and synthetic data ---------------------------------------------------------------------


class SynthConfig(Strict):
    """The synthetic cohort (docs: explanation/synthetic-cohort.md and synthetic-cohort-ceiling.md).

    Four signal settings move the cohort between "nothing for imaging to find" and a positive control,
    without making the infiltration visible on T1c or FLAIR: `imaging_strength` (what diffusion and MRSI
    see of it) and three departures from near-isotropic recurrence (`channelling`, `seeding`,
    `determinism`). Their defaults are today's cohort; `preset` picks a measured combination by name,
    and values given beside it override the preset's.
    """

    n_patients: int = Field(101, ge=1, description="Patients to generate (the study had 101).")
    seed: int = Field(0, description="Master seed; patient i uses a stream derived from (seed, i).")
    null: bool = Field(
        False,
        description="Control cohort: diffusion and MRSI reflect only the visible lesion, not the "
        "invisible infiltration that decides future growth (the same as imaging_strength 0).",
    )
    preset: Literal["today", "mild", "moderate", "strong"] | None = Field(
        None,
        description="A named, measured set of the signal settings (see docs/synthetic-cohort-ceiling.md): "
        "today (the defaults), mild, moderate, strong (a positive control: the true pre-RT density covers "
        "≥ 0.10 more of the new progression than a 10 mm margin of the same volume). Settings given "
        "beside it override its values.",
    )
    imaging_strength: Fraction = Field(
        1.0,
        description="How strongly diffusion and MRSI see the invisible infiltration: 1 its full density, "
        "0 the visible lesion only (as null: true), in between that fraction of its density. Anatomy "
        "(T1c, T1, FLAIR, masks) does not depend on it.",
    )
    channelling: Fraction = Field(
        0.0,
        description="How strictly invasion keeps to white-matter routes: 0 today's straight routes; above 0 "
        "the routes follow the white matter, D off them falls towards 1% of D on them and the invisible "
        "tail reaches far along them only.",
    )
    seeding: Fraction = Field(
        0.0,
        description="Probability that an invasion route carries an invisible focus (below the T2L "
        "threshold) near the drawn recurrence distance, which grows into the recurrence.",
    )
    determinism: Fraction = Field(
        0.0,
        description="How deterministically the recurrence follows the pre-RT infiltration: 0 today's "
        "post-RT chance (a redrawn invasiveness field, new routes, unimaged radio-resistance); 1 none, "
        "and after RT the tumour regrows where its cells are (D × 0.05) instead of invading new ground.",
    )
    anatomy_mm: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        (2.0, 2.0, 2.0), description="Voxel size of T1c, T1, FLAIR and all masks (mm)."
    )
    diffusion_mm: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        (1.8, 1.8, 2.5), description="Voxel size of ADC and FA (mm); anisotropic like clinical DTI."
    )
    mrsi_mm: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        (10.0, 10.0, 10.0), description="Nominal MRSI voxel size (mm)."
    )
    press_box_mm: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        (80.0, 80.0, 40.0), description="PRESS-excited volume (mm); MRSI exists only inside it."
    )
    growth_mm: PositiveFloat = Field(
        3.0, description="Grid spacing of the reaction-diffusion simulation (mm)."
    )
    mrsi_missing_fraction: Fraction = Field(
        0.05, description="Fraction of patients whose MRSI failed quality control (columns left empty)."
    )
    max_rotation_deg: float = Field(6.0, ge=0, description="Per-patient random rigid rotation bound.")
    max_translation_mm: float = Field(5.0, ge=0, description="Per-patient random translation bound.")
    num_workers: int | None = Field(
        None, ge=1, description="Parallel patient generators; default: the number of CPU cores."
    )
    t2l_density: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.25,
        description="Tumour-cell density (fraction of carrying capacity) visible as T2/FLAIR "
        "hyperintensity; below it the infiltration is invisible on anatomical MRI.",
    )
    cel_density: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.6, description="Tumour-cell density above which the lesion enhances (CEL)."
    )
    noise: float = Field(
        1.0, ge=0, description="Scale of every image's noise and bias field (0: noise-free images)."
    )
    field_of_view_margin_mm: float = Field(
        10.0, ge=0, description="Margin between the brain and the edge of the anatomy and diffusion grids."
    )

    @staticmethod
    def presets() -> dict[str, dict[str, float]]:
        """The named signal settings (measured in docs/synthetic-cohort-ceiling.md): the one registry."""
        return {
            "today": {"imaging_strength": 1.0, "channelling": 0.0, "seeding": 0.0, "determinism": 0.0},
            "mild": {"imaging_strength": 1.0, "channelling": 0.5, "seeding": 0.5, "determinism": 0.5},
            "moderate": {"imaging_strength": 1.0, "channelling": 0.75, "seeding": 0.75, "determinism": 0.75},
            "strong": {"imaging_strength": 1.0, "channelling": 1.0, "seeding": 1.0, "determinism": 1.0},
        }

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            values = cls.presets().get(data["preset"])
            if values is not None:  # an unknown name is left for the Literal to report
                return {**values, **data}
        return data

    @property
    def sensing_strength(self) -> float:
        """What diffusion and MRSI see of the invisible infiltration: 0 for the null cohort."""
        return 0.0 if self.null else self.imaging_strength

    @model_validator(mode="after")
    def _cel_above_t2l(self) -> SynthConfig:
        if self.cel_density <= self.t2l_density:
            raise ValueError("synth.cel_density must exceed synth.t2l_density (enhancing lesion ⊆ T2 lesion)")
        if self.null and self.imaging_strength not in (0.0, 1.0):
            raise ValueError(
                f"synth.null is imaging_strength 0; it contradicts imaging_strength {self.imaging_strength}: "
                "set one of them"
            )
        return self


class InputLimits(Strict):
    """Caps on what validation reads, checked before anything is allocated. The defaults fit a 24 GB
    machine with room to spare: a clinical brain MRI is a few to a few hundred MB uncompressed."""

    max_file_mb: PositiveFloat = Field(2048, description="Largest file on disk (MB).")
    max_decompressed_mb: PositiveFloat = Field(4096, description="Largest decompressed .nii.gz (MB).")
    max_image_mb: PositiveFloat = Field(4096, description="Largest array a header may announce (MB).")
    max_output_voxels: int = Field(
        50_000_000, gt=0, description="Largest preprocessing grid over a T1c's field of view (voxels)."
    )


class CohortConfig(Strict):
    """Where the raw cohort comes from: generated (`synth`) or a folder in the documented layout."""

    source: Literal["synth", "raw"] = "synth"
    raw_dir: Path | None = Field(None, description="A cohort folder with manifest.csv (source: raw).")
    limits: InputLimits = Field(default_factory=InputLimits)

    @model_validator(mode="after")
    def _raw_needs_dir(self) -> CohortConfig:
        if self.source == "raw" and self.raw_dir is None:
            raise ValueError("cohort.source is 'raw' but cohort.raw_dir is not set")
        return self


# --- preprocessing -------------------------------------------------------------------------------


class PreprocessConfig(Strict):
    """Resampling, normalisation and regions (the study's Methods: Regions, Preprocessing)."""

    voxel_mm: PositiveFloat = Field(
        3.0,
        description="Isotropic output voxel size (mm). 3 mm: the study resampled to 3 mm to "
        "absorb residual misalignment between sequences.",
    )
    ring_mm: PositiveFloat = Field(
        40.0, description="Voxel analyses use brain voxels within this distance of the pre-RT T2L."
    )
    bbox_margin_mm: float = Field(6.0, ge=0, description="Margin around the brain's bounding box.")
    mask_threshold: Fraction = Field(0.5, description="Interpolated masks are binarised at this level.")
    mrsi_coverage_threshold: Fraction = Field(
        0.5, description="An output voxel has MRSI when at least this fraction of it lies in the grid."
    )
    mode_bins: int = Field(
        256, ge=16, description="Histogram bins for the NAV mode (after clipping to robust range)."
    )
    mode_smoothing: float = Field(
        2.0, ge=0, description="Gaussian smoothing (in bins) of the histogram before taking its peak."
    )
    min_category_voxels: int = Field(
        5, ge=1, description="A voxel category counts for a patient only with at least this many voxels."
    )
    min_nav_voxels: int = Field(
        100,
        ge=1,
        description="A map's NAV mode needs at least this many normal-appearing voxels with a value "
        "(for MRSI: inside the PRESS box); fewer fails the patient.",
    )
    cpus_per_patient: PositiveFloat = Field(1.0, description="Ray CPUs reserved by each patient task.")
    max_concurrent_patients: int | None = Field(
        None,
        ge=1,
        description="Patients processed at once. Default: the machine's cores for a local Ray, as many "
        "as the CPUs allow on a cluster.",
    )


# --- splits --------------------------------------------------------------------------------------


class SplitConfig(Strict):
    """Patient-level splits (the study's Methods: Deep learning CTV; Voxel-wise random forest)."""

    seed: int = 0
    dl_fractions: tuple[Fraction, Fraction, Fraction] = Field(
        (0.67, 0.16, 0.17), description="Train/val/test fractions of patients, stratified by cohort."
    )
    dl_counts: tuple[int, int, int] | None = Field(
        (67, 16, 18),
        description="Train/val/test patient counts used instead of the fractions when the cohort has exactly "
        "their sum of patients (the study: 67/16/18 of 101; null: always the fractions).",
    )
    n_folds: int = Field(5, ge=2, description="Voxel-model cross-validation folds.")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        if abs(sum(self.dl_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split.dl_fractions must sum to 1, got {sum(self.dl_fractions):.3f}")
        return self


# --- voxel-wise models and statistics --------------------------------------------------------------

VoxelTarget = Literal["nel", "cel", "any"]
Subgroup = Literal["all", "early", "late"]


class RandomForestConfig(Strict):
    """scikit-learn random forest.

    The defaults bound the cost of a fold on ~2M ring voxels (a 101-patient cohort) so that the study's
    grid of 30 fits runs in minutes on 2 cores; `benchmarks/voxel_models.py` compares them with a forest
    that sees every training voxel.
    """

    n_estimators: int = Field(100, ge=1)
    max_depth: int | None = Field(
        12, ge=1, description="Maximum tree depth; None grows until leaves are pure."
    )
    max_samples: int | float | None = Field(
        20_000,
        description="Bootstrap sample drawn for each tree: a count of voxels (int, capped at the training "
        "fold's size), a fraction of the training fold (float in (0, 1]), or None for all of them. The "
        "main bound on training time: a tree's cost grows with its sample, not with the fold's size.",
    )
    min_samples_leaf: int = Field(5, ge=1)
    max_features: Literal["sqrt", "log2"] | Annotated[float, Field(gt=0, le=1)] = Field(
        "sqrt", description="Features tried per split: 'sqrt', 'log2' or a fraction."
    )
    n_jobs: int = Field(1, ge=1, description="Threads per fold (folds already run in parallel).")

    @model_validator(mode="after")
    def _max_samples_range(self) -> RandomForestConfig:
        m = self.max_samples
        if isinstance(m, float) and not 0 < m <= 1:
            raise ValueError(f"rf.max_samples as a fraction must lie in (0, 1], got {m}")
        if isinstance(m, int) and m < 1:
            raise ValueError(f"rf.max_samples as a count must be at least 1, got {m}")
        return self


class XGBoostConfig(Strict):
    """XGBoost gradient-boosted trees; missing MRSI values take XGBoost's learned default branch."""

    n_estimators: int = Field(100, ge=1)
    max_depth: int = Field(6, ge=1)
    learning_rate: PositiveFloat = 0.1
    subsample: Annotated[float, Field(gt=0, le=1)] = 0.8
    colsample_bytree: Annotated[float, Field(gt=0, le=1)] = 0.8
    tree_method: Literal["hist", "approx", "exact"] = "hist"
    n_jobs: int = Field(1, ge=1, description="Threads per fold (folds already run in parallel).")


class VoxelModelConfig(Strict):
    """Voxel-wise progression models with patient-grouped, stratified CV (the study's Methods: Voxel-wise RF)."""

    model: Literal["rf", "xgboost"] = "rf"
    targets: list[VoxelTarget] = Field(default_factory=lambda: ["cel", "nel"])
    subgroups: list[Subgroup] = Field(default_factory=lambda: ["all"])
    features: list[str] = Field(
        default_factory=lambda: list(FEATURES),
        description="Feature columns of the voxel table (default: the study's 13).",
    )
    subgroup_threshold_months: PositiveFloat | None = Field(
        None,
        description="PFS that separates early (<) from late (≥) progressors; default: the median PFS of "
        "the patients in the fold map (the study's cohort median was 7.0 months).",
    )
    rf_missing: Literal["impute_nav", "covered_only"] = Field(
        "impute_nav",
        description="Random forest only (XGBoost handles missing values natively): impute_nav fills a "
        "missing value with the median of the training fold's stable (NAV→NAV) voxels (≈1 for "
        "normalised maps, ≈0 for the indices); covered_only drops voxels with any missing feature from "
        "training and test folds, so AUCs then describe voxels with MRSI only.",
    )
    missing_check: bool = Field(
        True,
        description="Random forest only: also run both missing-MRSI policies with every feature and with "
        "the anatomical ones (all patients), and report each policy's AUC gain over anatomy beside the "
        "chosen one (results/voxel_models/missing_policies.csv). On a --null cohort the gain should be ≈ 0.",
    )
    class_balance: Literal["balanced", "subsample"] = Field(
        "balanced",
        description="balanced: class weights inversely proportional to class counts; subsample: keep "
        "every progressed voxel and a random stable_ratio times as many stable voxels. Either applies "
        "to the training fold only; test folds are never changed.",
    )
    stable_ratio: PositiveFloat = Field(
        3.0, description="With class_balance=subsample: stable voxels kept per progressed voxel."
    )
    permutation_repeats: int = Field(3, ge=1, description="Shuffles per feature for permutation importance.")
    bootstrap_resamples: int = Field(
        1000, ge=0, description="Patient-level bootstrap resamples for the AUCs' 95% intervals (0: none)."
    )
    max_test_rows_for_permutation: int = Field(
        10_000,
        ge=1000,
        description="Permutation importance (drop in test AUC when a feature is shuffled) runs on a random "
        "subset of at most this many test voxels.",
    )
    rf: RandomForestConfig = Field(default_factory=RandomForestConfig)
    xgboost: XGBoostConfig = Field(default_factory=XGBoostConfig)
    cpus_per_fold: PositiveFloat = Field(1.0, description="Ray CPUs reserved by each fold's task.")
    seed: int = Field(0, description="Fold k's model, subsampling and permutations use seed (seed, k).")

    @model_validator(mode="after")
    def _known_features(self) -> VoxelModelConfig:
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or not self.features:
            raise ValueError(f"voxel_models.features: {unknown or 'empty'}; choose from {list(FEATURES)}")
        return self


class StatsConfig(Strict):
    """Per-patient medians per voxel category and paired tests (the study's Methods: Statistics)."""

    min_voxels: int = Field(
        5,
        ge=1,
        description="A patient's category enters a feature's statistics only with at least this many "
        "voxels holding a value of that feature (the study: 5).",
    )
    significance: Fraction = 0.05
    primary_test: Literal["wilcoxon", "mannwhitney"] = Field(
        "wilcoxon",
        description="The test behind `significant` and the stars in the box plots: the Wilcoxon signed-rank "
        "test on per-patient pairs (the medians are paired by patient), or the Mann–Whitney U test the "
        "paper names. Both p-values are always reported.",
    )
    features: list[str] = Field(default_factory=lambda: list(FEATURES))

    @model_validator(mode="after")
    def _known_features(self) -> StatsConfig:
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or not self.features:
            raise ValueError(f"stats.features: {unknown or 'empty'}; choose from {list(FEATURES)}")
        return self


# --- U-Net training ------------------------------------------------------------------------------

ModalitySet = Literal["anat", "anat_diff", "anat_mrsi", "all"]
LossName = Literal["dice", "tversky", "pcc", "pcc+bce", "pcc+0.5bce"]


class BetaSchedule(Strict):
    """Tversky β over epochs, with α = 1 − β (the study swept β with α = 1 − β; Results, Loss functions).

    Epochs count from 0. `constant`: β = start throughout. `linear`: β goes from start at epoch 0 to end
    at epoch ramp_epochs, then stays at end. `step`: β = start before step_epoch, end from it on.
    """

    kind: Literal["constant", "linear", "step"] = "constant"
    start: Fraction = Field(TVERSKY_BETA, description="β at epoch 0 (study optimum 0.98, so α = 0.02).")
    end: Fraction = Field(TVERSKY_BETA, description="β after the ramp or the step (unused by constant).")
    ramp_epochs: int = Field(10, ge=1, description="linear: epochs from start to end.")
    step_epoch: int = Field(10, ge=0, description="step: the epoch from which β = end.")


class LossConfig(Strict):
    """The training loss, by name (Methods, Loss functions).

    `dice`; `tversky` with α = 1 − β and β from `beta` (per epoch); `pcc`: Tversky with a per-patient
    β = 1/(f+1), f the patient's lesion fraction of the brain (Eq. 1); `pcc+bce`, `pcc+0.5bce`: PCC plus
    (half) the binary cross-entropy over brain voxels. All statistics are restricted to the brain.
    """

    name: LossName = "pcc"
    beta: BetaSchedule = Field(default_factory=BetaSchedule)


class OptimConfig(Strict):
    """Optimiser (Methods: Ranger = RAdam + Lookahead beat Adam and SGD)."""

    name: Literal["ranger", "adam", "sgd"] = "ranger"
    lr: PositiveFloat = Field(5e-5, description="Study optimum: 5e-5 (Methods, Hyperparameter search).")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Fraction, Fraction] = Field(
        (0.95, 0.999), description="ranger and adam: moment decay rates; (0.95, 0.999) is Ranger's default."
    )
    eps: PositiveFloat = Field(1e-5, description="ranger and adam: denominator term; Ranger's default.")
    momentum: Fraction = Field(0.9, description="SGD only.")
    lookahead_k: int = Field(6, ge=1, description="Ranger: slow weights update every k steps.")
    lookahead_alpha: Fraction = Field(0.5, description="Ranger: slow-weight step toward fast weights.")


class AugmentConfig(Strict):
    """Training-time augmentation (Methods): flips, rotations, noise, channel shuffle and drop.

    Each probability is per example. Flips are drawn per axis; rotations draw one angle per axis in
    ±rotate_deg; noise is added to the image inside the brain only; channel drop zeroes one random image
    channel (as in the BraTS 2020 pipeline the study's network comes from, Henry et al. 2021).
    """

    flip_prob: Fraction = Field(0.5, description="Probability of a flip, drawn for each axis.")
    rotate_prob: Fraction = 0.3
    rotate_deg: float = Field(10.0, ge=0, le=180, description="Maximum rotation about each axis (degrees).")
    noise_prob: Fraction = 0.3
    noise_std: float = Field(0.02, ge=0, description="In min-max normalised units.")
    channel_shuffle_prob: Fraction = 0.1
    channel_drop_prob: Fraction = 0.1


class UNetModelConfig(Strict):
    """The 3D U-Net (Methods, Fig. 5b): 4 encoder stages of two 3×3×3 convolutions, features f…8f."""

    base_features: int = Field(48, ge=1, description="Features f of the first stage. Study optimum: 48.")
    modality_set: ModalitySet = Field("all", description="Input channels (ctvlab.data.layout.MODALITY_SETS).")
    norm: Literal["instance", "batch", "group"] = Field(
        "instance", description="Normalisation after each convolution (group: up to 8 groups)."
    )
    dropout: Fraction = Field(0.0, description="Channel dropout (Dropout3d) after the bottleneck block.")
    input_region: Literal["ring", "grid"] = Field(
        "ring",
        description="What the network sees of a patient. ring: the box of the study's analysis region (the "
        "brain within preprocess.ring_mm of the pre-RT T2L, where every recurrence of the study happened), "
        "a third to a half of the whole 3 mm grid and that much cheaper to train and apply; outside it the "
        "probability is 0. grid: the whole prepared grid.",
    )


class TrainConfig(Strict):
    epochs: int = Field(150, ge=1, description="The study's model converged at epoch 123.")
    batch_size: int = Field(1, ge=1, description="Study optimum: mini-batch 1.")
    val_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(5, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="Besides the best, keep this many recent ones.")
    max_failures: int = Field(
        2, ge=0, description="Worker failures survived by restarting from a checkpoint."
    )
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    gpus_per_worker: PositiveFloat = Field(
        1.0, description="GPUs per worker when use_gpu (fractions share a GPU)."
    )
    cpus_per_worker: PositiveFloat = Field(1.0, description="Ray CPUs reserved by each training worker.")
    data_cpus: float = Field(
        0.5,
        ge=0.25,
        description="Ray CPUs kept free for the Ray Data tasks that read and prepare the volumes (shared by "
        "the trials of a search). Workers and trials never take them, so the data tasks can always run: "
        "a run whose workers held every CPU would wait for its data forever. The run fails at once when "
        "workers plus this budget exceed the cluster.",
    )
    mixed_precision: Literal["auto", "bf16", "off"] = Field(
        "auto", description="auto: bf16 autocast on GPU, off on CPU."
    )
    threshold: Fraction = Field(0.5, description="Probability threshold for validation metrics.")
    patience: int | None = Field(
        None,
        ge=1,
        description="Early stopping: end training after this many validated epochs without a better "
        "validation Tversky (the best model is kept); None trains every epoch.",
    )
    seed: int = 0


class UNetConfig(Strict):
    model: UNetModelConfig = Field(default_factory=UNetModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    final_loss: LossName | None = Field(
        "pcc",
        description="After a search, the best configuration is trained again with this loss for "
        "unet.train.epochs (early stopping by unet.train.patience) and that model is evaluated, as in the "
        "study (PCC, converged at epoch 123). None: the search's best trial is the evaluated model.",
    )
    registered_model_name: str = "ctvlab-unet"


# --- hyperparameter search -------------------------------------------------------------------------


class LogUniform(Strict):
    low: PositiveFloat
    high: PositiveFloat


class SearchSpace(Strict):
    """The random-search space (Methods: lr, base features, batch size; here also loss and β)."""

    lr: LogUniform = Field(default_factory=lambda: LogUniform(low=1e-5, high=1e-4))
    base_features: list[int] = Field(default_factory=lambda: [32, 48, 64])
    batch_size: list[int] = Field(default_factory=lambda: [1, 2])
    loss: list[LossName] = Field(default_factory=lambda: ["pcc"])
    beta_schedule: list[BetaSchedule] = Field(default_factory=lambda: [BetaSchedule()])


class GridSpace(Strict):
    """The coarse grid whose best cell sets the random-search ranges."""

    lr: list[PositiveFloat] = Field(default_factory=lambda: [1e-5, 5e-5, 2e-4])
    base_features: list[int] = Field(default_factory=lambda: [32, 64])
    batch_size: list[int] = Field(default_factory=lambda: [1])


class ASHAConfig(Strict):
    enabled: bool = False
    grace_period: int = Field(5, ge=1)
    reduction_factor: float = Field(3.0, gt=1)


class LossStudyConfig(Strict):
    """The loss study (Supp. Figs. 2 and 3): the search's best configuration trained once per loss, and once
    per Tversky β, every other setting fixed, each scored on the test patients."""

    losses: list[LossName] = Field(
        default_factory=lambda: ["dice", "tversky", "pcc", "pcc+bce", "pcc+0.5bce"],
        min_length=1,
        description="Supp. Fig. 3: the losses compared (tversky at β = 0.98, the study's optimum).",
    )
    betas: list[Fraction] = Field(
        default_factory=lambda: [0.5, 0.7, 0.9, 0.95, 0.98, 0.99],
        description="Supp. Fig. 2: the constant Tversky β of each run of the sweep (α = 1 − β).",
    )
    epochs: int | None = Field(None, ge=1, description="Epochs of each run; default tune.epochs_per_trial.")


class TuneConfig(Strict):
    grid: GridSpace = Field(default_factory=GridSpace)
    run_grid: bool = Field(True, description="Run the grid step first and narrow the ranges from it.")
    space: SearchSpace = Field(default_factory=SearchSpace)
    num_samples: int = Field(30, ge=1, description="Random-search trials (the study ran 30).")
    epochs_per_trial: int = Field(50, ge=1)
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        description="Upper bound on trials at once; the search runs as many as fit on the cluster "
        "beside unet.train.data_cpus, never more.",
    )
    cpus_per_trial: PositiveFloat = Field(
        1.0,
        description="Ray CPUs of each of a trial's unet.train.num_workers training workers (with one worker, "
        "the trial's own process, which trains with this many threads, rounded up).",
    )
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs of each of a trial's training workers.")
    trial_max_failures: int = Field(
        1, ge=0, description="Retries of a failed trial before it is recorded failed."
    )
    asha: ASHAConfig = Field(default_factory=ASHAConfig)
    ablation_sets: list[ModalitySet] = Field(
        default_factory=lambda: ["anat", "anat_diff", "anat_mrsi", "all"]
    )
    ablation_samples: int = Field(15, ge=1, description="Random-search trials per modality set (Fig. 2).")
    loss_study: LossStudyConfig = Field(default_factory=LossStudyConfig)
    ablation_loss: LossName = Field(
        "pcc+bce",
        description="The one loss every input set of the ablation trains with (the study: PCC + BCE), so "
        "that the sets differ in their inputs alone.",
    )
    seed: int = 0


# --- CTVs and evaluation ---------------------------------------------------------------------------


class CTVConfig(Strict):
    """CTV construction and evaluation (the study's Methods: Standard-of-care CTVs, CTV evaluation)."""

    rtog_margin_mm: PositiveFloat = Field(20.0, description="RTOG: (CEL ∪ T2L) + 2 cm.")
    eortc_margin_mm: PositiveFloat = Field(15.0, description="EORTC: (CEL ∪ cavity) + 1.5 cm.")
    eortc_fallback_t2l: bool = Field(
        True,
        description="EORTC: with no CEL and no cavity (a biopsied non-enhancing tumour), expand the T2L "
        "instead, so that the CTV still contains the gross tumour; otherwise such a CTV is empty.",
    )
    threshold: Fraction | Literal["validation"] = Field(
        "validation",
        description="Model probability threshold, or 'validation': the grid value with the highest mean "
        "per-patient Tversky on the validation split (ties: the smaller threshold).",
    )
    threshold_grid: list[Fraction] = Field(
        default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)],
        min_length=1,
        description="Thresholds tried on the validation split.",
    )
    coverage_targets: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.9, 0.95, 0.99],
        description="Coverage CTVs (ctv_cov90, ...): for each target, the model's threshold is chosen on the "
        "validation patients by conformal risk control so that, on a new patient like them, the CTV misses on "
        "average at most 1 − target of the new progression (docs: coverage with a guarantee). A target needs "
        "at least 1/(1 − target) − 1 calibration patients (19 for 0.95, 99 for 0.99); one out of reach is "
        "recorded as such. [] for none.",
    )
    tversky_alpha: Fraction = Field(
        TVERSKY_ALPHA, description="Tversky weight of false positives (study: 0.02)."
    )
    tversky_beta: Fraction = Field(
        TVERSKY_BETA, description="Tversky weight of false negatives (study: 0.98)."
    )
    uncertainty: Literal["tta", "none"] = Field(
        "tta",
        description="Per-voxel uncertainty written beside the probability by evaluate and predict: tta, the "
        "mean and standard deviation of the probability over the eight mirrored inputs (test-time "
        "augmentation with the flips the network was trained with; eight forward passes per patient); none.",
    )
    overlay_patients: int = Field(3, ge=0, description="Patients drawn in the contour figure.")
    write_native_grid: bool = Field(True, description="Also resample CTVs to each patient's T1c grid.")


# --- tracking and Ray ----------------------------------------------------------------------------


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in "
        "the working directory.",
    )
    experiment: str | None = Field(None, description="MLflow experiment; default: the study name.")
    log_patient_images: bool = Field(
        False,
        description="Also send native-grid CTVs, MRI-slice figures and the report's 3D viewer to the tracking "
        "store (opt-in: they show a patient's anatomy; the 3 mm CTVs and the metrics are enough to review a "
        "study).",
    )
    outage_wait_s: Annotated[float, Field(ge=0)] = Field(
        120.0,
        description="At the end of a stage, how long to wait for a tracking server that stopped answering "
        "before the run stops (exit 4) with what is unrecorded; what it missed is kept in "
        "<workdir>/tracking-spool and sent by `ctvlab sync` or the next `ctvlab run`.",
    )


class RayConfig(Strict):
    address: str | None = Field(None, description="Ray cluster address; default: start a local Ray.")
    num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of a local Ray. Default: the machine's CPU cores."
    )
    max_resources: dict[str, PositiveFloat] | None = Field(
        None,
        description="For a cluster that adds nodes on demand: its largest total resources, e.g. "
        "{CPU: 40, GPU: 4}; training and searches are planned from them instead of the nodes running "
        "when the run starts.",
    )
    stall_timeout_s: PositiveFloat = Field(
        600.0,
        description="A training run or search that makes no progress for this long while resource "
        "demands stay pending fails, naming the demands (instead of waiting forever).",
    )
    progress_every_s: PositiveFloat = Field(
        60.0, description="How often a search prints what each trial is doing or waiting for."
    )


# --- the pipeline ---------------------------------------------------------------------------------


class PipelineConfig(Strict):
    """Which stages `ctvlab run` performs (cohort, validation, preprocessing and split always run)."""

    voxel_models: bool = Field(
        True, description="Voxel-wise progression models (voxel-models) for each target."
    )
    stats: bool = Field(True, description="Per-patient medians per voxel category and paired tests.")
    search: bool = Field(True, description="Hyperparameter search; False trains the `unet` settings once.")
    ablation: bool = Field(False, description="The modality ablation of Fig. 2 (one search per input set).")
    loss_study: bool = Field(
        False,
        description="The loss comparison and Tversky β sweep (Supp. Figs. 3 and 2), from the search's best.",
    )
    evaluate: bool = Field(True, description="Model, RTOG and EORTC CTVs on the test split.")


# --- the whole study ------------------------------------------------------------------------------


class StudyConfig(Strict):
    """Everything `ctvlab run` needs: one YAML file per study under jobs/configs/."""

    name: str = Field("ctvlab-synthetic", description="Study name; the MLflow experiment by default.")
    workdir: Path = Field(Path("runs/study"), description="Cohort, prepared data and results go here.")
    smoke_test: bool = Field(False, description="Tiny, CPU-only settings for a minute-long check.")
    cohort: CohortConfig = Field(default_factory=CohortConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    voxel_models: VoxelModelConfig = Field(default_factory=VoxelModelConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    unet: UNetConfig = Field(default_factory=UNetConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    ctv: CTVConfig = Field(default_factory=CTVConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    @property
    def raw_dir(self) -> Path:
        """The raw cohort folder: the given one, or where `synth` writes."""
        if self.cohort.source == "raw":
            assert self.cohort.raw_dir is not None
            return self.cohort.raw_dir
        return self.workdir / "cohort"

    @property
    def prep_dir(self) -> Path:
        return self.workdir / "prep"

    @property
    def results_dir(self) -> Path:
        return self.workdir / "results"


# A study config is a page of YAML; a series map a few lines. Anything near this is not a config.
MAX_CONFIG_BYTES = 1 << 20
# YAML aliases repeat a subtree without copying it: nine anchors of nine aliases each are a few hundred bytes
# that expand to 9^9 values, and validating or printing them would run for hours. A config is counted as
# expanded (every alias as a copy of its subtree) and refused beyond this many values.
MAX_YAML_VALUES = 100_000


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """The YAML document in the file `path`, read safely: a regular file of at most `MAX_CONFIG_BYTES`,
    UTF-8 text, no Python tags (`yaml.SafeLoader`), and at most `MAX_YAML_VALUES` values once its aliases
    are expanded.

    Raises:
        ConfigError: naming the file and what is wrong (missing, a folder, too large, not UTF-8, not YAML,
            an alias bomb, a recursive alias, nesting too deep).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; the {what} is a YAML file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror or e}).") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a {what}")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is dropped
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} on line {line} (Latin-1 or "
                          f"another legacy encoding?); save the {what} as UTF-8") from None  # fmt: skip
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load(text)`, bounded: the document is composed first, its size counted with every alias
    expanded (`MAX_YAML_VALUES`) and refused when an alias refers to a node that contains it, and only then
    built into Python values.

    Raises:
        ConfigError: not YAML, too many values once expanded, a recursive alias, or nesting too deep.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_size(node, {}, set(), source)
        if n > MAX_YAML_VALUES:
            raise ConfigError(f"{source}: its aliases expand to more than {MAX_YAML_VALUES:,} values (a YAML "
                              "alias bomb?); write the values out or use fewer aliases")  # fmt: skip
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int], source: str) -> int:
    """How many values `node` holds with every alias expanded (each node's size counted once, so the count
    itself stays cheap). Raises ConfigError for an alias to a node that contains it."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise ConfigError(f"{source}: line {node.start_mark.line + 1}: an alias refers to itself (a recursive structure "
                          "is not a config)")  # fmt: skip
    open_.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes, open_, source) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(
            _expanded_size(k, sizes, open_, source) + _expanded_size(v, sizes, open_, source)
            for k, v in node.value
        )
    open_.discard(key)
    sizes[key] = min(total, MAX_YAML_VALUES + 1)  # enough to refuse; never a number with millions of digits
    return sizes[key]


def check_folder(path: str | Path, what: str) -> None:
    """Refuse a folder path that an existing file stands in the way of: `path` itself, or a parent of it
    (`afile/smoke` cannot be made while `afile` is a file).

    Raises:
        ConfigError: naming the file and the setting or option it came from.
    """
    for p in (Path(path), *Path(path).parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "is" if p == Path(path) else f"is inside {p}, which is"
                raise ConfigError(f"{what} {path} {where} a file, not a folder: give a folder")
            return


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Load a study config from YAML, apply dotted-key overrides, and validate it.

    Args:
        path: YAML file, or None for the study's defaults. Missing sections take their defaults; unknown
            keys are errors.
        overrides: {"unet.train.epochs": 3, ...} applied on top of the file.

    Raises:
        ConfigError: the file is missing, a folder, too large, not UTF-8 or not YAML, its aliases expand
            past `MAX_YAML_VALUES`, or it has unknown keys or invalid values; the message names the file
            and every offending key.
    """
    if path is None:
        data: dict[str, Any] = {}
        for key, value in (overrides or {}).items():
            set_dotted(data, key, value)
        return validate_config(data, source="--set")
    path = Path(path)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}.")
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return validate_config(data, source=str(path))


def validate_config(data: dict[str, Any], source: str = "<config>") -> StudyConfig:
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration:"]
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(
                f"  unknown key '{key}' (check its spelling and section; see schemas/config.schema.json)"
            )
        else:
            got = repr(err.get("input"))
            got = got if len(got) <= 200 else f"{got[:200]}... ({len(got):,} characters)"
            lines.append(f"  {key}: {err['msg']} (got {got})")
    return "\n".join(lines)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set` items (`section.key=value`, the value in YAML: `2`, `0.5`, `[16, 32]`, `true`) as a dict.

    Raises:
        ConfigError: an item without `=` or with a value that is not YAML.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set unet.train.epochs=2")
        out[key] = parse_yaml(text, f"--set {item!r}") if text.strip() else None
    return out


def apply_smoke_test(cfg: StudyConfig) -> StudyConfig:
    """Tiny, CPU-only settings for a minutes-long check of a whole job (`--smoke-test`).

    Everything runs, nothing is meaningful: 8 coarse synthetic patients, a 4-feature U-Net for two epochs,
    two trials, small forests, one shuffle per feature on 1,000 test voxels, 200 bootstrap resamples, no
    missing-MRSI policy check. Results go to `<workdir>/smoke` so they never mix with real ones.
    """
    c = cfg.model_copy(deep=True)
    c.smoke_test = True
    c.workdir = Path(cfg.workdir) / "smoke"
    c.synth.n_patients = min(cfg.synth.n_patients, 8)
    c.synth.anatomy_mm = (4.0, 4.0, 4.0)
    c.synth.diffusion_mm = (4.0, 4.0, 4.0)
    c.synth.growth_mm = 4.0
    c.voxel_models.targets = ["cel", "nel"]
    c.voxel_models.subgroups = ["all"]
    c.voxel_models.rf = c.voxel_models.rf.model_copy(update={"n_estimators": 10, "max_depth": 6})
    c.voxel_models.xgboost = c.voxel_models.xgboost.model_copy(update={"n_estimators": 20, "max_depth": 3})
    c.voxel_models.permutation_repeats = 1
    c.voxel_models.max_test_rows_for_permutation = 1000
    c.voxel_models.bootstrap_resamples = 200
    c.voxel_models.missing_check = False  # three more CV runs per target; tests check it on its own
    c.unet.model.base_features = 4
    c.unet.train.epochs = 2
    c.unet.train.num_workers = 1
    c.unet.train.use_gpu = False
    c.tune.run_grid = False
    c.tune.num_samples = 2
    c.tune.epochs_per_trial = 2
    c.tune.gpus_per_trial = 0.0
    c.tune.ablation_samples = 1
    c.tune.space.base_features = [4]
    c.tune.space.batch_size = [1]
    c.pipeline.ablation = False
    return c
