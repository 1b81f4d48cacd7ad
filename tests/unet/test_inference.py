"""One network input: evaluation's probability map equals the training loop's validation pass."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctvlab.data.readers import PreparedPatient, load_patient
from ctvlab.splits import load_split
from ctvlab.unet.batches import batch_to_tensors, prepare_row
from ctvlab.unet.inference import load_model, predict_probability
from ctvlab.unet.inputs import network_grid, network_view

pytestmark = pytest.mark.ray


def validation_pass(model, patient) -> np.ndarray:
    """The training loop's validation forward pass (`loop.validate`) of one patient, on the full grid."""
    import torch

    row = {"patient_id": patient.patient_id, "features": patient.features, "masks": patient.masks}
    ex = prepare_row(row, model.spec["modality_set"], model.spec, patient.spacing)
    x, _, brain = batch_to_tensors([ex], model.device)
    with torch.no_grad():
        prob = torch.sigmoid(model.net(x).float())[0, 0].cpu().numpy()
    view = network_view(model.spec, patient.mask("brain"), patient.mask("t2l"), patient.spacing)
    return view.uncrop(prob * brain[0, 0].cpu().numpy(), patient.features.shape[1:])


def test_evaluation_equals_the_validation_pass(trained_phantom, prepared_phantom):
    _, trained = trained_phantom
    split = load_split(prepared_phantom)
    spec = json.loads((trained.model_dir / "model.json").read_text())
    assert spec["input_region"] == "ring" and spec["ring_mm"] == 40.0
    grid = tuple(spec["input_shape"])
    model = load_model(trained.model_dir, device="cpu")
    patients = [load_patient(prepared_phantom, pid) for pid in split.patients("val")]
    # The phantom's grids are all alike; a patient with a smaller grid (4 voxels of background fewer on
    # each side in x) is what tells the training grid from the patient's own grid padded to a multiple of 8
    # (what inference fed the network before): with instance norm the two give different maps.
    p = patients[0]
    patients.append(PreparedPatient("smaller", p.features[:, 4:-4], p.masks[:, 4:-4], p.sidecar))
    assert network_grid(patients[-1].features.shape[1:]) != grid
    for p in patients:
        np.testing.assert_allclose(predict_probability(model, p), validation_pass(model, p), atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "trained", "expected"),
    [
        ((50, 61, 40), (64, 64, 48), (64, 64, 48)),  # fits: the training grid
        ((70, 61, 40), (64, 64, 48), (72, 64, 48)),  # larger along x: grows there, never crops the brain
        ((50, 61, 40), None, (56, 64, 40)),  # no recorded grid (older model): next multiple of 8
    ],
)
def test_network_grid(shape, trained, expected):
    assert network_grid(shape, trained) == expected


def test_test_time_augmentation_is_the_prediction_without_flips_and_spreads_with_them(
    trained_phantom, prepared_phantom
):
    from ctvlab.unet.inference import predict_with_spread

    _, trained = trained_phantom
    model = load_model(trained.model_dir, device="cpu")
    p = load_patient(prepared_phantom, load_split(prepared_phantom).patients("test")[0])
    args = (model, p.features, p.mask("brain"), p.mask("t2l"), p.spacing)
    mean, sd = predict_with_spread(*args, flips=[(False, False, False)])
    np.testing.assert_allclose(mean, predict_probability(model, p), atol=1e-6)
    assert not sd.any()
    mean, sd = predict_with_spread(*args)
    brain = p.mask("brain") > 0
    assert sd[brain].max() > 0 and not sd[~brain].any() and not mean[~brain].any()
    assert (mean >= 0).all() and (mean <= 1).all() and (sd <= 0.5 + 1e-6).all()
