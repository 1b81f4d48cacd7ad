"""Training the 3D U-Net on Ray Train (the study's Methods: Deep learning CTV).

The driver checks the split (no patient in two roles), builds Ray Datasets of the network examples of the
training and validation patients, and runs a `TorchTrainer` whose workers each run the training loop
(`ctvlab.unet.loop.run_training`) in a `RayTrainSession`: each receives its shard with
`get_dataset_shard`, trains with DDP (gloo on CPU, NCCL on GPU, bf16 autocast on GPU), and reports through
Ray Train; rank 0 validates, saves checkpoints and logs the curves to MLflow. A lost worker restarts the
group from the latest checkpoint (`FailureConfig`); `resume=True` continues an interrupted run (same Ray
run name and storage) with the same epoch numbering.

After training, the driver writes the best model (selection: validation Tversky at α = 0.02, β = 0.98,
as in the study) as a state dict plus a JSON spec, logs it to MLflow and registers it.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctvlab.config import UNetConfig
from ctvlab.study import SELECTION_METRIC
from ctvlab.unet.batches import input_shape, prepare_row, view_spec
from ctvlab.unet.inference import SPEC_FILE, WEIGHTS_FILE
from ctvlab.unet.loop import HISTORY_FILE, HOLD_ENV, STATE_FILE, Session, early_stop, run_training

__all__ = ["HISTORY_FILE", "HOLD_ENV", "SPEC_FILE", "STATE_FILE", "WEIGHTS_FILE", "early_stop"]

MODEL_ARTIFACT = "model"
_EXAMPLE_KEYS = ("image", "label", "brain", "fraction", "outside_target", "outside_brain")


class RayTrainSession(Session):
    """One rank of a Ray Train worker group: Ray Data shards in, `ray.train.report` out."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._train = ray.train.get_dataset_shard("train")
        self._val = ray.train.get_dataset_shard("val")

    def restored_state(self) -> dict[str, Any] | None:
        import ray.train
        import torch

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def train_batches(self, seed: int, batch_size: int) -> Iterator[list[dict[str, Any]]]:
        for batch in self._train.iter_batches(
            batch_size=batch_size, batch_format="numpy", local_shuffle_buffer_size=8,
            local_shuffle_seed=seed, prefetch_batches=1,
        ):  # fmt: skip
            yield _examples(batch)

    def val_examples(self) -> Iterator[dict[str, Any]]:
        for batch in self._val.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
            yield from _examples(batch)

    def gather(self, values: list) -> list:
        import torch.distributed as dist

        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, values)
        return [x for part in parts for x in part]

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        if checkpoint is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)))


def _examples(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    return [{k: batch[k][i] for k in _EXAMPLE_KEYS if k in batch} for i in range(len(batch["patient_id"]))]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: one DDP rank running the training loop."""
    run_training(config, RayTrainSession())


def best_summary(best: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, float]:
    """The best epoch's validation metrics as `best_<name>`, except those the epochs already log as a
    running best (a second point at step 0 would bend that curve)."""
    per_epoch = set(history[-1]) if history else set()
    return {f"best_{k}": v for k, v in best.items() if k.startswith("val_") and f"best_{k}" not in per_epoch}


def checkpoint_history(result) -> list[dict[str, float]]:
    """Every epoch's reported metrics, from the latest checkpoint (it carries the whole history)."""
    if result.checkpoint is None:
        return [result.metrics] if result.metrics else []
    with result.checkpoint.as_directory() as d:
        path = Path(d) / HISTORY_FILE
        return json.loads(path.read_text()) if path.exists() else []


# --- the driver --------------------------------------------------------------------------------------


def build_datasets(
    prep: Path,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    modality_set: str,
    spec: dict[str, Any],
    data_cpus: float = 0.5,
):
    """Ray Datasets of ready network examples for the train and val patients.

    Read and prepared once by Ray tasks, then materialised in the object store (a few MB per patient):
    every epoch iterates the same blocks in a new random order instead of re-reading and re-preparing the
    volumes, whose tasks would otherwise compete with the training workers for the CPUs each epoch.
    Augmentation stays on the workers, per epoch.

    Args:
        data_cpus: the CPU budget of these Ray Data tasks (`unet.train.data_cpus`): each task asks for
            `resources.DATA_TASK_CPUS` and Ray Data runs no more at once than fit in the budget, which
            the run's plan keeps free of workers and trials (`ctvlab.resources`).
    """
    from functools import partial

    from ray.data import DataContext, ExecutionResources

    from ctvlab.data.readers import load_dataset_meta, read_volumes
    from ctvlab.resources import DATA_TASK_CPUS

    voxel = float(load_dataset_meta(prep)["voxel_mm"])
    fn = partial(prepare_row, modality_set=modality_set, spec=spec, spacing=(voxel, voxel, voxel))
    ctx = DataContext.get_current()
    before = ctx.execution_options.resource_limits
    # A dataset copies the current context when it is created: the budget applies to these two only.
    ctx.execution_options.resource_limits = ExecutionResources(cpu=data_cpus)
    try:

        def prepared(ids):
            return (
                read_volumes(prep, ids, num_cpus=DATA_TASK_CPUS)
                .map(fn, num_cpus=DATA_TASK_CPUS)
                .materialize()
            )

        return prepared(train_ids).randomize_block_order(), prepared(val_ids)
    finally:
        ctx.execution_options.resource_limits = before


def build_trainer(
    prep: Path,
    ucfg: UNetConfig,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    *,
    storage_path: Path | str,
    run_name: str,
    loop_extra: dict[str, Any] | None = None,
    callbacks: list | None = None,
):
    """A configured TorchTrainer for one training run (used by `train_unet` and by multi-worker trials)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    tcfg = ucfg.train
    spec = run_view(prep, ucfg, train_ids, val_ids)
    train_ds, val_ds = build_datasets(prep, train_ids, val_ids, ucfg.model.modality_set, spec, tcfg.data_cpus)
    resources = {"CPU": tcfg.cpus_per_worker}
    if tcfg.use_gpu:
        resources["GPU"] = tcfg.gpus_per_worker
    loop_config = {
        "unet": ucfg.model_dump(mode="json"),
        "view": spec,
        # Intra-op threads: the worker's CPUs rounded up (1.5 CPUs: two threads; Ray Data's tasks are done
        # once the datasets are materialised, before the first step).
        "threads_per_worker": max(1, math.ceil(tcfg.cpus_per_worker)),
        **(loop_extra or {}),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=tcfg.keep_checkpoints,
                checkpoint_score_attribute=SELECTION_METRIC,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
        ),
        datasets={"train": train_ds, "val": val_ds},
        # Train is split across workers (equal shards: DDP ranks must take the same number of steps, so a
        # remainder patient sits out an epoch; block order is reshuffled every epoch so it is not always
        # the same one). Val is not split: rank 0 validates every validation patient.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def run_view(
    prep: Path, ucfg: UNetConfig, train_ids: Sequence[str], val_ids: Sequence[str]
) -> dict[str, Any]:
    """The view keys of a run's model (`batches.view_spec`) with its input grid: the largest region box of
    its training and validation patients, so that every one of them fits. The region is drawn with the
    prepared data's own analysis ring (`preprocess.ring_mm` when it was prepared); the prepared data's
    preprocessing settings go with it (`preprocess`)."""
    from ctvlab.data.readers import load_dataset_meta

    settings = load_dataset_meta(prep)["settings"]
    spec = view_spec(ucfg, float(settings["ring_mm"]))
    # The preprocessing its inputs had: `ctvlab predict` prepares a new patient with exactly these.
    return {
        **spec,
        "input_shape": list(input_shape(prep, [*train_ids, *val_ids], spec)),
        "preprocess": settings,
    }


def best_checkpoint(result):
    """The checkpoint with the highest validation Tversky among those kept, the earliest of equals (falls back
    to the latest)."""
    scored = [
        (c, m) for c, m in (result.best_checkpoints or []) if np.isfinite(m.get(SELECTION_METRIC, np.nan))
    ]
    if scored:  # ties: the earliest epoch, the one the training loop reports as best
        return max(scored, key=lambda cm: (cm[1][SELECTION_METRIC], -cm[1].get("epoch", 0)))
    return result.checkpoint, result.metrics or {}


def provenance_spec(prep: Path, split) -> dict[str, Any]:
    """What a model records about its data: the dataset and split digests, the salt's fingerprint and the
    pseudonyms of the patients it was trained and selected on, which evaluation's leakage guard checks."""
    from ctvlab.splits import pseudonymise, salt_fingerprint

    train_ids, val_ids = split.patients("train"), split.patients("val")
    names = pseudonymise(prep, train_ids + val_ids)
    return {
        "split_digest": split.digest, "dataset_digest": split.dataset_digest,
        "salt_fingerprint": salt_fingerprint(prep),
        "train_patients": sorted(names[p] for p in train_ids), "val_patients": sorted(names[p] for p in val_ids),
    }  # fmt: skip


def export_model(checkpoint, dst: Path, extra_spec: dict[str, Any]) -> Path:
    """Copy the weights (state dict only) and the model spec out of a Ray checkpoint into `dst`."""
    with checkpoint.as_directory() as d:
        return export_model_dir(Path(d), dst, extra_spec)


def export_model_dir(src: Path, dst: Path, extra_spec: dict[str, Any]) -> Path:
    """Copy the weights and the model spec of a checkpoint folder into `dst`, the spec updated with
    `extra_spec`.

    The new folder is built beside the old one and swapped in, so the previous model stays until the new
    one is complete."""
    from ctvlab.atomic import atomic_folder

    dst = Path(dst)
    with atomic_folder(dst) as tmp:
        shutil.copy2(Path(src) / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        spec = json.loads((Path(src) / SPEC_FILE).read_text())
        spec.update(extra_spec)
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return dst
