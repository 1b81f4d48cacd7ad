"""Pieces shared by the Ray Train loop, the benchmark's plain loop and inference: a prepared patient as a
network example, the run's fixed input grid, batches as tensors, autocast, validation metrics and the
per-epoch progress line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctvlab.data.layout import MASKS
from ctvlab.errors import DataError
from ctvlab.study import FEATURES, SELECTION_METRIC


def prepare_row(row: dict[str, Any], modality_set: str, out_shape: Sequence[int]) -> dict[str, Any]:
    """A prepared patient row (features, masks) -> network example on the fixed training grid.

    Deterministic: the image is `ctvlab.unet.inputs.network_input` (what evaluation and prediction feed
    the network too); label and brain are placed on the same grid. Augmentation happens later, per
    epoch, on the worker.
    """
    from ctvlab.unet.inputs import crop_or_pad, full_box, network_input

    features, masks = row["features"], row["masks"]
    for needed in ("brain", "target"):
        if needed not in MASKS:
            raise DataError(f"the prepared masks lack the {needed!r} channel; re-run preprocessing.")
    brain = masks[MASKS.index("brain")] > 0
    target = masks[MASKS.index("target")] > 0
    box, grid = full_box(features.shape[1:]), tuple(out_shape)
    return {
        "patient_id": row["patient_id"],
        "image": network_input(features, FEATURES, brain, modality_set, grid),
        "label": crop_or_pad(target[None].astype(np.float32), box, grid),
        "brain": crop_or_pad(brain[None].astype(np.float32), box, grid),
    }


def input_shape(prep: Path) -> tuple[int, int, int]:
    """The fixed network grid of a training run: the largest grid of the prepared dataset, a multiple of 8.
    It is recorded in the model's spec (`input_shape`) so that inference feeds every later patient the same
    grid (`ctvlab.unet.inputs.network_grid`)."""
    from ctvlab.data.readers import load_dataset_meta
    from ctvlab.unet.inputs import fit_shape

    base = load_dataset_meta(prep)["max_shape"]
    return tuple(int(s) for s in fit_shape(tuple(int(x) for x in base), multiple=8))


def epoch_line(epoch: int, epochs: int, metrics: dict[str, Any]) -> str:
    """One progress line per epoch of a training run (it reaches the driver's log through Ray)."""
    parts = [f"epoch {epoch + 1}/{epochs}"]
    for key, label in (
        ("train_loss", "train loss"),
        ("val_loss", "val loss"),
        (SELECTION_METRIC, "val Tversky"),
    ):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and np.isfinite(value):
            parts.append(f"{label} {value:.4f}")
    if metrics.get("is_best"):
        parts.append("best so far")
    return " · ".join(parts)


def autocast_context(device, mode: str):
    """bf16 autocast on CUDA (mode auto/bf16); a no-op on CPU, where bf16 convolutions are slow."""
    import contextlib

    import torch

    if device.type == "cuda" and mode in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_to_tensors(examples: list[dict[str, np.ndarray]], device):
    import torch

    def stack(key):
        return torch.from_numpy(np.stack([np.asarray(e[key], dtype=np.float32) for e in examples])).to(device)

    return stack("image"), stack("label"), stack("brain")


def val_metrics_for(
    prob: np.ndarray, label: np.ndarray, brain: np.ndarray, threshold: float
) -> dict[str, float]:
    """Validation metrics of one patient on the training grid (arrays (X, Y, Z))."""
    from ctvlab.ctv import metrics as M

    pred = prob >= threshold
    target, b = label > 0.5, brain > 0.5
    return {
        "tversky": M.tversky(pred, target, b, alpha=0.02, beta=0.98),
        "pcc": M.pcc(pred, target, b),
        "dice": M.dice(pred, target, b),
        "sensitivity": M.sensitivity(pred, target, b),
        "specificity": M.specificity(pred, target, b),
    }


def mean_metrics(per_patient: list[dict[str, float]], prefix: str = "val_") -> dict[str, float]:
    out = {}
    for k in VAL_KEYS:
        vals = np.array([p[k] for p in per_patient], dtype=float)
        vals = vals[np.isfinite(vals)]
        out[prefix + k] = float(vals.mean()) if vals.size else float("nan")
    return out


VAL_KEYS = ("tversky", "pcc", "dice", "sensitivity", "specificity")
