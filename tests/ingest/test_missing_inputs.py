"""A cohort that lacks an item is valid for what it has; the stage that needs the item refuses it by name."""

from __future__ import annotations

import numpy as np
import pytest

from ctvlab.config import PreprocessConfig
from ctvlab.errors import DataError
from ctvlab.ingest.manifest import read_manifest, write_manifest
from ctvlab.ingest.validate import validate_cohort
from ctvlab.preprocess.prepare import preprocess_patient, process_or_skip
from ctvlab.study import FEATURES
from ctvlab.unet.inputs import require_channels
from tests.phantoms import PhantomSpec, make_phantom_cohort


@pytest.fixture
def without_fa(tmp_path):
    """Two phantom patients whose manifest leaves FA empty, as most public collection does."""
    root = tmp_path / "cohort"
    rows = make_phantom_cohort(root, n=2, spec=PhantomSpec(mrsi=False))
    rows = [r.model_copy(update={"fa": None}) for r in rows]
    write_manifest(root, rows)
    return root


def test_valid_for_what_it_has_and_the_stage_refuses_fa_by_name(without_fa, tmp_path):
    report = validate_cohort(without_fa, progress=False)
    assert report.ok
    assert all("not available: fa" in " ".join(q.message for q in p.problems) for p in report.patients)
    rows = read_manifest(without_fa)[0]
    prep = tmp_path / "prep"
    for row in rows:
        preprocess_patient(row, without_fa, prep, PreprocessConfig())
    ids = [r.patient_id for r in rows]
    require_channels(prep, ids, "anat")  # FLAIR and T1c are there
    with pytest.raises(DataError) as refused:
        require_channels(prep, ids, "anat_diff")
    message = str(refused.value)
    assert "nFA" in message and all(pid in message for pid in ids) and "anat_diff" in message
    assert "nADC" not in message.split("(")[0]  # ADC is there: only FA is named
    assert refused.value.exit_code == 2
    # the voxel models use nFA among their 13 features: refused too, until it is left out of them
    from ctvlab.stages.analysis import _require_features

    with pytest.raises(DataError, match=r"voxel models use nFA.*voxel_models.features"):
        _require_features(prep, ids, list(FEATURES))
    _require_features(prep, ids, [f for f in FEATURES if f != "nFA"])


def test_prepared_without_fa_holds_nan_and_no_nav_mode(without_fa, tmp_path):
    from ctvlab.preprocess.prepare import prepare_arrays

    row = read_manifest(without_fa)[0][0]
    arrays = prepare_arrays(row, without_fa, PreprocessConfig())
    assert np.isnan(arrays.features[FEATURES.index("nFA")]).all()
    assert arrays.nav_modes["nFA"] is None and arrays.nav_modes["nADC"] is not None


def test_study_preprocessing_refuses_a_patient_without_outcomes(without_fa, tmp_path):
    row = read_manifest(without_fa)[0][0].model_copy(
        update={"pfs_months": None, "t2l_progression_mask": None}
    )
    result = process_or_skip(row, without_fa, tmp_path / "prep", PreprocessConfig())
    assert result["status"] == "failed"
    assert f"patient {row.patient_id}: pfs_months, t2l_progression_mask not available" in result["reason"]
    assert not (tmp_path / "prep").exists()


def test_validate_for_predict_needs_the_masks_the_ctvs_use(without_fa):
    rows = read_manifest(without_fa)[0]
    write_manifest(without_fa, [rows[0].model_copy(update={"critical_mask": None}), rows[1]])
    predict = validate_cohort(without_fa, progress=False, purpose="predict")
    assert predict.valid_ids() == [rows[1].patient_id]
    assert any(
        q.column == "critical_mask" and "prediction needs it" in q.message
        for q in predict.patients[0].problems
    )
    study = validate_cohort(without_fa, progress=False)
    assert study.ok and "critical_mask" in " ".join(q.message for q in study.patients[0].problems)
