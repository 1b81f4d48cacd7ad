"""The study's fixed choices that code in several places relies on, each defined once (the study's Methods).

Settings a user may change live in `ctvlab.config` (with these as defaults where they apply); these are
the names and numbers that must agree everywhere: the feature channels of the prepared volumes, the
Tversky weights of evaluation and model selection, the selection metric, the CTVs compared.
"""

from __future__ import annotations

# The 13 voxel features (the study's Methods: Voxel-wise random forest), in the channel order of the prepared volumes.
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


# --- the study's published results, for putting ctvlab's beside them ------------------------------------

# CTV evaluation on the test set (Supp. Table 1 / Results): mean and SD per CTV.
STUDY_CTV: dict[str, dict[str, tuple[float, float]]] = {
    "model": {"sensitivity": (0.92, 0.11), "specificity": (0.89, 0.05), "pcc": (0.81, 0.09)},
    "rtog": {"sensitivity": (0.95, 0.08), "specificity": (0.79, 0.11), "pcc": (0.79, 0.09)},
    "eortc": {"sensitivity": (0.74, 0.21), "specificity": (0.92, 0.03), "pcc": (0.68, 0.19)},
}
# Wilcoxon p of the model vs each standard CTV (Results, "CTV evaluation"): (metric, other CTV) → p.
STUDY_CTV_P: dict[tuple[str, str], float] = {
    ("sensitivity", "rtog"): 0.09, ("pcc", "rtog"): 0.09, ("specificity", "rtog"): 0.004,
    ("sensitivity", "eortc"): 7.3e-6, ("pcc", "eortc"): 0.0001, ("specificity", "eortc"): 0.053,
}  # fmt: skip
# Voxel-wise random forests, ROC AUC (5-fold CV): (target, subgroup) → AUC.
STUDY_AUC: dict[tuple[str, str], float] = {
    ("cel", "all"): 0.88, ("cel", "early"): 0.94, ("cel", "late"): 0.74,
    ("nel", "all"): 0.81, ("nel", "early"): 0.83, ("nel", "late"): 0.73,
}  # fmt: skip
