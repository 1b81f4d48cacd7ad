"""Training the 3D U-Net on Ray Train (SPEC: Deep learning CTV).

The driver checks the split (no patient in two roles), builds Ray Datasets over the prepared volumes
of the training and validation patients, and runs a `TorchTrainer`: each worker receives its shard with
`get_dataset_shard`, trains with DDP (gloo on CPU, NCCL on GPU, bf16 autocast on GPU), validates every
epoch on its share of the validation patients, and reports the metrics; rank 0 saves checkpoints (every
`checkpoint_every` epochs, whenever the selection metric improves, and at the end) and logs the curves
to MLflow. A lost worker restarts the group from the latest checkpoint (`FailureConfig`); `resume=True`
continues an interrupted run (same Ray run name and storage) with the same epoch numbering.

After training, the driver writes the best model (selection: validation Tversky at α = 0.02, β = 0.98,
as in the study) as a state dict plus a JSON spec, logs it to MLflow and registers it. With
`train.patience`, training stops early once that many validated epochs pass without a better score.

About 410 lines: the worker loop (epochs, validation, early stopping, checkpoints, the test hooks) and the
driver's pieces it is built and read with (datasets, trainer, best checkpoint, export) change together.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctvlab.config import UNetConfig
from ctvlab.data.layout import MODALITY_SETS
from ctvlab.study import BEST_SELECTION_METRIC, SELECTION_METRIC
from ctvlab.unet.batches import (
    autocast_context,
    batch_to_tensors,
    epoch_line,
    input_shape,
    mean_metrics,
    prepare_row,
    val_metrics_for,
)
from ctvlab.unet.inference import SPEC_FILE, WEIGHTS_FILE

MODEL_ARTIFACT = "model"
STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
# Test hook: rank 0 stops at the start of this epoch, after the previous epoch's checkpoint was reported,
# and waits to be killed. A kill there is a well-defined point for the killed-run resume tests, which a
# poll of the checkpoint folders is not (Ray records a checkpoint as the run's latest only after it has been
# persisted and reported).
HOLD_ENV = "CTVLAB_TEST_HOLD_AT_EPOCH"
HOLD_LIMIT_S = 600


# --- pieces shared by the Ray Train loop, the plain loop of the benchmark and inference ---------------


# --- the training loop run by every Ray Train worker ----------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: one DDP rank. `config` holds the resolved UNetConfig and the run settings."""
    import ray.train
    import ray.train.torch
    import torch

    from ctvlab.unet.augment import build_augmentation
    from ctvlab.unet.losses import make_loss
    from ctvlab.unet.model import build_unet, model_spec
    from ctvlab.unet.optim import build_optimizer

    ucfg = UNetConfig.model_validate(config["unet"])
    tcfg = ucfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    torch.manual_seed(tcfg.seed + rank)
    device = ray.train.torch.get_device()

    in_channels = len(MODALITY_SETS[ucfg.model.modality_set])
    model = build_unet(ucfg.model, in_channels)
    # The grid every patient of this run is padded to; inference pads later patients to it too.
    spec = {**model_spec(ucfg.model, in_channels), "input_shape": list(config["input_shape"])}
    optimizer = build_optimizer(model.parameters(), ucfg.optim)
    loss_fn = make_loss(ucfg.loss)

    start_epoch, best, best_epoch, history = 0, -float("inf"), -1, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        best, best_epoch = float(state["best"]), int(state["best_epoch"])
        history = json.loads(state["history"])
    model = ray.train.torch.prepare_model(model)
    _optimizer_to(optimizer, device)

    tracker_logger = _rank0_logger(config) if rank == 0 else None
    fault = config.get("inject_failure")
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    hold = config.get("hold")
    for epoch in range(start_epoch, tcfg.epochs):
        if hold and epoch == hold["epoch"] and rank == 0:
            _hold_until_killed(Path(hold["marker"]), epoch)
        if fault and epoch == fault["epoch"] and rank == 0 and not Path(fault["marker"]).exists():
            Path(fault["marker"]).write_text("failed once\n")
            raise RuntimeError(f"injected worker failure at epoch {epoch}")
        t0 = time.perf_counter()
        model.train()
        seed = tcfg.seed * 1_000_003 + epoch * 1009 + rank
        augment = build_augmentation(ucfg.augment, seed=seed)
        losses, n_vols = [], 0
        for batch in train_shard.iter_batches(
            batch_size=tcfg.batch_size, batch_format="numpy", local_shuffle_buffer_size=8,
            local_shuffle_seed=seed, prefetch_batches=1,
        ):  # fmt: skip
            examples = [
                augment({"image": batch["image"][i], "label": batch["label"][i], "brain": batch["brain"][i]})
                for i in range(len(batch["patient_id"]))
            ]
            x, y, brain = batch_to_tensors(examples, device)
            with autocast_context(device, tcfg.mixed_precision):
                logits = model(x)
            loss = loss_fn(logits.float(), y, brain, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            n_vols += len(examples)
        train_time = time.perf_counter() - t0

        # Rank 0 validates every validation patient (the val set is small and not split across workers);
        # the others wait at the gather below.
        validate_now = (epoch + 1) % tcfg.val_every == 0 or epoch == tcfg.epochs - 1
        per_patient = _validate(model, val_shard, device, tcfg) if validate_now and rank == 0 else []
        if world > 1:
            per_patient = _all_gather(per_patient)
            losses = _all_gather(losses)
            n_vols = int(sum(_all_gather([n_vols])))
        metrics = {
            "epoch": epoch,
            "start_epoch": start_epoch,  # where this worker group began: > 0 after a restart or resume
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "train_volumes": n_vols,
            "epoch_seconds": time.perf_counter() - t0,
            "train_seconds": train_time,
            **(mean_metrics(per_patient) if per_patient else {}),
        }
        score = metrics.get(SELECTION_METRIC, float("nan"))
        improved = bool(np.isfinite(score) and score > best)
        if improved:
            best, best_epoch = float(score), epoch
        metrics.update({BEST_SELECTION_METRIC: best, "best_epoch": best_epoch, "is_best": int(improved)})
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

        stop = early_stop(epoch, best_epoch, tcfg.patience) if validate_now else False
        last = epoch == tcfg.epochs - 1 or stop
        save = rank == 0 and (improved or last or (epoch + 1) % tcfg.checkpoint_every == 0)
        if tracker_logger is not None:
            tracker_logger.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        if rank == 0 and config.get("print_epochs"):  # a search reports its trials itself
            print(epoch_line(epoch, tcfg.epochs, metrics), flush=True)
        if save:
            with tempfile.TemporaryDirectory() as d:
                state = {
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch, "best": best, "best_epoch": best_epoch,
                    "history": json.dumps(history),
                }  # fmt: skip
                torch.save(state, Path(d) / STATE_FILE)
                torch.save(_unwrap(model).state_dict(), Path(d) / WEIGHTS_FILE)
                (Path(d) / SPEC_FILE).write_text(json.dumps({**spec, "epoch": epoch}, indent=2))
                (Path(d) / HISTORY_FILE).write_text(json.dumps(history))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        if stop:  # every rank computes the same decision from the gathered metrics
            if rank == 0 and config.get("print_epochs"):
                print(f"early stop at epoch {epoch + 1}: no better validation Tversky for {tcfg.patience} "
                      f"epochs (best: epoch {best_epoch + 1})", flush=True)  # fmt: skip
            break
    if tracker_logger is not None:
        tracker_logger.flush()  # what is still unsent is logged by the driver from the checkpoint's history


def early_stop(epoch: int, best_epoch: int, patience: int | None) -> bool:
    """True when `patience` epochs have passed since the best one (epochs count from 0)."""
    return patience is not None and epoch - best_epoch >= patience


def _hold_until_killed(marker: Path, epoch: int) -> None:
    """The HOLD_ENV test hook: say where this rank stopped, then wait (bounded) for the test to kill it."""
    from ctvlab.atomic import write_json_atomic

    write_json_atomic(marker, {"epoch": epoch, "pid": os.getpid()})
    deadline = time.monotonic() + HOLD_LIMIT_S
    while time.monotonic() < deadline:
        time.sleep(0.2)
    raise RuntimeError(f"{HOLD_ENV}: held at epoch {epoch} for {HOLD_LIMIT_S} s and was never killed")


def _validate(model, val_shard, device, tcfg) -> list[dict[str, float]]:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for batch in val_shard.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1):
            x, _y, _brain = batch_to_tensors(
                [{"image": batch["image"][0], "label": batch["label"][0], "brain": batch["brain"][0]}], device
            )
            with autocast_context(device, tcfg.mixed_precision):
                logits = model(x)
            prob = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
            out.append(val_metrics_for(prob, batch["label"][0][0], batch["brain"][0][0], tcfg.threshold))
    return out


def _all_gather(obj: list) -> list:
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return [x for part in parts for x in part]


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _optimizer_to(optimizer, device) -> None:
    """Move optimizer state loaded on the CPU to the training device (resume on GPU)."""
    import torch

    for state in optimizer.state.values():
        if isinstance(state, dict):
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[k] = v.to(device)


def _rank0_logger(config: dict[str, Any]):
    """The run's metric logger, which keeps the values while the tracking server is unreachable."""
    run_id = config.get("mlflow_run_id")
    if not run_id:
        return None
    from ctvlab.tracking import BufferedMetrics

    return BufferedMetrics(config["tracking_uri"], run_id, say=lambda m: print(m, flush=True))


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
    shape,
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

    from ctvlab.data.readers import read_volumes
    from ctvlab.resources import DATA_TASK_CPUS

    fn = partial(prepare_row, modality_set=modality_set, out_shape=shape)
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
    """A configured TorchTrainer for one training run (used by `train_unet` and by each Tune trial)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    tcfg = ucfg.train
    shape = input_shape(prep)
    train_ds, val_ds = build_datasets(
        prep, train_ids, val_ids, ucfg.model.modality_set, shape, tcfg.data_cpus
    )
    resources = {"CPU": tcfg.cpus_per_worker}
    if tcfg.use_gpu:
        resources["GPU"] = tcfg.gpus_per_worker
    loop_config = {
        "unet": ucfg.model_dump(mode="json"),
        "input_shape": list(shape),
        "threads_per_worker": max(1, int(tcfg.cpus_per_worker)),
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
    """Copy the weights (state dict only) and the model spec out of a checkpoint into `dst`.

    The new folder is built beside the old one and swapped in, so the previous model stays until the new
    one is complete."""
    from ctvlab.atomic import atomic_folder

    dst = Path(dst)
    with atomic_folder(dst) as tmp, checkpoint.as_directory() as d:
        shutil.copy2(Path(d) / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        spec = json.loads((Path(d) / SPEC_FILE).read_text())
        spec.update(extra_spec)
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return dst
