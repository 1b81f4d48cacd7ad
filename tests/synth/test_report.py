"""The cohort report: recurrence pattern and lesion volume on hand-made masks, and on a phantom cohort."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from ctvlab.errors import DataError
from ctvlab.synth.table1 import (
    PatientStats,
    between_cohorts,
    cohort_report,
    lesion_volume_cm3,
    print_report,
    recurrence_pattern,
)

SPACING = (1.0, 1.0, 3.0)  # anisotropic: distances along z count three times


def _case(grow_x: int = 0, grow_z: int = 0, new_cel_inside: bool = False, shrink: bool = False):
    """T2L = a 10×10×4 box; progression adds `grow_x` voxels along +x or `grow_z` along +z."""
    shape = (60, 20, 30)
    t2l = np.zeros(shape, dtype=bool)
    t2l[5:15, 5:15, 5:9] = True
    cel = np.zeros(shape, dtype=bool)
    cel[8:11, 8:11, 6:8] = True
    t2l_prog, cel_prog = t2l.copy(), cel.copy()
    if grow_x:
        t2l_prog[15 : 15 + grow_x, 5:15, 5:9] = True
    if grow_z:
        t2l_prog[5:15, 5:15, 9 : 9 + grow_z] = True
    if new_cel_inside:
        cel_prog[5:8, 5:8, 5:7] = True
    if shrink:
        t2l_prog[5:7] = False
    return t2l, cel, t2l_prog, cel_prog


@pytest.mark.parametrize(
    ("kwargs", "pattern", "distance"),
    [
        ({"new_cel_inside": True}, "within T2L", 0.0),
        ({}, "within T2L", 0.0),  # no new voxel at all
        ({"shrink": True}, "within T2L", 0.0),  # regression is not progression
        ({"grow_z": 5}, "within 2 cm", 15.0),  # 5 voxels of 3 mm
        ({"grow_z": 7}, "beyond 2 cm", 21.0),
        ({"grow_x": 20}, "within 2 cm", 20.0),  # exactly 20 mm: within
        ({"grow_x": 21}, "beyond 2 cm", 21.0),
    ],
)
def test_recurrence_pattern(kwargs, pattern, distance):
    got, far, _ = recurrence_pattern(*_case(**kwargs), SPACING)
    assert got == pattern
    assert far == pytest.approx(distance)


def test_recurrence_distance_is_euclidean():
    t2l, cel, t2l_prog, cel_prog = _case()
    cel_prog[14 + 3, 14 + 4, 7] = True  # 3 and 4 voxels (1 mm) beyond the box's corner column
    assert recurrence_pattern(t2l, cel, t2l_prog, cel_prog, SPACING)[1] == pytest.approx(5.0)


def test_recurrence_needs_a_t2l():
    empty = np.zeros((5, 5, 5), dtype=bool)
    prog = empty.copy()
    prog[2, 2, 2] = True
    assert recurrence_pattern(empty, empty, prog, empty, SPACING) == (None, None, 1)


def test_lesion_volume_counts_the_union_with_spacing():
    t2l = np.zeros((10, 10, 10), dtype=bool)
    t2l[:10, 0, 0] = True
    cel = np.zeros_like(t2l)
    cel[8:10, 0, 0] = True  # inside the T2L
    cel[0:2, 1, 0] = True  # two voxels outside it
    assert lesion_volume_cm3(t2l, cel, (2.0, 2.0, 2.0)) == pytest.approx(12 * 8 / 1000)


def test_report_on_phantom_cohort(phantom_cohort):
    """Phantoms: T2L = ball r 12 mm minus cavity r 3 mm; progression ball r 16 mm centred 6 mm away,
    so its farthest point lies 6 + 16 − 12 = 10 mm beyond the T2L."""
    report = cohort_report(phantom_cohort)
    assert report.problems == []
    assert report.groups["all"].n == 4
    assert [report.groups[c].n for c in ("SOC", "ATT", "ENZA")] == [2, 1, 1]
    expected_cm3 = 4 / 3 * np.pi * (12**3 - 3**3) / 1000
    for p in report.patients:
        assert p.lesion_cm3 == pytest.approx(expected_cm3, rel=0.06)
        assert p.pattern == "within 2 cm"
        assert p.max_distance_mm == pytest.approx(10.0, abs=2.0)
    assert report.groups["all"].pattern_pct["within 2 cm"] == 100.0

    console = Console(record=True, width=220)
    print_report(report, console)
    text = console.export_text()
    assert "26.4 [1.2–153.6]" in text  # the study's lesion volume beside ours
    assert "0/100/0" in text and "7/64/29" in text


def test_report_without_manifest_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="manifest"):
        cohort_report(tmp_path)


def _patient(pid: str, cohort: str, pfs: float, os_: float) -> PatientStats:
    return PatientStats(patient_id=pid, cohort=cohort, sex="M", age=50, resection="GTR", progression_type="T2L",
                        pfs_months=pfs, os_months=os_)  # fmt: skip


def test_between_cohort_tests_match_hand_computed_values():
    """PFS 1,2,3 | 4,5,6 | 7,8,9 (SOC | ATT | ENZA): Kruskal–Wallis H = 12/(9·10)·(6² + 15² + 24²)/3 − 3·10
    = 7.2, p = exp(−7.2/2) (χ² with 2 degrees of freedom). OS of ATT all above SOC's (3 vs 3): the exact
    two-sided Mann–Whitney p is 2/C(6,3) = 0.1."""
    patients = [
        _patient(f"S{i}", "SOC", pfs, os_) for i, (pfs, os_) in enumerate([(1, 10), (2, 11), (3, 12)])
    ]
    patients += [
        _patient(f"A{i}", "ATT", pfs, os_) for i, (pfs, os_) in enumerate([(4, 20), (5, 21), (6, 22)])
    ]
    patients += [_patient(f"E{i}", "ENZA", pfs, 15.0) for i, pfs in enumerate([7, 8, 9])]
    tests = {t["comparison"]: t for t in between_cohorts(patients)}
    assert tests["PFS SOC vs ATT vs ENZA"]["p"] == pytest.approx(np.exp(-3.6), rel=1e-9)
    assert tests["PFS SOC vs ATT vs ENZA"]["study_p"] == 0.021
    assert tests["OS ATT vs SOC"]["p"] == pytest.approx(0.1, rel=1e-9)
    assert tests["OS ATT vs SOC"]["test"] == "Mann–Whitney"


def test_between_cohort_tests_need_two_patients_per_group():
    tests = between_cohorts([_patient("S1", "SOC", 1, 10), _patient("A1", "ATT", 2, 12)])
    assert all(np.isnan(t["p"]) for t in tests)
