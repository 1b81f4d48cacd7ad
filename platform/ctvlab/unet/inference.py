"""Loading a trained U-Net and predicting a patient's probability map (evaluation, ablation, prediction).

A model folder holds `weights.pt` (a plain state dict) and `model.json` (the spec: architecture, modality
set, and what the network sees: `input_region`, `ring_mm`, `input_shape`). The probability is computed on
exactly the input the training and validation passes saw (`ctvlab.unet.inputs.network_view` and
`network_input` with the spec's settings), so a validation patient gets the same map here as in the
training loop's validation pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctvlab.errors import DataError
from ctvlab.study import FEATURES

WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "model.json"


@dataclass
class LoadedModel:
    """A network in eval mode on `device`, with the spec it was built from."""

    net: Any
    spec: dict[str, Any]
    device: Any

    @property
    def trained_grid(self) -> tuple[int, int, int] | None:
        """The input grid of training (None for a model exported before the spec recorded it)."""
        shape = self.spec.get("input_shape")
        return tuple(int(n) for n in shape) if shape else None  # type: ignore[return-value]


def model_folder(path: Path) -> Path:
    """The folder holding weights.pt and model.json: `path` itself, or, for a logged MLflow model (an
    `MLmodel` file beside `artifacts/`), the model folder inside it (`ctvlab.unet.pyfunc`)."""
    if (path / "MLmodel").is_file() and not (path / SPEC_FILE).is_file():
        inner = sorted(p.parent for p in (path / "artifacts").rglob(SPEC_FILE))
        if inner:
            return inner[0]
    return path


def load_model(model_dir: str | Path, device: str | None = None) -> LoadedModel:
    """Rebuild the network from `model.json` and load `weights.pt` (weights_only: no pickled code runs).

    Raises:
        DataError: the folder lacks either file or the spec does not describe a ctvlab U-Net.
    """
    import torch

    from ctvlab.unet.model import model_from_spec

    model_dir = model_folder(Path(model_dir))
    try:
        spec = json.loads((model_dir / SPEC_FILE).read_text())
        state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise DataError(
            f"{model_dir} is not a ctvlab model folder: {Path(e.filename).name} is missing"
        ) from None
    try:
        net = model_from_spec(spec)
    except ValueError as e:
        raise DataError(f"{model_dir / SPEC_FILE}: {e}") from None
    net.load_state_dict(state)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(dev).eval()
    return LoadedModel(net, spec, dev)


def predict_arrays(
    model: LoadedModel, features: np.ndarray, brain: np.ndarray, t2l: np.ndarray, spacing
) -> np.ndarray:
    """The network's probability (X, Y, Z) on a patient's full 3 mm grid.

    Args:
        model: a loaded model.
        features: (F, X, Y, Z) prepared feature channels in `FEATURES` order (NaN = missing).
        brain: (X, Y, Z) brain mask; voxels outside it get probability 0.
        t2l: (X, Y, Z) pre-RT T2L: the region the network sees is drawn around it (`input_region: ring`).
        spacing: the grid's voxel size (mm).

    Returns:
        float32 (X, Y, Z) in [0, 1]; 0 outside the box the network saw.
    """
    import torch

    from ctvlab.unet.inputs import network_input, network_view

    inside = np.asarray(brain) > 0
    full = tuple(int(n) for n in features.shape[1:])
    view = network_view(model.spec, inside, np.asarray(t2l) > 0, spacing)
    x = network_input(features, FEATURES, inside, model.spec["modality_set"], view)
    xin = torch.from_numpy(x[None]).to(model.device)
    with torch.no_grad():
        if model.device.type == "cuda":  # as in training: bf16 autocast on GPU
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model.net(xin)
        else:
            logits = model.net(xin)
    prob = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
    return (view.uncrop(prob, full) * inside).astype(np.float32)


FLIPS = tuple((x, y, z) for x in (False, True) for y in (False, True) for z in (False, True))


def predict_with_spread(
    model: LoadedModel, features: np.ndarray, brain: np.ndarray, t2l: np.ndarray, spacing, flips=FLIPS
) -> tuple[np.ndarray, np.ndarray]:
    """Test-time augmentation: the network's probability averaged over mirrored inputs (the flips it was
    trained with, all eight by default), and its standard deviation over them: a per-voxel uncertainty.

    The spread says where the prediction depends on how the same patient is presented, which is where the
    network has learnt least; it is not a calibrated probability interval.

    Returns:
        (mean, sd), float32 (X, Y, Z) on the patient's full grid, 0 outside the box the network saw.
    """
    import torch

    from ctvlab.unet.inputs import network_input, network_view

    inside = np.asarray(brain) > 0
    full = tuple(int(n) for n in features.shape[1:])
    view = network_view(model.spec, inside, np.asarray(t2l) > 0, spacing)
    x = torch.from_numpy(network_input(features, FEATURES, inside, model.spec["modality_set"], view)[None])
    probs = []
    with torch.no_grad():
        for flip in flips:
            dims = [2 + i for i, f in enumerate(flip) if f]
            xin = (torch.flip(x, dims) if dims else x).to(model.device)
            if model.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model.net(xin)
            else:
                logits = model.net(xin)
            prob = torch.sigmoid(logits.float())
            probs.append((torch.flip(prob, dims) if dims else prob)[0, 0].cpu().numpy())
    stack = np.stack(probs)
    mean = view.uncrop(stack.mean(axis=0), full) * inside
    sd = view.uncrop(stack.std(axis=0), full) * inside
    return mean.astype(np.float32), sd.astype(np.float32)


def predict_probability(model: LoadedModel, patient) -> np.ndarray:
    """`predict_arrays` of a prepared patient (`ctvlab.data.readers.PreparedPatient`)."""
    return predict_arrays(
        model, patient.features, patient.mask("brain"), patient.mask("t2l"), patient.spacing
    )
