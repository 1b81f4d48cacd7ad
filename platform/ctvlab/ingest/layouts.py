"""Public glioblastoma collections: where each keeps its files and what its label numbers mean, in one table.

`PRESETS` is data, one entry per collection, read by `ctvlab import-layout` (`ingest.import_layout`). Each
entry names the collection's files (templates relative to the folder the user downloaded, with `{id}` the
patient folder and `{tp}` the time point) and maps its segmentation labels onto ctvlab's masks, citing where
the convention is published. A team whose copy differs overrides a preset from a small YAML file
(`PresetOverride`, `--labels FILE`).

ctvlab's masks (docs/reference/data-layout.md): the CEL is the contrast-enhancing lesion; the T2L is the whole
T2/FLAIR lesion and includes the CEL and the necrosis (NEL = T2L − CEL); the resection cavity lies outside the
T2L. So each collection's enhancing label makes the CEL, and its enhancing, necrotic and oedema labels together
make the T2L. ctvlab has no necrosis mask of its own: a necrosis label only joins the T2L.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ctvlab.errors import ConfigError

# What a file template may fill. "trace": the DTI trace (λ1+λ2+λ3), from which the ADC is derived
# (mean diffusivity = trace/3); "volumes": a JSON file of the segmentation's volumes (mm³) by compartment.
Role = Literal["t1c", "t1", "flair", "adc", "trace", "fa", "brain_mask", "seg", "volumes"]
REQUIRED_ROLES: tuple[str, ...] = ("t1c", "t1", "flair", "seg")


class Labels(BaseModel):
    """A segmentation's label numbers, by what they mean in ctvlab's terms (0 is background everywhere)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cel: tuple[int, ...] = Field(description="Contrast-enhancing lesion (enhancing tumour).")
    necrosis: tuple[int, ...] = Field(
        (), description="Necrotic / non-enhancing core: in the T2L, not the CEL."
    )
    oedema: tuple[int, ...] = Field((), description="T2/FLAIR abnormality around the core: in the T2L.")
    cavity: tuple[int, ...] = Field((), description="Resection cavity (outside the T2L).")
    names: dict[int, str] = Field(default_factory=dict, description="Each label in the collection's words.")
    volume_keys: dict[int, str] = Field(
        default_factory=dict,
        description="Label → its key in the collection's volume file (mm³), checked when the file is there.",
    )

    @model_validator(mode="after")
    def _disjoint(self) -> Labels:
        groups = {"cel": self.cel, "necrosis": self.necrosis, "oedema": self.oedema, "cavity": self.cavity}
        seen: dict[int, str] = {}
        for group, labels in groups.items():
            for label in labels:
                if label <= 0:
                    raise ValueError(f"{group}: label {label}: 0 is background, labels are positive integers")
                if label in seen:
                    raise ValueError(f"label {label} is in both {seen[label]} and {group}")
                seen[label] = group
        if not self.cel:
            raise ValueError("cel: give the enhancing label (the CEL)")
        return self

    @property
    def t2l(self) -> tuple[int, ...]:
        """The T2L: enhancing, necrotic and oedema labels (ctvlab's T2L includes the CEL and the necrosis)."""
        return self.cel + self.necrosis + self.oedema

    @property
    def known(self) -> frozenset[int]:
        return frozenset(self.t2l + self.cavity)


class Preset(BaseModel):
    """One public collection's layout and label convention."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    title: str
    sources: tuple[str, ...] = Field(description="Where the layout and labels are published (DOI, page).")
    patients: str = Field(description="Glob, relative to the collection folder, of the patient folders.")
    timepoints: str | None = Field(None, description="Glob of the time-point folders inside a patient's.")
    baseline: tuple[str, ...] = Field(
        ("first",),
        description="The pre-RT time point: the first of these names a patient has ('first': the first "
        "time point in sorted order).",
    )
    followup: str | None = Field(
        None, description="The time point whose segmentation is the progression, when the collection has one."
    )
    files: dict[Role, tuple[str, ...]] = Field(
        description="Role → templates ({id}: patient folder, {tp}: time point); the first that exists is used."
    )
    labels: Labels
    notes: tuple[str, ...] = Field((), description="What the collection lacks or how a value is derived.")


class LabelsOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cel: tuple[int, ...] | None = None
    necrosis: tuple[int, ...] | None = None
    oedema: tuple[int, ...] | None = None
    cavity: tuple[int, ...] | None = None
    names: dict[int, str] | None = None
    volume_keys: dict[int, str] | None = None


class PresetOverride(BaseModel):
    """`--labels FILE`: what a YAML file may change in a preset (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    labels: LabelsOverride | None = None
    files: dict[Role, str | list[str]] | None = None
    baseline: str | list[str] | None = None
    followup: str | None = None


# BraTS label conventions. BraTS 2021 (and UPenn-GBM, annotated to the same protocol): 1 necrotic and
# non-enhancing tumour core (NCR/NET), 2 peritumoral oedema (ED), 4 GD-enhancing tumour (ET); 3 unused.
# BraTS 2023 glioma renumbered them: 1 NETC, 2 SNFH, 3 ET.
_BRATS2021_LABELS = Labels(cel=(4,), necrosis=(1,), oedema=(2,),
                           names={1: "NCR/NET", 2: "ED", 4: "ET"})  # fmt: skip
_BRATS2023_LABELS = Labels(cel=(3,), necrosis=(1,), oedema=(2,),
                           names={1: "NETC", 2: "SNFH", 3: "ET"})  # fmt: skip

_NO_CLINICAL = (
    "clinical fields are not imported: fill cohort, sex, age, resection and the outcomes in manifest.csv"
)
_NO_STRUCTURES = "no ventricles or critical-structure (brainstem, thalamus) masks"
_NO_MRSI = "no MRSI"
_PRE_OP = "pre-operative scans: no resection cavity, and no follow-up, so no progression masks"
_DERIVED_BRAIN = "brain mask derived from the skull-stripped T1c (its non-background voxels)"
_BRATS_NOTES = (_PRE_OP, "no diffusion (ADC, FA)", _NO_MRSI, _NO_STRUCTURES, _DERIVED_BRAIN, _NO_CLINICAL)
# LUMIERE's time-point folders hold each tool's outputs in a folder of its own
_DBT = "{id}/{tp}/DeepBraTumIA-segmentation/atlas/"
_HD = "{id}/{tp}/HD-GLIO-AUTO-segmentation/registered/"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="brats2021",
            title="BraTS 2021 (RSNA-ASNR-MICCAI), adult glioma, pre-operative",
            sources=(
                "Baid et al. 2021, The RSNA-ASNR-MICCAI BraTS 2021 benchmark, doi:10.48550/arXiv.2107.02314",
                "Menze et al. 2015, IEEE TMI 34(10):1993, doi:10.1109/TMI.2014.2377694",
            ),
            patients="BraTS2021_*",
            files={
                "t1c": ("{id}/{id}_t1ce.nii.gz",),
                "t1": ("{id}/{id}_t1.nii.gz",),
                "flair": ("{id}/{id}_flair.nii.gz",),
                "seg": ("{id}/{id}_seg.nii.gz",),
            },
            labels=_BRATS2021_LABELS,
            notes=_BRATS_NOTES,
        ),
        Preset(
            name="brats2023-glioma",
            title="BraTS 2023 adult glioma (BraTS-GLI), pre-operative",
            sources=(
                "Baid et al. 2021, doi:10.48550/arXiv.2107.02314 (the adult glioma data, relabelled for 2023)",
                "BraTS 2023 challenge data page, https://www.synapse.org/brats2023 (labels 1 NETC, 2 SNFH, 3 ET)",
            ),
            patients="BraTS-GLI-*",
            files={
                "t1c": ("{id}/{id}-t1c.nii.gz",),
                "t1": ("{id}/{id}-t1n.nii.gz",),
                "flair": ("{id}/{id}-t2f.nii.gz",),
                "seg": ("{id}/{id}-seg.nii.gz",),
            },
            labels=_BRATS2023_LABELS,
            notes=_BRATS_NOTES,
        ),
        Preset(
            name="upenn-gbm",
            title="UPenn-GBM (TCIA), de novo glioblastoma, pre-operative, with DTI",
            sources=(
                "Bakas et al. 2022, Sci Data 9:453, doi:10.1038/s41597-022-01560-7",
                "TCIA collection UPENN-GBM, doi:10.7937/TCIA.709X-DN49",
            ),
            # "_11" is a subject's pre-operative scan, "_21" a later scan of the same subject: importing both
            # would put one patient in the cohort twice (and on both sides of a split)
            patients="images_structural/UPENN-GBM-*_11",
            files={
                "t1c": ("images_structural/{id}/{id}_T1GD.nii.gz",),
                "t1": ("images_structural/{id}/{id}_T1.nii.gz",),
                "flair": ("images_structural/{id}/{id}_FLAIR.nii.gz",),
                "fa": ("images_DTI/{id}/{id}_DTI_FA.nii.gz",),
                "trace": ("images_DTI/{id}/{id}_DTI_TR.nii.gz",),
                # the manual segmentation where there is one, else the automated one the collection ships
                "seg": ("images_segm/{id}_segm.nii.gz", "automated_segm/{id}_automated_approx_segm.nii.gz"),
            },
            labels=_BRATS2021_LABELS,
            notes=(
                "the collection's NIfTI-files folder is the one to give; only the pre-operative scans (_11) are "
                "imported, the later scans (_21) of the same subjects are not",
                "ADC derived from the DTI trace: mean diffusivity = trace / 3, in mm²/s (the trace's units are "
                "checked on the brain's median and scaled from 10⁻³ or 10⁻⁶ mm²/s when that is what it holds)",
                _PRE_OP,
                _NO_MRSI,
                _NO_STRUCTURES,
                _DERIVED_BRAIN,
                _NO_CLINICAL,
            ),
        ),
        Preset(
            name="rhuh-gbm",
            title="RHUH-GBM (TCIA), glioblastoma: pre-operative (0), post-operative (1), recurrence (2)",
            sources=(
                "Cepeda et al. 2023, Data in Brief 50:109617, doi:10.1016/j.dib.2023.109617",
                "TCIA collection RHUH-GBM, doi:10.7937/4545-c905",
            ),
            patients="RHUH-*",
            timepoints="*",
            # ctvlab's pre-RT scan is the post-operative one (time point 1); the recurrence (2) is the outcome
            baseline=("1",),
            followup="2",
            files={
                "t1c": ("{id}/{tp}/{id}_{tp}_t1ce.nii.gz",),
                "t1": ("{id}/{tp}/{id}_{tp}_t1.nii.gz",),
                "flair": ("{id}/{tp}/{id}_{tp}_flair.nii.gz",),
                "adc": ("{id}/{tp}/{id}_{tp}_adc.nii.gz",),
                "seg": ("{id}/{tp}/{id}_{tp}_segmentations.nii.gz",),
            },
            labels=_BRATS2023_LABELS,
            notes=(
                "ADC as the collection gives it (in its own units: ctvlab normalises it to the NAV mode)",
                "no FA",
                _NO_MRSI,
                _NO_STRUCTURES,
                "no resection-cavity label",
                "the recurrence (time point 2) becomes the progression masks only where its segmentation lies "
                "on the post-operative T1c grid; otherwise it needs registration first",
                _DERIVED_BRAIN,
                _NO_CLINICAL,
            ),
        ),
        Preset(
            name="lumiere-deepbratumia",
            title="LUMIERE, longitudinal glioblastoma (weekly), DeepBraTumIA segmentation in atlas space",
            sources=(
                "Suter et al. 2022, Sci Data 9:768, doi:10.1038/s41597-022-01881-7",
                "DeepBraTumIA, https://www.nitrc.org/projects/deepbratumia (labels checked against each time "
                "point's measured_volumes_in_mm3.json)",
            ),
            patients="Patient-*",
            timepoints="week-*",
            files={
                "t1c": (_DBT + "skull_strip/ct1_skull_strip.nii.gz",),
                "t1": (_DBT + "skull_strip/t1_skull_strip.nii.gz",),
                "flair": (_DBT + "skull_strip/flair_skull_strip.nii.gz",),
                "brain_mask": (_DBT + "skull_strip/brain_mask.nii.gz",),
                "seg": (_DBT + "segmentation/seg_mask.nii.gz",),
                "volumes": (_DBT + "segmentation/measured_volumes_in_mm3.json",),
            },
            # Not the BraTS numbering: 1 is the enhancing core. The volume file says which label is which.
            labels=Labels(
                cel=(1,),
                necrosis=(2,),
                oedema=(3,),
                names={1: "enhancing core", 2: "necrotic / non-enhancing", 3: "oedema"},
                volume_keys={1: "Enhancing_Core", 2: "Necrotic_NonEnhancing", 3: "Edema_Compartment"},
            ),
            notes=(
                "baseline: the first time point in sorted order (week-000-1 where a patient has two week-0 "
                "scans); ctvlab's is the last scan before radiotherapy: choose it with --timepoint",
                "progression is not marked per file (LUMIERE rates each time point by RANO): no progression masks",
                "no diffusion (ADC, FA)",
                _NO_MRSI,
                _NO_STRUCTURES,
                "no resection-cavity label",
                _NO_CLINICAL,
            ),
        ),
        Preset(
            name="lumiere-hd-glio-auto",
            title="LUMIERE, longitudinal glioblastoma (weekly), HD-GLIO-AUTO segmentation",
            sources=(
                "Suter et al. 2022, Sci Data 9:768, doi:10.1038/s41597-022-01881-7",
                "Kickingereder et al. 2019, Lancet Oncol 20(5):728, doi:10.1016/S1470-2045(19)30098-1; "
                "HD-GLIO, https://github.com/NeuroAI-HD/HD-GLIO (1 non-enhancing T2/FLAIR abnormality, "
                "2 contrast-enhancing tumour)",
            ),
            patients="Patient-*",
            timepoints="week-*",
            files={
                "t1c": (_HD + "CT1_r2s_bet_reg.nii.gz",),
                "t1": (_HD + "T1_r2s_bet_reg.nii.gz",),
                "flair": (_HD + "FLAIR_r2s_bet_reg.nii.gz",),
                "seg": (_HD + "segmentation.nii.gz",),
            },
            # HD-GLIO has no necrosis label: its T2/FLAIR abnormality (1) holds oedema and non-enhancing core.
            labels=Labels(
                cel=(2,),
                oedema=(1,),
                names={1: "non-enhancing T2/FLAIR abnormality", 2: "contrast-enhancing tumour"},
            ),
            notes=(
                "baseline: the first time point in sorted order; ctvlab's is the last scan before radiotherapy: "
                "choose it with --timepoint",
                "no volume file: the label mapping cannot be checked against the collection",
                "progression is not marked per file (LUMIERE rates each time point by RANO): no progression masks",
                "no diffusion (ADC, FA)",
                _NO_MRSI,
                _NO_STRUCTURES,
                "no resection-cavity label",
                _DERIVED_BRAIN,
                _NO_CLINICAL,
            ),
        ),
    )
}


def preset(name: str, override: Path | None = None) -> Preset:
    """The preset `name`, with the changes of the YAML file `override` when given.

    Raises:
        ConfigError: an unknown preset, or an override file that is not valid (unknown keys included).
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown layout {name!r}; choose one of: {', '.join(PRESETS)}")
    base = PRESETS[name]
    if override is None:
        return base
    from ctvlab.config import read_yaml

    raw = read_yaml(override, "label override")
    try:
        change = PresetOverride.model_validate(raw if raw is not None else {})
        return apply_override(base, change)
    except ValidationError as e:
        where = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(
            f"{override}: {where} (keys: labels (cel, necrosis, oedema, cavity, names, volume_keys), files, "
            "baseline, followup)"
        ) from None


def apply_override(base: Preset, change: PresetOverride) -> Preset:
    """`base` with the fields `change` sets replaced (a file role's templates, a label group, …)."""
    update: dict = {}
    if change.labels is not None:
        labels = {**base.labels.model_dump(), **change.labels.model_dump(exclude_none=True)}
        update["labels"] = Labels.model_validate(labels)
    if change.files is not None:
        given = {r: (t,) if isinstance(t, str) else tuple(t) for r, t in change.files.items()}
        update["files"] = {**base.files, **given}
    if change.baseline is not None:
        update["baseline"] = (
            (change.baseline,) if isinstance(change.baseline, str) else tuple(change.baseline)
        )
    if change.followup is not None:
        update["followup"] = change.followup
    return Preset.model_validate({**base.model_dump(), **update})
