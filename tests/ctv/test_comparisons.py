"""The paper's per-patient comparisons of the model CTV, on a hand-made table with known answers."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ctvlab.ctv.scoring import comparison_table


def _rows(pid: str, model: tuple[float, float], rtog: float, eortc: float) -> list[dict]:
    """(model sensitivity, model PCC), and the PCC of the two standard CTVs."""
    return [
        {"patient_id": pid, "ctv": "model", "sensitivity": model[0], "pcc": model[1]},
        {"patient_id": pid, "ctv": "rtog", "sensitivity": 0.99, "pcc": rtog},
        {"patient_id": pid, "ctv": "eortc", "sensitivity": 0.70, "pcc": eortc},
    ]


def test_win_rates_misses_and_subgroups_are_counted_by_hand():
    per_patient = pd.DataFrame(
        _rows("A", (0.95, 0.80), rtog=0.70, eortc=0.60)  # beats both
        + _rows("B", (0.80, 0.60), rtog=0.75, eortc=0.50)  # beats EORTC only; misses 20% (> 13%)
        + _rows(
            "C", (0.87, 0.70), rtog=0.70, eortc=0.65
        )  # ties RTOG (no win), beats EORTC; misses exactly 13%
        + _rows("D", (0.50, 0.40), rtog=0.90, eortc=0.80)  # beats neither; misses 50%
    )
    clinical = pd.DataFrame({"patient_id": ["A", "B", "C", "D"], "cohort": ["SOC", "SOC", "ATT", "ENZA"],
                             "pfs_months": [3.0, 6.9, 7.0, 20.0]})  # fmt: skip
    t = comparison_table(per_patient, clinical).set_index("comparison")
    assert t.loc["model PCC > RTOG PCC (% of patients)", ["value", "n", "study"]].tolist() == [25.0, 4, 72.0]
    assert t.loc["model PCC > EORTC PCC (% of patients)", "value"] == 75.0  # A, B and C
    misses = t.loc["patients whose model CTV misses > 13% of the progression"]
    assert (misses["value"], misses["n"], misses["study"]) == (2.0, 4, 3.0)  # B and D; C misses exactly 13%
    early = t.loc["model PCC, early progressors (PFS < 7 months)"]
    assert early["value"] == pytest.approx((0.80 + 0.60) / 2) and early["n"] == 2 and early["study"] == 0.803
    assert t.loc["model PCC, late progressors (PFS ≥ 7 months)", "value"] == pytest.approx((0.70 + 0.40) / 2)
    assert t.loc["model PCC, SOC cohort", "value"] == pytest.approx(0.70)
    assert t.loc["model PCC, ENZA cohort", "n"] == 1 and math.isnan(t.loc["model PCC, ENZA cohort", "study"])


def test_without_a_model_ctv_there_is_nothing_to_compare():
    per_patient = pd.DataFrame(_rows("A", (0.9, 0.8), 0.7, 0.6)[1:])
    clinical = pd.DataFrame({"patient_id": ["A"], "cohort": ["SOC"], "pfs_months": [3.0]})
    assert comparison_table(per_patient, clinical).empty
