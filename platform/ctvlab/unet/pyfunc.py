"""The trained U-Net as an MLflow model: a pyfunc that `mlflow.pyfunc.load_model` and `mlflow models
predict` load anywhere the requirements are installed (ctvlab's own code travels inside the model).

Input: the network input of one or more patients, float32 (batch, channels, X, Y, Z) with X, Y, Z multiples
of 8, built by `ctvlab.unet.inputs.network_input` exactly as in training (or a single (channels, X, Y, Z)
array). Output: the network's probability, float32 (batch, 1, X, Y, Z). The CTV post-processing (threshold,
lesion union, clipping, the standard CTVs) needs the patient's masks and stays in `ctvlab predict`.

The logged model holds the same `weights.pt` and `model.json` as a model folder (under
`artifacts/unet/`), so `ctvlab predict --model` and evaluation load it too (`ctvlab.unet.inference`).
This module and `ctvlab.tracking` are the only ones that import mlflow.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import mlflow.pyfunc
import numpy as np

ARTIFACT = "unet"
EXAMPLE_GRID = (16, 16, 16)  # the input example: the smallest grid the network takes (three poolings)
# What loading the model imports: the network (torch), its spec (pydantic, pyyaml via ctvlab.config),
# arrays (numpy) and the loader (mlflow).
REQUIREMENTS = ("torch", "numpy", "pydantic", "pyyaml", "mlflow")


class UNetModel(mlflow.pyfunc.PythonModel):
    """The network in eval mode; `predict` returns its probability for a batch of network inputs."""

    def load_context(self, context) -> None:
        from ctvlab.unet.inference import load_model

        self.model = load_model(context.artifacts[ARTIFACT])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        if isinstance(model_input, dict):  # a named tensor input arrives as {name: array}
            model_input = next(iter(model_input.values()))
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim == 4:
            x = x[None]
        if x.ndim != 5:
            raise ValueError(f"expected (batch, channels, X, Y, Z) network inputs, got shape {x.shape}")
        with torch.no_grad():
            logits = self.model.net(torch.from_numpy(x).to(self.model.device))
        return torch.sigmoid(logits.float()).cpu().numpy()


def requirements() -> list[str]:
    """The packages a loaded model imports, pinned at the versions that trained it."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def save_pyfunc(model_dir: str | Path, dst: str | Path) -> Path:
    """Write the model folder `model_dir` (weights.pt, model.json) as an MLflow pyfunc model at `dst`,
    with a tensor signature, a small input example, pinned requirements and ctvlab's code."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    spec = json.loads((Path(model_dir) / "model.json").read_text())
    channels = int(spec["in_channels"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1, -1))]),
    )
    example = np.zeros((1, channels, *EXAMPLE_GRID), dtype=np.float32)
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    mlflow.pyfunc.save_model(
        path=str(dst), python_model=UNetModel(), artifacts={ARTIFACT: str(model_dir)}, signature=signature,
        input_example=example, pip_requirements=requirements(),
        code_paths=[str(Path(__file__).resolve().parents[1])],
    )  # fmt: skip
    return dst
