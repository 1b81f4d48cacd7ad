"""Search spaces of the study's hyperparameter search (pure): a trial's U-Net settings from its parameters,
the grid step, the random step and its narrowing around the grid's best (Methods, Hyperparameter search)."""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from ctvlab.config import BetaSchedule, GridSpace, SearchSpace, TuneConfig, UNetConfig
from ctvlab.study import BEST_SELECTION_METRIC


def with_params(base: UNetConfig, params: dict[str, Any]) -> UNetConfig:
    """`base` with a trial's parameters (lr, base_features, batch_size, loss, beta_schedule, modality_set) set;
    a β schedule may come as a dict (a trial) or as JSON text (a trials table)."""
    u = base.model_copy(deep=True)
    if "lr" in params:
        u.optim.lr = float(params["lr"])
    if "base_features" in params:
        u.model.base_features = int(params["base_features"])
    if "batch_size" in params:
        u.train.batch_size = int(params["batch_size"])
    if "loss" in params:
        u.loss.name = params["loss"]
    if "beta_schedule" in params:
        beta = params["beta_schedule"]
        u.loss.beta = BetaSchedule.model_validate(json.loads(beta) if isinstance(beta, str) else beta)
    if "modality_set" in params:
        u.model.modality_set = params["modality_set"]
    return u


def trial_unet_config(base: UNetConfig, params: dict[str, Any], tcfg: TuneConfig) -> UNetConfig:
    """The U-Net settings of one trial: the study's settings with the trial's sampled values."""
    u = with_params(base, params)
    u.train.epochs = tcfg.epochs_per_trial
    u.train.cpus_per_worker = tcfg.cpus_per_trial
    if tcfg.gpus_per_trial > 0:
        u.train.use_gpu = True
        u.train.gpus_per_worker = tcfg.gpus_per_trial
    u.train.checkpoint_every = max(u.train.checkpoint_every, tcfg.epochs_per_trial)  # best + last suffice
    u.train.patience = None  # ASHA stops a search's weak trials
    return u


def final_unet_config(base: UNetConfig, best: dict[str, Any]) -> UNetConfig:
    """The final model's settings (Methods: PCC loss, trained to convergence): the search's best
    configuration with `base.final_loss`, for `base.train.epochs` with `base.train.patience`, on the
    resources of `base.train` (not a trial's)."""
    u = with_params(base, best)
    u.loss.name = base.final_loss or base.loss.name
    return u


def grid_param_space(grid: GridSpace, space: SearchSpace, modality_set: str) -> dict[str, Any]:
    from ray import tune

    return {
        "lr": tune.grid_search(list(grid.lr)),
        "base_features": tune.grid_search(list(grid.base_features)),
        "batch_size": tune.grid_search(list(grid.batch_size)),
        "loss": space.loss[0],
        "beta_schedule": space.beta_schedule[0].model_dump(mode="json"),
        "modality_set": modality_set,
    }


def random_param_space(space: SearchSpace, modality_set: str) -> dict[str, Any]:
    from ray import tune

    def choice(values):
        return tune.choice(values) if len(values) > 1 else values[0]

    return {
        "lr": tune.loguniform(space.lr.low, space.lr.high) if space.lr.high > space.lr.low else space.lr.low,
        "base_features": choice(list(space.base_features)),
        "batch_size": choice(list(space.batch_size)),
        "loss": choice(list(space.loss)),
        "beta_schedule": choice([b.model_dump(mode="json") for b in space.beta_schedule]),
        "modality_set": modality_set,
    }


def _neighbours(values: list[float], best: float) -> tuple[float, float]:
    """The grid values on either side of `best` (itself at an edge of the grid)."""
    ordered = sorted(set(values))
    i = ordered.index(best)
    return ordered[max(i - 1, 0)], ordered[min(i + 1, len(ordered) - 1)]


def narrow_space(grid_results: pd.DataFrame, grid: GridSpace, space: SearchSpace) -> SearchSpace:
    """Random-search ranges from the grid step: around the best grid cell, bounded by its neighbours.

    Learning rate: log-uniform between the geometric midpoints of the best grid value and its neighbours
    (the best value ×/÷ the grid ratio at an edge). Base features and batch size: the choices of the
    configured space strictly between the best grid value's neighbours, open beyond an edge of the grid,
    and always the best value itself.

    Args:
        grid_results: one row per finished grid trial with columns lr, base_features, batch_size and
            BEST_SELECTION_METRIC.
    """
    ok = grid_results.dropna(subset=[BEST_SELECTION_METRIC])
    if ok.empty:
        return space
    best = ok.loc[ok[BEST_SELECTION_METRIC].idxmax()]
    lo, hi = _neighbours(list(grid.lr), float(best["lr"]))
    b = float(best["lr"])
    ratio = (hi / lo) ** 0.5 if hi > lo else 3.0
    low = math.sqrt(lo * b) if lo < b else b / ratio
    high = math.sqrt(hi * b) if hi > b else b * ratio

    def between(choices: list[int], grid_values: list[int], best_value: int) -> list[int]:
        lo_, hi_ = _neighbours(list(grid_values), best_value)
        above = lo_ < best_value  # at an edge of the grid, the range stays open beyond it
        below = hi_ > best_value
        kept = {c for c in choices if (not above or c > lo_) and (not below or c < hi_)}
        return sorted(kept | {best_value})

    return space.model_copy(
        update={
            "lr": space.lr.model_copy(update={"low": low, "high": high}),
            "base_features": between(
                list(space.base_features), list(grid.base_features), int(best["base_features"])
            ),
            "batch_size": between(list(space.batch_size), list(grid.batch_size), int(best["batch_size"])),
        }
    )
