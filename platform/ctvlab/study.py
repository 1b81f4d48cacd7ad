"""The study's fixed choices that code in several places relies on, each defined once (SPEC; Methods).

Settings a user may change live in `ctvlab.config` (with these as defaults where they apply); these are
the names and numbers that must agree everywhere: the feature channels of the prepared volumes, the
Tversky weights of evaluation and model selection, the selection metric, the CTVs compared.
"""

from __future__ import annotations

# The 13 voxel features (SPEC: Voxel-wise random forest), in the channel order of the prepared volumes.
FEATURES: tuple[str, ...] = (
    "nT1c", "nT1", "nFLAIR", "nADC", "nFA",
    "nCho", "nCre", "nNAA", "nLac", "nLip",
    "CNI", "CCrI", "CrNI",
)  # fmt: skip

# Tversky weights of false positives (α) and false negatives (β): the study's optimum, used to evaluate
# CTVs and to select models (Methods, Hyperparameter search; α approximates the tumour share of the brain).
TVERSKY_ALPHA = 0.02
TVERSKY_BETA = 0.98

# Model selection: the validation Tversky at (TVERSKY_ALPHA, TVERSKY_BETA), maximised; `best_` + it is the
# best epoch's value of a run.
SELECTION_METRIC = "val_tversky"
BEST_SELECTION_METRIC = "best_" + SELECTION_METRIC

# The CTVs compared, in the order of every table and figure: the model's, RTOG's, EORTC's, the fair
# control the paper lacks: a uniform margin around the lesion grown to the model CTV's volume ("isovolume",
# the protocol of PREDICT-GBM), which asks whether the model puts its volume in the right place.
CTV_NAMES: tuple[str, ...] = ("model", "rtog", "eortc", "isovolume", "lesion")
# "lesion": the pre-RT lesion (CEL ∪ T2L) with no margin at all, the paper's Supplementary Table 1 row that
# shows why Dice and PPV mislead (the study's best of both, yet the worst CTV). A row in the tables, never
# tested against the model and never drawn.
REFERENCE_ONLY_CTVS: tuple[str, ...] = ("lesion",)
