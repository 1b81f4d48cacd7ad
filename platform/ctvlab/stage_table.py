"""The study's stages, each named once: the one place that says what a stage is called everywhere.

A stage's `name` is what a user types and reads: its `ctvlab` command, the MLflow run tag `ctvlab.stage`,
and the line `ctvlab run` prints. Where Python or a path needs an identifier the same name is written with
underscores (`ident`): its job script `jobs/<ident>.py`, its stamp `stamps/<ident>.json`, its results
folder `results/<ident>/` and, where it has one of its own, its config section. The voxel models are
`ctvlab voxel-models`, `jobs/voxel_models.py`, `stamps/voxel_models.json`, tag `voxel-models`,
`results/voxel_models/` and the config section `voxel_models`. `tests/test_stage_table.py` checks that the
commands, jobs, stamps, tags and folders a study really writes agree with this table.

`reads` declares once the settings that shape a stage's results (its stamp's digest), as config paths;
`owns` marks paths inside another stage's `reads` that belong to this stage alone, so that a search is not
run again when only the loss study's settings or the final model's epochs change. The rule: a stage reads
its `reads`, less every path another stage owns and it does not.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    # What it reads besides its settings: "dataset" (the prepared data's digest), "split" (the split's),
    # "search" (the search's best configuration), "model" (the evaluated model folder's files).
    inputs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    owns: tuple[str, ...] = ()
    stamped: bool = True  # writes stamps/<ident>.json and is skipped when current
    folder: bool = False  # writes results/<ident>/

    @property
    def ident(self) -> str:
        return self.name.replace("-", "_")

    @property
    def job(self) -> str:
        """Its job script for `ray job submit` (every stage is also a command)."""
        return f"jobs/{self.ident}.py"


# In the order `ctvlab run` runs them.
# fmt: off
STAGES: tuple[Stage, ...] = (
    Stage("synth", "the synthetic cohort (skipped when `cohort.source: raw` gives one)", reads=("synth",)),
    Stage("register", "follow-up scans registered to the pre-RT T1c, their progression masks carried over "
          "(only when the cohort declares follow-ups)", stamped=False),
    Stage("validate", "every patient's files checked before anything reads them", stamped=False),
    Stage("preprocess", "the prepared data: resampled, normalised, per-patient volumes and voxel tables",
          stamped=False),
    Stage("split", "patient-stratified train / validation / test split and CV folds", ("dataset",),
          reads=("split",)),
    Stage("voxel-models", "voxel-wise random forest / XGBoost with patient-grouped CV",
          ("dataset", "split"), reads=("voxel_models",), folder=True),
    Stage("stats", "per-patient medians per voxel category, Wilcoxon and Mann-Whitney tests",
          ("dataset", "split"), reads=("stats",), folder=True),
    Stage("tune", "the U-Net hyperparameter search on Ray Tune", ("dataset", "split"),
          reads=("unet", "tune")),
    Stage("train", "one U-Net training run on Ray Train (instead of a search)", ("dataset", "split"),
          reads=("unet",), owns=("unet.train.epochs", "unet.train.patience")),
    Stage("final", "the search's best configuration trained again with `unet.final_loss`",
          ("dataset", "split", "search"), reads=("unet",),
          owns=("unet.final_loss", "unet.train.epochs", "unet.train.patience")),
    Stage("loss-study", "the search's best configuration trained per loss and Tversky β",
          ("dataset", "split", "search"), reads=("unet", "tune.loss_study", "tune.epochs_per_trial"),
          owns=("tune.loss_study",), folder=True),
    Stage("ablation", "a random search per modality set", ("dataset", "split"), reads=("unet", "tune"),
          owns=("tune.ablation_sets", "tune.ablation_samples", "tune.ablation_loss"), folder=True),
    Stage("evaluate", "the model CTV against RTOG, EORTC and the same-volume margin on the test patients",
          ("dataset", "split", "model"), reads=("ctv",), folder=True),
    Stage("report", "the study's HTML report, written after every run", stamped=False),
)
# fmt: on

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAMPED: tuple[Stage, ...] = tuple(s for s in STAGES if s.stamped)


def stage(name: str) -> Stage:
    """The stage called `name` (as a command or with underscores).

    Raises:
        KeyError: no stage has that name.
    """
    return BY_NAME[name.replace("_", "-")]


def _pick(tree: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        tree = tree[part]
    return tree


def _drop(tree: dict[str, Any], path: str) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree.get(part, {})
    tree.pop(leaf, None)


def settings_of(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape stage `name`'s results, from the study config's JSON dump: each path it
    reads, less the paths other stages own and it does not."""
    s = stage(name)
    foreign = [p for o in STAGES if o is not s for p in o.owns if p not in s.owns]
    out: dict[str, Any] = {}
    for path in s.reads:
        head, _, rest = path.partition(".")
        value = copy.deepcopy(_pick(config, path))
        for p in foreign:
            if p.startswith(path + "."):
                _drop(value, p[len(path) + 1 :])
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[head] = value
    return out


def stamp_file(workdir: Path, name: str) -> Path:
    """Where stage `name` keeps its stamp in a study's working directory."""
    return Path(workdir) / "stamps" / f"{stage(name).ident}.json"


def read_stamp(workdir: Path, name: str) -> dict[str, Any] | None:
    """Stage `name`'s stamp in a study's working directory, or None when it has none."""
    import json

    path = stamp_file(workdir, name)
    return json.loads(path.read_text()) if path.exists() else None


def model_stage(cfg: Any) -> str:
    """The stage that trains a study's model (`cfg`: a `StudyConfig`): a search, or one training run."""
    return "tune" if cfg.pipeline.search else "train"
