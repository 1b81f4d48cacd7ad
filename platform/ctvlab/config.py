"""Typed settings for every stage, loaded from YAML.

One place defines each default (the study's value where the paper gives one, with its section). Variants
such as the loss, the β schedule or the modality set are values chosen by name, not subclasses. Unknown
keys are errors that name the key and the file, so a typo never silently falls back to a default.

The JSON Schema of `StudyConfig` is exported to `schemas/config.schema.json` (see `ctvlab.schemas`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ctvlab.errors import ConfigError

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Strict(BaseModel):
    """Base for every settings model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --- cohort and synthetic data ---------------------------------------------------------------------


class SynthConfig(Strict):
    """The synthetic cohort (see README, "The synthetic cohort")."""

    n_patients: int = Field(101, ge=1, description="Patients to generate (the study had 101).")
    seed: int = Field(0, description="Master seed; patient i uses a stream derived from (seed, i).")
    null: bool = Field(
        False,
        description="Control cohort: diffusion and MRSI reflect only the visible lesion, not the "
        "invisible infiltration that decides future growth.",
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


class CohortConfig(Strict):
    """Where the raw cohort comes from: generated (`synth`) or a folder in the documented layout."""

    source: Literal["synth", "raw"] = "synth"
    raw_dir: Path | None = Field(None, description="A cohort folder with manifest.csv (source: raw).")

    @model_validator(mode="after")
    def _raw_needs_dir(self) -> CohortConfig:
        if self.source == "raw" and self.raw_dir is None:
            raise ValueError("cohort.source is 'raw' but cohort.raw_dir is not set")
        return self


# --- preprocessing -------------------------------------------------------------------------------


class PreprocessConfig(Strict):
    """Resampling, normalisation and regions (SPEC: Regions, Preprocessing)."""

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
    cpus_per_patient: PositiveFloat = Field(1.0, description="Ray CPUs reserved by each patient task.")


# --- splits --------------------------------------------------------------------------------------


class SplitConfig(Strict):
    """Patient-level splits (SPEC: Deep learning CTV; Voxel-wise random forest)."""

    seed: int = 0
    dl_fractions: tuple[Fraction, Fraction, Fraction] = Field(
        (0.67, 0.16, 0.17), description="Train/val/test fractions of patients, stratified by cohort."
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
    n_estimators: int = Field(100, ge=1)
    max_depth: int | None = Field(12, ge=1)
    max_samples: float | int | None = Field(
        0.2, description="Bootstrap sample per tree (fraction or count): bounds training time."
    )
    min_samples_leaf: int = Field(5, ge=1)
    max_features: Literal["sqrt", "log2"] | float = "sqrt"
    n_jobs: int = Field(1, ge=1, description="Threads per fold (folds already run in parallel).")


class XGBoostConfig(Strict):
    n_estimators: int = Field(300, ge=1)
    max_depth: int = Field(6, ge=1)
    learning_rate: PositiveFloat = 0.1
    subsample: Fraction = 0.8
    colsample_bytree: Fraction = 0.8
    tree_method: Literal["hist", "approx", "exact"] = "hist"
    n_jobs: int = Field(1, ge=1)


class VoxelModelConfig(Strict):
    """Voxel-wise progression models with patient-grouped, stratified CV (SPEC: Voxel-wise RF)."""

    model: Literal["rf", "xgboost"] = "rf"
    targets: list[VoxelTarget] = Field(default_factory=lambda: ["cel", "nel"])
    subgroups: list[Subgroup] = Field(default_factory=lambda: ["all"])
    features: list[str] = Field(
        default_factory=lambda: list(FEATURES),
        description="Feature columns of the voxel table (default: the study's 13).",
    )
    rf_missing: Literal["impute_nav", "covered_only"] = Field(
        "impute_nav",
        description="Random forest only: voxels without MRSI get the NAV-normal value (1.0 for "
        "normalised maps, the cohort's NAV median for indices), or are dropped.",
    )
    class_balance: Literal["balanced", "subsample"] = Field(
        "balanced", description="Balanced class weights, or stable-voxel subsampling in training folds."
    )
    stable_ratio: PositiveFloat = Field(
        3.0, description="With class_balance=subsample: stable voxels kept per progressed voxel."
    )
    permutation_repeats: int = Field(3, ge=1)
    max_test_rows_for_permutation: int = Field(
        50_000, ge=1000, description="Permutation importance runs on at most this many test rows."
    )
    rf: RandomForestConfig = Field(default_factory=RandomForestConfig)
    xgboost: XGBoostConfig = Field(default_factory=XGBoostConfig)
    cpus_per_fold: PositiveFloat = 1.0
    seed: int = 0


class StatsConfig(Strict):
    """Per-patient medians per voxel category and paired tests (SPEC: Statistics)."""

    min_voxels: int = Field(5, ge=1)
    significance: Fraction = 0.05
    features: list[str] = Field(default_factory=lambda: list(FEATURES))


# --- U-Net training ------------------------------------------------------------------------------

ModalitySet = Literal["anat", "anat_diff", "anat_mrsi", "all"]
LossName = Literal["dice", "tversky", "pcc", "pcc+bce", "pcc+0.5bce"]


class BetaSchedule(Strict):
    """Tversky β over epochs (α = 1 − β). `constant` uses `start` throughout."""

    kind: Literal["constant", "linear", "step"] = "constant"
    start: Fraction = 0.98
    end: Fraction = 0.98
    ramp_epochs: int = Field(10, ge=1, description="linear: epochs from start to end.")
    step_epoch: int = Field(10, ge=0, description="step: the epoch from which β = end.")


class LossConfig(Strict):
    name: LossName = "pcc"
    alpha: Fraction = Field(0.02, description="Tversky α for a constant schedule (α + β = 1 here).")
    beta: BetaSchedule = Field(default_factory=BetaSchedule)


class OptimConfig(Strict):
    name: Literal["ranger", "adam", "sgd"] = "ranger"
    lr: PositiveFloat = Field(5e-5, description="Study optimum: 5e-5 (Methods, Hyperparameter search).")
    weight_decay: float = Field(0.0, ge=0)
    momentum: Fraction = Field(0.9, description="SGD only.")
    lookahead_k: int = Field(6, ge=1, description="Ranger: slow weights update every k steps.")
    lookahead_alpha: Fraction = Field(0.5, description="Ranger: slow-weight step toward fast weights.")


class AugmentConfig(Strict):
    """Training-time augmentation (Methods): flips, rotations, noise, channel shuffle and drop."""

    flip_prob: Fraction = 0.5
    rotate_prob: Fraction = 0.3
    rotate_deg: float = Field(10.0, ge=0)
    noise_prob: Fraction = 0.3
    noise_std: float = Field(0.02, ge=0, description="In min-max normalised units.")
    channel_shuffle_prob: Fraction = 0.1
    channel_drop_prob: Fraction = 0.1


class UNetModelConfig(Strict):
    base_features: int = Field(48, ge=1, description="Study optimum: 48.")
    modality_set: ModalitySet = "all"
    norm: Literal["instance", "batch", "group"] = "instance"
    dropout: Fraction = 0.0


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
    cpus_per_worker: PositiveFloat = Field(
        1.0, description="On a 2-core machine keep workers + Ray Data below the CPUs Ray sees."
    )
    mixed_precision: Literal["auto", "bf16", "off"] = Field(
        "auto", description="auto: bf16 autocast on GPU, off on CPU."
    )
    crop_to_brain: bool = Field(True, description="Crop inputs to the cohort's brain bounding box.")
    threshold: Fraction = Field(0.5, description="Probability threshold for validation metrics.")
    seed: int = 0


class UNetConfig(Strict):
    model: UNetModelConfig = Field(default_factory=UNetModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
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


class TuneConfig(Strict):
    grid: GridSpace = Field(default_factory=GridSpace)
    run_grid: bool = Field(True, description="Run the grid step first and narrow the ranges from it.")
    space: SearchSpace = Field(default_factory=SearchSpace)
    num_samples: int = Field(30, ge=1, description="Random-search trials (the study ran 30).")
    epochs_per_trial: int = Field(50, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    cpus_per_trial: PositiveFloat = 1.0
    gpus_per_trial: float = Field(0.0, ge=0)
    trial_max_failures: int = Field(
        1, ge=0, description="Retries of a failed trial before it is recorded failed."
    )
    asha: ASHAConfig = Field(default_factory=ASHAConfig)
    ablation_sets: list[ModalitySet] = Field(
        default_factory=lambda: ["anat", "anat_diff", "anat_mrsi", "all"]
    )
    ablation_samples: int = Field(15, ge=1, description="Random-search trials per modality set (Fig. 2).")
    seed: int = 0


# --- CTVs and evaluation ---------------------------------------------------------------------------


class CTVConfig(Strict):
    """CTV construction and evaluation (SPEC: Standard-of-care CTVs, CTV evaluation)."""

    rtog_margin_mm: PositiveFloat = Field(20.0, description="RTOG: (CEL ∪ T2L) + 2 cm.")
    eortc_margin_mm: PositiveFloat = Field(15.0, description="EORTC: (CEL ∪ cavity) + 1.5 cm.")
    threshold: float | Literal["validation"] = Field(
        "validation", description="Model probability threshold, or chosen on the validation split."
    )
    threshold_grid: list[Fraction] = Field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])
    tversky_alpha: Fraction = 0.02
    tversky_beta: Fraction = 0.98
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


class RayConfig(Strict):
    address: str | None = Field(None, description="Ray cluster address; default: start a local Ray.")
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs of a local Ray. Default: max(cores, 8), so that Train/Tune workers "
        "never take every CPU and starve Ray Data's read tasks.",
    )


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


# The 13 voxel features of the study (SPEC: Voxel-wise random forest), in the channel order of the
# prepared volumes. Defined here because configs default to it; ctvlab.data.layout re-exports it.
FEATURES: tuple[str, ...] = (
    "nT1c", "nT1", "nFLAIR", "nADC", "nFA",
    "nCho", "nCre", "nNAA", "nLac", "nLip",
    "CNI", "CCrI", "CrNI",
)  # fmt: skip


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Load a study config from YAML, apply dotted-key overrides, and validate it.

    Args:
        path: YAML file. Missing sections take their defaults; unknown keys are errors.
        overrides: {"unet.train.epochs": 3, ...} applied on top of the file.

    Raises:
        ConfigError: the file is missing, is not YAML, or has unknown keys or invalid values; the
            message names the file and every offending key.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e}).") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}.")
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
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
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value
