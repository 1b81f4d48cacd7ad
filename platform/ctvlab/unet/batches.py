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


def view_spec(ucfg, ring_mm: float, shape: Sequence[int] | None = None) -> dict[str, Any]:
    """The spec keys that fix what the network sees (`ctvlab.unet.inputs.network_view`): the model's input
    region, the analysis ring it is drawn around (`preprocess.ring_mm`) and the input grid."""
    out: dict[str, Any] = {"input_region": ucfg.model.input_region, "ring_mm": float(ring_mm)}
    if shape is not None:
        out["input_shape"] = [int(n) for n in shape]
    return out


def prepare_row(
    row: dict[str, Any], modality_set: str, spec: dict[str, Any], spacing: Sequence[float]
) -> dict[str, Any]:
    """A prepared patient row (features, masks) -> network example in the run's view.

    Deterministic: the image is `ctvlab.unet.inputs.network_input` (what evaluation and prediction feed
    the network too); label and brain are cut from the same box. Augmentation happens later, per epoch,
    on the worker. Besides the arrays, the example carries what the box leaves out, so that the loss and
    the validation metrics are those of the whole brain:
    - "fraction": the patient's target voxels / brain voxels (PCC's f, Eq. 1) over the whole grid;
    - "outside_target", "outside_brain": target and brain voxels outside the box (missed, and true
      negatives, since the probability there is 0).

    Args:
        spec: `view_spec` with the run's `input_shape`.
        spacing: the prepared grid's voxel size (mm).
    """
    from ctvlab.unet.inputs import network_input, network_view

    features, masks = row["features"], row["masks"]
    for needed in ("brain", "target", "t2l"):
        if needed not in MASKS:
            raise DataError(f"the prepared masks lack the {needed!r} channel; re-run preprocessing.")
    brain = masks[MASKS.index("brain")] > 0
    target = (masks[MASKS.index("target")] > 0) & brain
    view = network_view(spec, brain, masks[MASKS.index("t2l")] > 0, spacing)
    label = view.crop(target[None].astype(np.float32))
    inside = view.crop(brain[None].astype(np.float32))
    n_brain, n_target = int(brain.sum()), int(target.sum())
    return {
        "patient_id": row["patient_id"],
        "image": network_input(features, FEATURES, brain, modality_set, view),
        "label": label,
        "brain": inside,
        "fraction": np.float32(n_target / max(n_brain, 1)),
        "outside_target": np.int64(n_target - int(label.sum())),
        "outside_brain": np.int64(n_brain - int(inside.sum())),
    }


def input_shape(
    prep: Path, patient_ids: Sequence[str] | None = None, spec: dict[str, Any] | None = None
) -> tuple[int, int, int]:
    """The fixed network grid of a training run, a multiple of 8 along each axis: the largest region box of
    the given patients (`input_region: ring`), or the largest grid of the prepared dataset (`grid`, or
    no `spec`). It is recorded in the model's spec (`input_shape`) so that inference feeds every later
    patient the same grid (`ctvlab.unet.inputs.network_view`)."""
    from ctvlab.data.readers import load_dataset_meta, load_patient
    from ctvlab.unet.inputs import box_shape, fit_shape, region_box

    meta = load_dataset_meta(prep)
    if spec is None or spec.get("input_region", "grid") == "grid":
        base = meta["max_shape"]
        return tuple(int(s) for s in fit_shape(tuple(int(x) for x in base), multiple=8))
    if not patient_ids:
        raise DataError("the network's input grid needs at least one training patient")
    largest = np.zeros(3, dtype=int)
    for pid in patient_ids:
        p = load_patient(prep, pid, mmap=True)
        box = region_box(p.mask("brain"), p.mask("t2l"), p.spacing, spec["ring_mm"])
        largest = np.maximum(largest, box_shape(box))
    return tuple(int(s) for s in fit_shape(tuple(largest), multiple=8))


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


def batch_to_tensors(examples: list[dict[str, Any]], device):
    """(image, label, brain) tensors (B, C, X, Y, Z) of a list of examples."""
    import torch

    def stack(key):
        return torch.from_numpy(np.stack([np.asarray(e[key], dtype=np.float32) for e in examples])).to(device)

    return stack("image"), stack("label"), stack("brain")


def loss_extras(examples: list[dict[str, Any]], device) -> dict[str, Any]:
    """The whole-brain terms of a batch's loss (`ctvlab.unet.losses.make_loss`): PCC's f and the target
    voxels outside the box, each (B,); absent keys (examples of older code) give None."""
    import torch

    def column(key, dtype):
        if any(key not in e for e in examples):
            return None
        return torch.tensor([float(e[key]) for e in examples], dtype=dtype, device=device)

    return {
        "fraction": column("fraction", torch.float32),
        "outside_fn": column("outside_target", torch.float32),
    }


def val_metrics_for(
    prob: np.ndarray,
    label: np.ndarray,
    brain: np.ndarray,
    threshold: float,
    outside_target: int = 0,
    outside_brain: int = 0,
) -> dict[str, float]:
    """Validation metrics of one patient over its whole brain, from the box the network saw (arrays
    (X, Y, Z)) and the counts outside it (target voxels missed, brain voxels correctly left out)."""
    from ctvlab.ctv import metrics as M

    tp, fp, fn, tn = M.confusion(prob >= threshold, label > 0.5, brain > 0.5)
    fn += int(outside_target)
    tn += int(outside_brain) - int(outside_target)
    return M.overlap_metrics(tp, fp, fn, tn)


def mean_metrics(per_patient: list[dict[str, float]], prefix: str = "val_") -> dict[str, float]:
    out = {}
    for k in VAL_KEYS:
        vals = np.array([p[k] for p in per_patient], dtype=float)
        vals = vals[np.isfinite(vals)]
        out[prefix + k] = float(vals.mean()) if vals.size else float("nan")
    return out


VAL_KEYS = ("tversky", "pcc", "dice", "sensitivity", "specificity")
