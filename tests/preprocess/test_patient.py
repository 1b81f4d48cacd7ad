"""One phantom patient through `prepare_arrays`: normalisation, geometry and MRSI coverage."""

from __future__ import annotations

import numpy as np
import pytest

from ctvlab.config import FEATURES, PreprocessConfig
from ctvlab.data.layout import MASKS, MRSI_FEATURES
from ctvlab.errors import DataError
from ctvlab.ingest.manifest import read_manifest
from ctvlab.preprocess.grid import voxel_centres
from ctvlab.preprocess.prepare import FEATURE_SOURCES, input_hash, prepare_arrays
from tests.phantoms import INDEX_SHIFT, NAV_VALUES, PhantomSpec, write_phantom_patient

SPEC = PhantomSpec()
CFG = PreprocessConfig()


@pytest.fixture(scope="module")
def phantom(_phantom_cohort_master):
    rows, _, _ = read_manifest(_phantom_cohort_master)
    return prepare_arrays(rows[0], _phantom_cohort_master, CFG)


def _world(arrays):
    return voxel_centres(arrays.affine, arrays.shape)


@pytest.mark.parametrize("name", [f for f in FEATURES if f not in ("CNI", "CCrI", "CrNI")])
def test_nav_mode_is_one_after_normalisation(phantom, name):
    source = FEATURE_SOURCES[name]
    assert phantom.nav_modes[name] == pytest.approx(NAV_VALUES[source], rel=1e-3)
    nav = phantom.mask("nav").astype(bool)
    values = phantom.features[FEATURES.index(name)][nav]
    values = values[np.isfinite(values)]
    # the median is an independent estimate: most NAV voxels hold exactly the NAV value
    assert np.median(values) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", ["CNI", "CCrI", "CrNI"])
def test_indices_are_kept_as_they_are(phantom, name):
    x = phantom.features[FEATURES.index(name)]
    nav = phantom.mask("nav").astype(bool) & phantom.mask("mrsi").astype(bool)
    # within the phantom's trace of noise (1e-4 of a value, or 1e-4 absolute for a zero value)
    assert np.median(x[nav]) == pytest.approx(NAV_VALUES[name.lower()], abs=1e-4)
    centre = tuple(np.rint(np.linalg.solve(phantom.affine, [*SPEC.lesion_center, 1.0])[:3]).astype(int))
    # the lesion centre is well inside T2L (12 mm) but the 10 mm MRSI voxels blur its edge
    assert x[centre] == pytest.approx(INDEX_SHIFT[name.lower()], rel=0.05)


def test_nav_mode_is_robust_to_noise(tmp_path):
    row = write_phantom_patient(tmp_path, "N000", PhantomSpec(noise=0.05, seed=3))
    arrays = prepare_arrays(row, tmp_path, CFG)
    for name, mode in arrays.nav_modes.items():
        assert mode == pytest.approx(NAV_VALUES[FEATURE_SOURCES[name]], rel=0.01), name


def test_lesion_lands_where_it_is_in_world_space(phantom):
    t2l = phantom.mask("t2l").astype(bool)
    centroid = _world(phantom)[:, t2l].mean(axis=1)
    assert np.linalg.norm(centroid - np.asarray(SPEC.lesion_center)) < 1.0
    exact = 4 / 3 * np.pi * (SPEC.t2l_radius**3 - SPEC.cavity_radius**3)
    assert t2l.sum() * 27.0 == pytest.approx(exact, rel=0.1)
    brain_exact = 4 / 3 * np.pi * np.prod(SPEC.brain_semi_axes)
    assert phantom.mask("brain").sum() * 27.0 == pytest.approx(brain_exact, rel=0.02)


def test_grid_is_ras_3mm_multiple_of_8_and_keeps_the_native_t1c_grid(phantom):
    assert np.array_equal(phantom.affine[:3, :3], np.diag([3.0, 3.0, 3.0]))
    assert all(n % 8 == 0 for n in phantom.shape)
    assert phantom.native_shape == SPEC.anat_shape
    assert np.allclose(np.diag(phantom.native_affine)[:3], SPEC.anat_spacing)
    assert phantom.features.dtype == np.float32 and phantom.masks.dtype == np.uint8
    assert phantom.features.shape[0] == len(FEATURES) and phantom.masks.shape[0] == len(MASKS)


def test_mrsi_is_missing_outside_the_press_box_and_present_inside(phantom):
    half = np.asarray(SPEC.mrsi_box_voxels) * np.asarray(SPEC.mrsi_spacing) / 2.0
    offset = np.abs(_world(phantom) - np.reshape(SPEC.lesion_center, (3, 1, 1, 1)))
    inside = (offset <= half.reshape(3, 1, 1, 1) - 3.0).all(0)
    outside = (offset >= half.reshape(3, 1, 1, 1) + 3.0).any(0)
    mrsi = phantom.mask("mrsi").astype(bool)
    assert mrsi[inside].all() and not mrsi[outside].any()
    for name in MRSI_FEATURES:
        x = phantom.features[FEATURES.index(name)]
        assert np.isfinite(x[inside]).all() and np.isnan(x[outside]).all(), name
        np.testing.assert_array_equal(np.isfinite(x), mrsi)
    for name in ("nT1c", "nT1", "nFLAIR", "nADC", "nFA"):
        assert np.isfinite(phantom.features[FEATURES.index(name)]).all()


def test_patient_without_mrsi_has_every_mrsi_feature_missing(tmp_path):
    row = write_phantom_patient(tmp_path, "M000", PhantomSpec(mrsi=False))
    arrays = prepare_arrays(row, tmp_path, CFG)
    assert not arrays.mask("mrsi").any()
    for name in MRSI_FEATURES:
        assert np.isnan(arrays.features[FEATURES.index(name)]).all()
    assert arrays.nav_modes["nFLAIR"] == pytest.approx(NAV_VALUES["flair"], rel=1e-3)


def test_input_hash_follows_file_content_and_manifest(_phantom_cohort_master, tmp_path):
    import shutil

    rows, _, _ = read_manifest(_phantom_cohort_master)
    shutil.copytree(_phantom_cohort_master / "P000", tmp_path / "P000")
    before = input_hash(rows[0], tmp_path)
    assert before == input_hash(rows[0], _phantom_cohort_master)  # location does not matter
    flair = tmp_path / "P000" / "flair.nii.gz"
    flair.write_bytes(flair.read_bytes() + b"\0")
    assert input_hash(rows[0], tmp_path) != before
    assert input_hash(rows[0].model_copy(update={"pfs_months": 9.0}), _phantom_cohort_master) != before


def test_missing_file_is_a_data_error_naming_patient_and_file(_phantom_cohort_master, tmp_path):
    rows, _, _ = read_manifest(_phantom_cohort_master)
    with pytest.raises(DataError, match=r"patient P000: .* file .* is missing"):
        input_hash(rows[0], tmp_path)
