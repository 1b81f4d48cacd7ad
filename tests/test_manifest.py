"""Reading the cohort manifest: schema checks that never hide the valid patients."""

from __future__ import annotations

import csv

import jsonschema
import pytest

from ctvlab.ingest.manifest import COLUMNS, PROVENANCE_COLUMNS, ManifestRow, read_manifest
from ctvlab.schemas import render_all


def _rewrite(root, edit):
    path = root / "manifest.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    edit(rows)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def test_phantom_manifest_parses(phantom_cohort):
    rows, problems, ids = read_manifest(phantom_cohort)
    assert problems == []
    assert [r.patient_id for r in rows] == ids == ["P000", "P001", "P002", "P003"]
    assert all(r.has_mrsi for r in rows)


@pytest.mark.parametrize(
    ("column", "value", "fragment"),
    [
        ("cohort", "XYZ", "cohort"),
        ("pfs_months", "-1", "pfs_months"),
        ("age", "abc", "age"),
        ("resection", "partial", "resection"),
        ("patient_id", "bad id/with slash", "patient_id"),
        ("t1c", "", "t1c"),
    ],
)
def test_bad_field_reports_that_patient_only(phantom_cohort, column, value, fragment):
    def edit(rows):
        rows[1][column] = value

    _rewrite(phantom_cohort, edit)
    rows, problems, _ = read_manifest(phantom_cohort)
    assert len(rows) == 3
    assert problems and all(p.line == 3 for p in problems)
    assert any(p.column == fragment for p in problems)


def test_duplicate_ids_invalidate_both_rows(phantom_cohort):
    def edit(rows):
        rows[2]["patient_id"] = rows[0]["patient_id"]

    _rewrite(phantom_cohort, edit)
    rows, problems, _ = read_manifest(phantom_cohort)
    assert sorted(r.patient_id for r in rows) == ["P001", "P003"]
    assert {p.line for p in problems} == {2, 4}


def test_empty_mrsi_columns_mean_no_mrsi(phantom_cohort):
    def edit(rows):
        for c in ("cho", "cre", "naa", "lac", "lip", "cni", "ccri", "crni"):
            rows[0][c] = ""

    _rewrite(phantom_cohort, edit)
    rows, problems, _ = read_manifest(phantom_cohort)
    assert problems == []
    assert not rows[0].has_mrsi and rows[1].has_mrsi


def test_missing_manifest(tmp_path):
    rows, problems, _ = read_manifest(tmp_path)
    assert rows == [] and "manifest.csv not found" in problems[0].message


def test_manifest_rows_satisfy_the_published_schema(phantom_cohort):
    import json

    schema = json.loads(render_all()["manifest.schema.json"])
    rows, _, _ = read_manifest(phantom_cohort)
    for row in rows:
        jsonschema.validate(row.model_dump(mode="json"), schema)
    assert set(ManifestRow.model_fields) == set(COLUMNS + PROVENANCE_COLUMNS)
