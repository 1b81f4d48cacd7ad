"""The U-Net training loop, the same wherever it runs.

One function (`run_training`) trains a model epoch by epoch: augmentation, the step, validation, the
selection metric (validation Tversky at α = 0.02, β = 0.98), early stopping, checkpoints that carry the whole
history, MLflow curves from rank 0, the fault-tolerance test hooks. Where it runs is a `Session`:
- `ctvlab.unet.trainer.RayTrainSession`: one rank of a Ray Train `TorchTrainer` (DDP, Ray Data shards), for
  `ctvlab train`, the final model and multi-worker trials;
- `LocalSession` (here): one process with its examples in memory, reporting through a callback; a search's
  one-worker trials run it inside the Tune trainable (`ctvlab.unet.search`), which saves the fixed cost of a
  Ray Train worker group per trial; the benchmarks run it too.

Nothing here imports Ray or MLflow at module level, so the step can be checked on a machine without them.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
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
    loss_extras,
    mean_metrics,
    val_metrics_for,
)
from ctvlab.unet.inference import SPEC_FILE, WEIGHTS_FILE

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
# Test hook: rank 0 stops at the start of this epoch, after the previous epoch's checkpoint was reported,
# and waits to be killed. A kill there is a well-defined point for the killed-run resume tests, which a
# poll of the checkpoint folders is not (Ray records a checkpoint as the run's latest only after it has been
# persisted and reported).
HOLD_ENV = "CTVLAB_TEST_HOLD_AT_EPOCH"
HOLD_LIMIT_S = 600


class Session:
    """Where a training loop runs: its rank, its data, how it reports. The base is one process (rank 0 of 1)."""

    rank = 0
    world = 1

    def __init__(self, device=None):
        import torch

        self.device = device or torch.device("cpu")

    def restored_state(self) -> dict[str, Any] | None:
        """The `STATE_FILE` of the checkpoint to continue from, or None for a fresh start."""
        return None

    def prepare_model(self, model):
        return model.to(self.device)

    def train_batches(self, seed: int, batch_size: int) -> Iterator[list[dict[str, Any]]]:
        raise NotImplementedError

    def val_examples(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def gather(self, values: list) -> list:
        return values

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        raise NotImplementedError


class LocalSession(Session):
    """One process with its (unaugmented) examples in memory; `report(metrics, checkpoint_dir)` is a callback
    that must copy what it keeps of the checkpoint folder (it is removed after the call)."""

    def __init__(
        self,
        train: Sequence[dict[str, Any]],
        val: Sequence[dict[str, Any]],
        report: Callable[[dict[str, Any], Path | None], None],
        device=None,
        restored: Callable[[], dict[str, Any] | None] | None = None,
    ):
        super().__init__(device)
        self.train, self.val, self._report, self._restored = list(train), list(val), report, restored

    def restored_state(self) -> dict[str, Any] | None:
        return self._restored() if self._restored else None

    def train_batches(self, seed: int, batch_size: int) -> Iterator[list[dict[str, Any]]]:
        order = list(range(len(self.train)))
        random.Random(seed).shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [self.train[j] for j in order[i : i + batch_size]]

    def val_examples(self) -> Iterator[dict[str, Any]]:
        yield from self.val

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        self._report(metrics, checkpoint)


def load_examples(
    prep: Path, patient_ids: Sequence[str], modality_set: str, spec: dict[str, Any]
) -> list[dict[str, Any]]:
    """Network examples of prepared patients (`batches.prepare_row` on each), read with NumPy."""
    from ctvlab.data.readers import load_patient
    from ctvlab.unet.batches import prepare_row

    out = []
    for pid in patient_ids:
        p = load_patient(prep, pid)
        row = {"patient_id": pid, "features": p.features, "masks": p.masks}
        out.append(prepare_row(row, modality_set, spec, p.spacing))
    return out


def train_step(
    model, optimizer, loss_fn, examples: list[dict[str, Any]], epoch: int, device, mixed_precision: str
):
    """One optimiser step on a batch of (augmented) examples; returns the loss."""
    x, y, brain = batch_to_tensors(examples, device)
    extras = loss_extras(examples, device)
    with autocast_context(device, mixed_precision):
        logits = model(x)
    loss = loss_fn(logits.float(), y, brain, epoch, **extras)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def validate(model, examples, device, tcfg) -> list[dict[str, float]]:
    """Validation metrics of each example over its whole brain (`batches.val_metrics_for`)."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for ex in examples:
            x, _y, _brain = batch_to_tensors([ex], device)
            with autocast_context(device, tcfg.mixed_precision):
                logits = model(x)
            prob = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
            out.append(val_metrics_for(prob, np.asarray(ex["label"])[0], np.asarray(ex["brain"])[0], tcfg.threshold,
                                       int(ex.get("outside_target", 0)), int(ex.get("outside_brain", 0))))  # fmt: skip
    return out


def early_stop(epoch: int, best_epoch: int, patience: int | None) -> bool:
    """True when `patience` epochs have passed since the best one (epochs count from 0)."""
    return patience is not None and epoch - best_epoch >= patience


def run_training(config: dict[str, Any], session: Session) -> list[dict[str, float]]:
    """Train one model; returns every epoch's metrics (from the first epoch, also after a resume).

    `config` holds the resolved UNetConfig ("unet"), the model's view keys ("view": input region, ring,
    input grid) and the run settings (MLflow run, printing, test hooks)."""
    import torch

    from ctvlab.unet.augment import build_augmentation
    from ctvlab.unet.losses import make_loss
    from ctvlab.unet.model import build_unet, model_spec
    from ctvlab.unet.optim import build_optimizer

    ucfg = UNetConfig.model_validate(config["unet"])
    tcfg = ucfg.train
    rank, world, device = session.rank, session.world, session.device
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    torch.manual_seed(tcfg.seed + rank)

    in_channels = len(MODALITY_SETS[ucfg.model.modality_set])
    model = build_unet(ucfg.model, in_channels)
    # What the network sees (region, ring, grid): inference feeds later patients the same view.
    spec = {**model_spec(ucfg.model, in_channels), **config["view"]}
    optimizer = build_optimizer(model.parameters(), ucfg.optim)
    loss_fn = make_loss(ucfg.loss)

    start_epoch, best, best_epoch, history = 0, -float("inf"), -1, []
    state = session.restored_state()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        best, best_epoch = float(state["best"]), int(state["best_epoch"])
        history = json.loads(state["history"])
    model = session.prepare_model(model)
    _optimizer_to(optimizer, device)

    logger = _rank0_logger(config) if rank == 0 else None
    fault, hold = config.get("inject_failure"), config.get("hold")
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
        for batch in session.train_batches(seed, tcfg.batch_size):
            examples = [{**ex, **augment({k: ex[k] for k in ("image", "label", "brain")})} for ex in batch]
            losses.append(
                train_step(model, optimizer, loss_fn, examples, epoch, device, tcfg.mixed_precision)
            )
            n_vols += len(examples)
        train_time = time.perf_counter() - t0

        # Rank 0 validates every validation patient (the val set is small and not split across workers);
        # the others wait at the gather below.
        validate_now = (epoch + 1) % tcfg.val_every == 0 or epoch == tcfg.epochs - 1
        per_patient = (
            validate(model, session.val_examples(), device, tcfg) if validate_now and rank == 0 else []
        )
        if world > 1:
            per_patient = session.gather(per_patient)
            losses = session.gather(losses)
            n_vols = int(sum(session.gather([n_vols])))
        metrics = {
            "epoch": epoch,
            "start_epoch": start_epoch,  # where this run began: > 0 after a restart or resume
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
        if logger is not None:
            logger.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
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
                session.report(metrics, Path(d))
        else:
            session.report(metrics, None)
        if stop:  # every rank computes the same decision from the gathered metrics
            if rank == 0 and config.get("print_epochs"):
                print(f"early stop at epoch {epoch + 1}: no better validation Tversky for {tcfg.patience} "
                      f"epochs (best: epoch {best_epoch + 1})", flush=True)  # fmt: skip
            break
    if logger is not None:
        logger.flush()  # what is still unsent is logged by the driver from the checkpoint's history
    return history


def _hold_until_killed(marker: Path, epoch: int) -> None:
    """The HOLD_ENV test hook: say where this rank stopped, then wait (bounded) for the test to kill it."""
    from ctvlab.atomic import write_json_atomic

    write_json_atomic(marker, {"epoch": epoch, "pid": os.getpid()})
    deadline = time.monotonic() + HOLD_LIMIT_S
    while time.monotonic() < deadline:
        time.sleep(0.2)
    raise RuntimeError(f"{HOLD_ENV}: held at epoch {epoch} for {HOLD_LIMIT_S} s and was never killed")


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

    # Silent: the driver says once for the whole study when the server stops answering.
    return BufferedMetrics(config["tracking_uri"], run_id, spool=config.get("spool"))
