"""The positive control's scoring (`ctvlab.stages.control`) on prepared phantom patients: a map that follows
the hidden new progression beats the same-volume margin and a flat one does not, the true density is read
onto the prepared grid, and the summary's arithmetic by hand."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ctvlab.config import StudyConfig
from ctvlab.ctv import coverage as C
from ctvlab.ctv.scoring import patient_masks
from ctvlab.data.readers import load_patient, read_patients
from ctvlab.stages.control import score_patient, summary, truth_on_grid, truth_path

pytestmark = pytest.mark.ray  # the prepared phantom comes from the Ray pipeline


@pytest.fixture(scope="module")
def patient(prepared_phantom):
    """A prepared phantom patient with new progression."""
    for pid in read_patients(prepared_phantom)["patient_id"]:
        p = load_patient(prepared_phantom, pid)
        masks = {**patient_masks(p), "nav": p.mask("nav") > 0, "ventricles": p.mask("ventricles") > 0}
        if C.new_progression(masks).sum() >= 20:
            return p, masks
    pytest.fail("no phantom patient has new progression")


def test_a_map_that_follows_the_new_progression_beats_the_margin_and_a_flat_one_does_not(patient):
    p, masks = patient
    cfg = StudyConfig()
    new = C.new_progression(masks)
    lesion = masks["cel"] | masks["t2l"]
    follows = np.where(new, 0.9, 0.0) + np.where(lesion, 1.0, 0.0)  # the progression itself, and the lesion
    ctv_row, rows = score_patient(follows, 0.5, p, cfg, density=follows)
    assert ctv_row["n_new"] == int(new.sum())
    assert ctv_row["model_ctv"] == pytest.approx(1.0)  # it covers all of it
    assert ctv_row["model_ctv"] > ctv_row["isovolume"]  # the same volume, spread uniformly, covers less
    by = {r["volume"]: r for r in rows}
    assert set(by) == {"model CTV", "RTOG", "EORTC", "margin 15 mm", "margin 10 mm", "margin 20 mm"}
    for r in rows:  # the top-k of the map never covers less than the k nearest; the density is the same map
        assert r["model"] >= r["margin"] - 1e-9 and r["density"] == r["model"]
    assert by["margin 10 mm"]["model"] > by["margin 10 mm"]["margin"]

    flat = np.where(masks["brain"], 0.1, 0.0)  # no information: the CTV is the lesion; top-k = nearest
    flat_row, flat_rows = score_patient(flat, 0.5, p, cfg)
    assert flat_row["model_ctv"] == pytest.approx(flat_row["isovolume"])
    for r in flat_rows:
        assert r["model"] == pytest.approx(r["margin"]) and "density" not in r


def test_the_true_density_is_read_onto_the_prepared_grid(patient, tmp_path):
    p, _ = patient
    cohort = tmp_path / "cohort"
    assert truth_on_grid(cohort, p) is None  # a cohort without truth (a team's own)
    density = np.random.default_rng(0).random(p.masks.shape[1:]).astype(np.float32)
    path = truth_path(cohort, p.patient_id)
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(density, p.affine), str(path))
    np.testing.assert_allclose(truth_on_grid(cohort, p), density, atol=1e-5)  # same grid: the same values


def test_summary_by_hand():
    ctv = pd.DataFrame(
        {"patient_id": ["a", "b", "c"], "model_ctv": [0.9, 0.8, 0.7], "isovolume": [0.6, 0.8, 0.5]}
    )
    vol = pd.DataFrame({"patient_id": ["a", "b", "c"], "volume": ["RTOG"] * 3, "model": [0.9, 0.7, 0.8],
                        "margin": [0.8, 0.7, 0.6], "density": [1.0, 0.9, 0.9]})  # fmt: skip
    table = summary(ctv, vol).set_index(["volume", "map"])
    drawn = table.loc[("model CTV (as drawn)", "model")]
    assert drawn["gain"] == pytest.approx((0.3 + 0.0 + 0.2) / 3) and (drawn["better"], drawn["worse"]) == (
        2,
        0,
    )
    model, truth = table.loc[("RTOG", "model")], table.loc[("RTOG", "density")]
    assert model["gain"] == pytest.approx(0.1) and truth["gain"] == pytest.approx((0.2 + 0.2 + 0.3) / 3)
    assert model["ceiling"] == pytest.approx(truth["gain"])
    assert model["share_of_ceiling"] == pytest.approx(0.1 / ((0.2 + 0.2 + 0.3) / 3))


@pytest.fixture(scope="module")
def other_phantoms(tmp_path_factory, ray_local):
    """Three prepared phantom patients of another draw (seeds 100-102): patients no phantom model saw."""
    from ctvlab.config import PreprocessConfig
    from ctvlab.preprocess.ray_pipeline import preprocess_cohort
    from tests.phantoms import PhantomSpec, make_phantom_cohort

    root = tmp_path_factory.mktemp("other_phantoms")
    make_phantom_cohort(root / "cohort", n=3, spec=PhantomSpec(noise=0.05, seed=100))
    report = preprocess_cohort(root / "cohort", root / "prep", PreprocessConfig(), progress=False)
    assert report.ok, report
    return root / "prep"


def test_external_patients_are_scored_at_the_test_patients_threshold(
    trained_phantom, prepared_phantom, other_phantoms
):
    from ctvlab.errors import LeakageError
    from ctvlab.stages.control import model_threshold, score_external
    from ctvlab.unet.inference import load_model, predict_probability

    cfg, outcome = trained_phantom
    model = load_model(outcome.model_dir, device="cpu")
    threshold = model_threshold(model, prepared_phantom, cfg)  # what `score_test_patients` scores at
    ctv_ext, vol_ext, ext_threshold = score_external(outcome.model_dir, cfg, prepared_phantom, other_phantoms)
    assert ext_threshold == threshold  # chosen on the training cohort's validation patients, not on these
    ids = sorted(read_patients(other_phantoms)["patient_id"])
    assert sorted(ctv_ext["patient_id"]) == ids and sorted(set(vol_ext["patient_id"])) == ids
    # each is scored as a test patient is: its own probability map at that threshold
    p = load_patient(other_phantoms, ids[0])
    ctv_row, rows = score_patient(predict_probability(model, p), threshold, p, cfg)
    assert ctv_ext.set_index("patient_id").loc[ids[0]].to_dict() == pytest.approx(
        {k: v for k, v in ctv_row.items() if k != "patient_id"}, nan_ok=True
    )
    assert len(vol_ext[vol_ext["patient_id"] == ids[0]]) == len(rows)

    # the training cohort itself (or a copy, or another cohort holding one of its patients) is refused
    with pytest.raises(LeakageError, match="same input files"):
        score_external(outcome.model_dir, cfg, prepared_phantom, prepared_phantom)
