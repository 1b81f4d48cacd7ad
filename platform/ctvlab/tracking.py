"""MLflow tracking: the only module of ctvlab that imports mlflow.

Runs are written through `MlflowClient` with explicit run ids (no global "active run"), so that the same
code works in a driver, a Ray Train rank-0 worker and a Tune trial, against the default local SQLite store
or any tracking server. Writes retry with backoff when SQLite reports "database is locked", which many
concurrent trials can provoke.

Privacy: MLflow never receives patient ids. Callers pass pseudonyms from `ctvlab.splits.pseudonymise`
(a keyed hash whose salt stays in the prepared dataset folder).

Through an outage of the tracking server, a `Tracker` with a spool keeps every write it cannot send in the
working directory (`ctvlab.spool`) and goes on; `sync_spool` sends it later through the same dispatcher
(`_apply`) that sends a write at once, so both paths write the same record. `ctvlab.outages` watches the
server, says so once, and ends a stage with what is unrecorded.

About 950 lines in one module on purpose: with `ctvlab.unet.pyfunc` (the trained model as an MLflow model
flavour), the only module that imports mlflow, so every MLflow call ctvlab makes (runs, artifacts, the
registry, authentication errors, the replay of what an outage kept) is here and nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ctvlab
from ctvlab.errors import CtvlabError, InfrastructureError

DEFAULT_DB = "mlflow.db"
TAG_DATASET = "ctvlab.dataset_digest"
TAG_SPLIT = "ctvlab.split_digest"
TAG_STAGE = "ctvlab.stage"
TAG_VERSION = "ctvlab.version"
TAG_COMMIT = "ctvlab.git_commit"
# The MLflow UI opens an experiment of this kind in its model-training view (runs, metrics, charts, models),
# not in the GenAI view (traces, sessions) that MLflow 3 infers for an experiment without the tag.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
NOTE = "mlflow.note.content"  # the run's description in the UI
# MLflow 3.17's UI keeps its GenAI/model-training toggle in the browser (localStorage, default GenAI) and
# reads this query parameter first: every link ctvlab prints or writes carries it.
UI_QUERY = "workflowType=machine_learning"
# A saved view of the runs table ("Views" menu; MLflow keeps one as an experiment tag
# `mlflow.sharedViewState.<id>` holding a JSON envelope {name, createdAt, state}, and opens it from the URL
# parameter `viewStateShareKey=<id>`): the runs by stage with their description and the CTV headline
# metrics as columns. The metrics are those `ctvlab evaluate` logs (`<ctv>_<metric>_mean`) and training
# logs (`best_val_pcc`); a run without one shows an empty cell.
REVIEW_VIEW_ID = "ctvlab-review"
REVIEW_VIEW_NAME = "CTV review"
REVIEW_METRICS = ("model_pcc_mean", "isovolume_pcc_mean", "rtog_pcc_mean", "eortc_pcc_mean",
                  "model_sensitivity_mean", "model_progression_coverage_mean", "model_volume_cm3_mean",
                  "best_val_pcc")  # fmt: skip
STAGE_DESCRIPTIONS = {
    "split": "Patient-stratified splits: U-Net train/val/test roles and the voxel models' 5 CV folds.",
    "voxel-models": "Voxel-wise progression model, 5-fold patient-grouped CV: ROC AUC, ROC curves, importances.",
    "stats": "Per-patient medians per voxel category; paired tests of progressed vs stable NAV voxels.",
    "train": "One 3D U-Net training run (Ray Train): training curves, checkpoints, the registered model.",
    "tune": "Hyperparameter search (Ray Tune): grid then random search; each trial is a child run.",
    "final": "The final model (Ray Train): the search's best configuration trained again with the final loss "
    "(the study: PCC) to convergence, with early stopping; the evaluated, registered model.",
    "tune-trial": "One trial of the hyperparameter search: its settings and validation curves.",
    "loss-study": "Loss study (Supp. Figs. 2 and 3): the best configuration trained per loss and per Tversky β, "
    "each scored on the test patients.",
    "report": "The study's report: every table and figure beside the paper's values, one HTML file "
    "(Artifacts → report.html).",
    "ablation": "Modality ablation (Fig. 2): one random search per input set.",
    "evaluate": "Model CTV vs the RTOG and EORTC CTVs on the test patients: metrics, tests, figures.",
}


def review_view(tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """The experiment tag of the saved view "CTV review" (`REVIEW_VIEW_ID`); `tags`: the experiment's tags
    now, whose copy of the view keeps its creation time."""
    import json

    key = f"mlflow.sharedViewState.{REVIEW_VIEW_ID}"
    columns = ["attributes.`Description`", *(f"metrics.`{m}`" for m in REVIEW_METRICS), "attributes.`Models`"]
    state = json.dumps({"selectedColumns": columns, "columnOrder": columns, "orderByKey": "attributes.start_time",
                        "orderByAsc": False})  # fmt: skip
    created = int(time.time() * 1000)
    with contextlib.suppress(ValueError, TypeError, KeyError):
        created = int(json.loads((tags or {})[key])["createdAt"])
    return {key: json.dumps({"name": REVIEW_VIEW_NAME, "createdAt": created, "state": state})}


def ui_url(tracking_uri: str, route: str, *query: str) -> str:
    """An address in the MLflow UI: `<server>/#/<route>?workflowType=machine_learning[&query...]` for a
    tracking server, the part from `#/` on for any other store (the UI that `ctvlab ui` serves)."""
    server = tracking_uri.startswith(("http://", "https://"))
    return f"{tracking_uri.rstrip('/') + '/' if server else ''}#/{route}?{'&'.join((UI_QUERY, *query))}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The explicit URI, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory.

    A relative SQLite path is made absolute so that Ray workers (other working directories) write to
    the same store as the driver.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        uri = f"sqlite:///{Path(rel).resolve()}"
    return uri


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: `mlruns/<experiment>` next to the
    database file. MLflow's own default is `./mlruns` in the current directory of whichever process
    creates the experiment, which for a submitted Ray job is a temporary folder that Ray deletes. None
    (the server decides) for any other store."""
    if not tracking_uri.startswith("sqlite:////"):
        return None
    db = Path(tracking_uri[len("sqlite:///") :])
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return (db.parent / "mlruns" / slug).as_uri()


def git_commit() -> str:
    """The commit of the checkout ctvlab runs from, with '-dirty' for local changes; 'unknown' outside git."""
    root = Path(ctvlab.__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("CTVLAB_GIT_COMMIT", "unknown")
    return sha + ("-dirty" if dirty else "")


_ABS_PATH = re.compile(r"(?<![\w.:/])(?:/[^\s'\"`:,;()\[\]{}<>]+)+")


def scrub_text(text: str, names: Mapping[str, str]) -> str:
    """`text` fit for the shared tracking store: each raw patient id replaced by its pseudonym (`names`:
    id → pseudonym) and each absolute path by its last component (a path names a hospital's folders)."""
    for pid in sorted(names, key=len, reverse=True):  # P10 before P1
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(pid)}(?![A-Za-z0-9])", names[pid], text)
    return _ABS_PATH.sub(lambda m: "<path>/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


class TrackingAuthError(CtvlabError):
    """The tracking server refused this client's credentials (or their absence)."""


class TrackingError(InfrastructureError):
    """The tracking store or registry could not be read or written (exit 4: fix it and run again)."""


def _http_status(error: Exception) -> int | None:
    """The HTTP status of a failed MLflow REST call, when the server answered at all."""
    status = getattr(error, "get_http_status_code", None)
    code = status() if callable(status) else None
    if code in (401, 403):
        return code
    # The REST client raises a plain MlflowException for some refusals; its text carries the status.
    text = str(error)
    for candidate in (401, 403):
        if f"{candidate}" in text and ("Unauthorized" in text or "credentials" in text.lower()
                                       or "Permission" in text or "UNAUTHENTICATED" in text):  # fmt: skip
            return candidate
    return code


def _retry_locked(fn):
    """Retry an MLflow write while SQLite reports the database locked (concurrent writers)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        delay = 0.05
        deadline = time.monotonic() + 120
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                locked = "database is locked" in str(e) or "database table is locked" in str(e)
                if not locked or time.monotonic() > deadline:
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)

    return wrapper


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"unet": {"optim": {"lr": 1}}} -> {"unet.optim.lr": 1} (lists become strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """An MLflow experiment and the runs ctvlab writes into it.

    With a `spool` folder, every write that the store cannot take now (it does not answer) is kept there
    and the caller goes on (`Spool`, `sync_spool`); without one, a failed write raises as MLflow's does.
    """

    def __init__(
        self,
        experiment: str,
        tracking_uri: str | None = None,
        *,
        spool: str | Path | None = None,
        experiment_id: str | None = None,
    ):
        import mlflow
        from mlflow.tracking import MlflowClient

        from ctvlab.spool import Spool

        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.experiment_name = experiment
        self._mlflow = mlflow
        self.spool = Spool(spool) if spool is not None else None
        self._away_since: float | None = None  # this process's last failed attempt, while the store is away
        self._names: dict[str, str] = {}  # run id -> run name, for what the spool says it holds
        if experiment_id is not None:  # known to the caller (a search's trials): nothing to look up
            self.experiment_id = experiment_id
            return
        try:
            with _quick_requests() if self.spool else contextlib.nullcontext():
                self.experiment_id = self._experiment_id(experiment)
        except Exception as e:
            if _http_status(e) in (401, 403):
                raise TrackingAuthError(
                    f"the tracking server {self.tracking_uri} refused this client ({_http_status(e)}): set "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment (never on the "
                    "command line) for a user with access to this experiment"
                ) from None
            if self.spool is None or not _unreachable(e):
                raise
            from ctvlab.spool import placeholder

            self.experiment_id = placeholder()
            self._keep("create_experiment", {"pending": self.experiment_id, "name": experiment}, error=e)

    @_retry_locked
    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            for key, value in {**EXPERIMENT_KIND, **review_view(exp.tags)}.items():
                if exp.tags.get(key) != value:
                    self.client.set_experiment_tag(exp.experiment_id, key, value)
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                name, artifact_location=artifact_location(self.tracking_uri, name),
                tags={**EXPERIMENT_KIND, **review_view()},
            )  # fmt: skip
        except Exception:  # created concurrently by another process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # --- writes: now, or kept in the spool --------------------------------------------------------

    def _send(self, op: str, fields: dict[str, Any], local: Path | None = None) -> Any:
        """Do one write now; while the store does not answer, keep it in the spool and return None."""
        if self.spool is None:
            return _retry_locked(_apply)(self, op, fields, local)
        rest = {k: v for k, v in fields.items() if k != "pending"}  # "pending": the id this write creates
        fields = {**fields, **self.spool.resolve(rest)}
        if self.spool.unresolved(self.spool.resolve(rest)):  # refers to a run not sent yet (an outage's)
            self._keep(op, fields, local)
            return None
        if self.spool.has_pending(self.tracking_uri):
            # Behind the writes kept before it, in any process: sent after them, in order, by the driver
            # (`ctvlab.outages`), so that a run's own end never lands after what completes it.
            self._keep(op, fields, local)
            return None
        if self._away_since is not None and time.monotonic() - self._away_since < RETRY_EVERY_S:
            self._keep(op, fields, local)  # tried moments ago: one quick attempt per few seconds, no more
            return None
        try:
            with _quick_requests():
                result = _retry_locked(_apply)(self, op, fields, local)
        except Exception as e:
            if not _unreachable(e):
                raise
            self._away_since = time.monotonic()
            self._keep(op, fields, local, error=e)
            return None
        self._away_since = None
        return result

    def _keep(self, op: str, fields: dict[str, Any], local: Path | None = None, error=None) -> None:
        """Append one write to the spool; `error`: the store did not answer it (else it waits its turn)."""
        from ctvlab.spool import NOTICE

        run = fields.get("pending") if op == "create_run" else fields.get("run_id")
        named = {"label": self._names[run]} if run in self._names and op != "create_run" else {}
        self.spool.append(op, self.tracking_uri, {**fields, **named}, local)
        if error is not None:
            NOTICE.down(self.tracking_uri, self.spool.root, error)

    def drain(self) -> None:
        """Send what the spool holds now, if the store answers (the driver, before a write whose answer it
        needs: a model's registered version). Never raises for a store that is still away."""
        if self.spool is not None and self.spool.has_pending():
            with contextlib.suppress(TrackingError):
                sync_spool(self.spool.root)

    def reachable(self) -> bool:
        """True when the store answers now (a tracking server's /health; any other store is local)."""
        from ctvlab.spool import answers

        return answers(self.tracking_uri)

    # --- runs -----------------------------------------------------------------------------------

    def start_run(
        self, name: str, tags: Mapping[str, Any] | None = None, parent_run_id: str | None = None
    ) -> str:
        """Create a run; its id, or a placeholder id while the store is away (`ctvlab.spool`)."""
        all_tags = {TAG_VERSION: ctvlab.__version__, TAG_COMMIT: git_commit(), **(tags or {})}
        stage = all_tags.get(TAG_STAGE)
        if stage in STAGE_DESCRIPTIONS:
            all_tags.setdefault(NOTE, STAGE_DESCRIPTIONS[str(stage)])
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        fields = {"experiment_id": self.experiment_id, "run_name": name, "start_time": int(time.time() * 1000),
                  "tags": {k: str(v) for k, v in all_tags.items()}}  # fmt: skip
        if self.spool is not None:
            from ctvlab.spool import placeholder

            fields["pending"] = placeholder()
            self._names[fields["pending"]] = name
        run_id = self._send("create_run", fields)
        if run_id is None:
            return fields["pending"]
        self._names[run_id] = name
        return run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._send(
            "set_terminated", {"run_id": run_id, "status": status, "end_time": int(time.time() * 1000)}
        )

    @contextlib.contextmanager
    def run(
        self, name: str, tags: Mapping[str, Any] | None = None, parent_run_id: str | None = None
    ) -> Iterator[RunLogger]:
        """A run that ends FINISHED, or FAILED (KILLED on Ctrl-C) when the block raises."""
        run_id = self.start_run(name, tags, parent_run_id)
        with self.failing(run_id):
            yield RunLogger(self, run_id)
        self.end_run(run_id, "FINISHED")

    @contextlib.contextmanager
    def failing(self, run_id: str) -> Iterator[None]:
        """Mark `run_id` FAILED (KILLED on Ctrl-C) if the block raises, then let the error go on: a store
        that cannot take the status is reported, never put in the place of the error that ended the run.

        A clean `SystemExit` (code 0 or None) is not a failure: it is how Ray Tune stops a trial that its
        scheduler ends, from inside the trial's report call; the run is left for the caller to close."""
        try:
            yield
        except SystemExit as stop:
            if stop.code not in (0, None):
                self.end_failed(run_id, "FAILED")
            raise
        except BaseException as error:
            self.end_failed(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise

    def end_failed(self, run_id: str, status: str = "FAILED") -> None:
        """End a run whose work raised. Called while that error propagates, so a store that cannot take
        the status is reported on stderr instead of replacing the error."""
        try:
            self.end_run(run_id, status)
        except Exception as e:  # the original error matters more; say what could not be recorded
            import sys

            print(f"warning: could not mark MLflow run {run_id} {status} in {self.tracking_uri}: {e}",
                  file=sys.stderr)  # fmt: skip

    def reopen_run(self, run_id: str) -> None:
        """Mark a run RUNNING again (a resumed search continues its parent run)."""
        self._send("update_run", {"run_id": run_id, "status": "RUNNING"})

    def logger(self, run_id: str) -> RunLogger:
        return RunLogger(self, run_id)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every point of one metric of a run, in the order stored."""
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def find_runs(self, filter_string: str = "", max_results: int = 1000) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id], filter_string=filter_string, max_results=max_results,
            order_by=["attributes.start_time DESC"],
        )  # fmt: skip

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI: a full address for a tracking server, else the part after the
        address `mlflow ui` serves on."""
        return ui_url(self.tracking_uri, f"experiments/{self.experiment_id}/runs/{run_id}")

    def review_url(self) -> str:
        """The experiment's runs table in the MLflow UI, in the model-training view, opened on the saved
        view "CTV review" (the runs by stage, their descriptions and the CTV metrics as columns)."""
        return ui_url(self.tracking_uri, f"experiments/{self.experiment_id}/runs",
                      f"viewStateShareKey={REVIEW_VIEW_ID}")  # fmt: skip

    # --- model registry -------------------------------------------------------------------------

    def register(
        self,
        name: str,
        run_id: str,
        artifact_path: str,
        tags: Mapping[str, Any] | None = None,
        alias: str | None = None,
        description: str | None = None,
    ):
        """Register `runs:/<run_id>/<artifact_path>` as a new version of model `name`, point `alias` at it,
        set its description, and tag the run with the version's URI (`ctvlab.registered_model`).

        Returns:
            The new version, or None while the store is away (the registration is kept for later).
        """
        fields = {"name": name, "run_id": run_id, "artifact_path": artifact_path,
                  "tags": {k: str(v) for k, v in (tags or {}).items()}, "alias": alias, "description": description}  # fmt: skip
        return self._send("register", fields)

    def register_model(
        self, name: str, run_id: str, artifact_path: str, tags: Mapping[str, Any] | None = None
    ):
        """Register `runs:/<run_id>/<artifact_path>` as a new version of model `name`; return the version."""
        return self.register(name, run_id, artifact_path, tags)

    def set_alias(self, name: str, alias: str, version: str | int) -> None:
        """Point registry alias `alias` (e.g. champion, candidate) of model `name` at `version`."""
        self._send("set_alias", {"name": name, "alias": alias, "version": str(version)})

    def describe_version(self, name: str, version: str | int, description: str) -> None:
        """Set a registered version's description (its model card, Markdown)."""
        self._send("describe_version", {"name": name, "version": str(version), "description": description})

    def tag_version(self, name: str, version: str | int, tags: Mapping[str, Any]) -> None:
        """Set tags on a registered version (shown on its page in the UI)."""
        self._send(
            "tag_version",
            {"name": name, "version": str(version), "tags": {k: str(v) for k, v in tags.items()}},
        )

    def finish_if_running(
        self,
        filter_string: str,
        tags: Mapping[str, str],
        model_dir: Path | None = None,
        history: list[Mapping[str, Any]] | None = None,
        summary: Mapping[str, float] | None = None,
    ) -> None:
        """Complete and close the runs matching `filter_string` that are still RUNNING (a search's trials that
        the scheduler ended from outside): the epochs of `history` they miss, the `summary` values they do
        not hold, `tags`, the model, FINISHED. Kept for later, as one write, while the store is away."""
        fields = {"experiment_id": self.experiment_id, "filter": filter_string, "tags": dict(tags),
                  "history": [dict(h) for h in history or []], "summary": dict(summary or {})}  # fmt: skip
        self._send("finish_if_running", fields, model_dir)

    def download_model(self, model_uri: str, dst: str | Path) -> Path:
        """Download a model's artifacts (`models:/name/version|latest`, `runs:/id/path`, or a local folder).

        Registry URIs are resolved through this tracker's own client, so the model comes from the same
        store as the runs (not from whatever registry the environment would default to).
        """
        if Path(model_uri).exists():
            return Path(model_uri)
        if model_uri.startswith("models:/"):
            model_uri = self.model_version(model_uri).source
        if not model_uri.startswith("runs:/"):
            raise ValueError(f"unsupported model URI {model_uri!r}: use models:/, runs:/ or a folder")
        run_id, _, path = model_uri[len("runs:/") :].partition("/")
        return Path(self.client.download_artifacts(run_id, path, str(dst)))

    def search_versions(self, name: str) -> list[Any]:
        """Every registered version of model `name` (none when the model is not registered yet).

        Raises:
            TrackingError: the registry cannot be read (an unreachable server is an error, not "no model").
        """
        from mlflow.exceptions import MlflowException

        try:
            return list(self.client.search_model_versions(f"name='{name}'"))
        except MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in str(e).lower():
                return []
            raise TrackingError(
                f"cannot read the model registry of {self.tracking_uri}: {e.message}"
            ) from None

    def model_version(self, model_uri: str):
        """The registered version behind `models:/name/version`, `models:/name/latest` or `models:/name@alias`.

        Raises:
            ValueError: no such model, version or alias.
        """
        from mlflow.exceptions import MlflowException

        rest = model_uri[len("models:/") :]
        try:
            if "@" in rest:
                name, _, alias = rest.partition("@")
                return self.client.get_model_version_by_alias(name, alias)
            name, _, version = rest.partition("/")
            if version in ("", "latest"):
                versions = self.client.search_model_versions(f"name='{name}'")
                if not versions:
                    raise ValueError(f"no version of model {name!r} is registered")
                version = str(max(int(v.version) for v in versions))
            return self.client.get_model_version(name, version)
        except MlflowException as e:
            raise ValueError(f"{model_uri}: {e.message}") from None

    def model_version_run(self, model_uri: str) -> str | None:
        """The run id that produced a registered model version (`models:/name/version|latest`)."""
        if not model_uri.startswith("models:/"):
            return model_uri.split("/")[1] if model_uri.startswith("runs:/") else None
        name, _, version = model_uri[len("models:/") :].partition("/")
        if version in ("", "latest"):
            versions = self.client.search_model_versions(f"name='{name}'")
            if not versions:
                return None
            return max(versions, key=lambda v: int(v.version)).run_id
        return self.client.get_model_version(name, version).run_id


class RunLogger:
    """Logging into one run. Values are flattened and batched; NaN metrics are skipped (MLflow rejects none,
    but NaN breaks the UI's charts), and booleans are logged as 0/1."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker = tracker
        self.run_id = run_id
        self.client = tracker.client

    def params(self, params: Mapping[str, Any]) -> None:
        flat = flatten(params)
        items = [[k, str(v)[:6000]] for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):
            self.tracker._send("log_batch", {"run_id": self.run_id, "params": items[i : i + 100]})

    def metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> int:
        """Log the finite numeric values (the number logged), stamped with the time they were measured."""
        items = [[m.key, m.value, m.timestamp, m.step] for m in _metric_entities(metrics, step)]
        for i in range(0, len(items), 500):
            self.tracker._send("log_batch", {"run_id": self.run_id, "metrics": items[i : i + 500]})
        return len(items)

    def tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker._send(
            "log_batch", {"run_id": self.run_id, "tags": [[k, str(v)] for k, v in tags.items()]}
        )

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.tracker._send(
            "log_artifacts", {"run_id": self.run_id, "artifact_path": artifact_path}, Path(path)
        )

    def table(self, df, name: str, artifact_path: str = "tables") -> None:
        """A DataFrame as CSV (readable in the UI's artifact viewer)."""
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            df.to_csv(p, index=False)
            self.artifact(p, artifact_path)

    def json(self, obj: Any, name: str, artifact_path: str | None = None) -> None:
        import json

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            self.artifact(p, artifact_path)

    def dataset(
        self, name: str, digest: str, source: str, context: str = "training", schema_note: str = ""
    ) -> None:
        """Record a dataset input (`mlflow.log_input` equivalent) by name and digest, no data.

        `source` (where the data lives) stays on this machine: only a logical source, the dataset's name
        and digest, reaches the store. An absolute path names a hospital's folders, and a cohort folder
        is often named after its patients.
        """
        del source  # kept in the signature so that callers say what they read; never logged
        self.tracker._send(
            "log_inputs", {"run_id": self.run_id, "name": name, "digest": digest[:36], "context": context}
        )


def _apply(
    tracker: Tracker, op: str, f: dict[str, Any], local: Path | None = None, replay: bool = False
) -> Any:
    """Send one write (`op` with its fields, every id real) to the store: what `Tracker._send` does now and
    what `sync_spool` does later with the same record (`replay`: a metric point the run already holds as
    its latest, same key, step and value, is not sent twice: the driver may have completed a trial's run
    from its history before the trial's own late writes arrive)."""
    from mlflow.entities import Metric, Param, RunTag

    c = tracker.client
    if replay and op == "log_batch" and f.get("metrics"):
        # RunData keeps the latest points as Metric objects (key, value, timestamp, step) beside its
        # key → value dict; without them nothing is skipped (a value alone cannot tell one step from another).
        held = getattr(c.get_run(f["run_id"]).data, "_metric_objs", None) or []
        latest = {m.key: (m.step, m.value) for m in held}
        f = {**f, "metrics": [m for m in f["metrics"] if not _held(latest.get(m[0]), m)]}
    if op == "create_experiment":
        return tracker._experiment_id(f["name"])
    if op == "create_run":
        return c.create_run(f["experiment_id"], start_time=f.get("start_time"), tags=f["tags"],
                            run_name=f["run_name"]).info.run_id  # fmt: skip
    if op == "log_batch":
        c.log_batch(f["run_id"], metrics=[Metric(*m) for m in f.get("metrics", [])],
                    params=[Param(*p) for p in f.get("params", [])], tags=[RunTag(*t) for t in f.get("tags", [])])  # fmt: skip
    elif op == "set_terminated":
        c.set_terminated(f["run_id"], status=f["status"], end_time=f.get("end_time"))
    elif op == "update_run":
        c.update_run(f["run_id"], status=f["status"])
    elif op == "log_artifacts":
        if Path(local).is_dir():
            c.log_artifacts(f["run_id"], str(local), f.get("artifact_path"))
        else:
            c.log_artifact(f["run_id"], str(local), f.get("artifact_path"))
    elif op == "log_inputs":
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        src = CodeDatasetSource(tags={"ctvlab.dataset": f["name"], "ctvlab.digest": f["digest"]})
        entity = MetaDataset(source=src, name=f["name"], digest=f["digest"])._to_mlflow_entity()
        tags = [InputTag(key="mlflow.data.context", value=f["context"])]
        c.log_inputs(f["run_id"], datasets=[DatasetInput(dataset=entity, tags=tags)])
    elif op == "complete_curve":
        return _complete_curve(tracker, f["run_id"], f["history"], tuple(f.get("skip", ("epoch",))))
    elif op == "register":
        return _register(tracker, f)
    elif op == "set_alias":
        c.set_registered_model_alias(f["name"], f["alias"], f["version"])
    elif op == "describe_version":
        c.update_model_version(f["name"], f["version"], description=f["description"])
    elif op == "tag_version":
        for key, value in f["tags"].items():
            c.set_model_version_tag(f["name"], f["version"], key, value)
    elif op == "finish_if_running":
        for run in c.search_runs([f["experiment_id"]], filter_string=f["filter"]):
            if run.info.status != "RUNNING":
                continue  # the trial ended its run itself: it is complete
            rid = run.info.run_id
            if f.get("history"):
                _complete_curve(tracker, rid, f["history"], ("epoch",))
            missing = [Metric(k, float(v), int(time.time() * 1000), 0) for k, v in (f.get("summary") or {}).items()
                       if k not in run.data.metrics and math.isfinite(float(v))]  # fmt: skip
            c.log_batch(rid, metrics=missing, tags=[RunTag(k, v) for k, v in f["tags"].items()])
            if local is not None:  # again whole: the trial may have been cut off halfway through it
                c.log_artifacts(rid, str(local), "model")
            c.set_terminated(rid, status="FINISHED")
    else:
        raise ValueError(f"unknown tracking write {op!r}")
    return None


def _held(latest: tuple[int, float] | None, metric: list) -> bool:
    """Whether a kept metric point [key, value, timestamp, step] is the run's latest point of its key."""
    if latest is None:
        return False
    step, value = latest
    same_value = value == metric[1] or (math.isnan(value) and math.isnan(float(metric[1])))
    return same_value and step == metric[3]


def _register(tracker: Tracker, f: dict[str, Any]):
    from mlflow.exceptions import MlflowException

    c = tracker.client
    try:
        c.create_registered_model(f["name"])
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    source = f"runs:/{f['run_id']}/{f['artifact_path']}"
    version = c.create_model_version(f["name"], source=source, run_id=f["run_id"], tags=f.get("tags") or {})
    if f.get("alias"):
        c.set_registered_model_alias(f["name"], f["alias"], str(version.version))
    if f.get("description"):
        c.update_model_version(f["name"], str(version.version), description=f["description"])
    from mlflow.entities import RunTag

    c.log_batch(
        f["run_id"], tags=[RunTag("ctvlab.registered_model", f"models:/{f['name']}/{version.version}")]
    )
    return version


# While the tracking server is down, a training loop must not wait out MLflow's default retries (7, with
# exponential backoff: minutes per call) at every epoch: one quick attempt, then the values wait locally.
QUICK_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def _quick_requests() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in QUICK_RETRIES}
    os.environ.update(QUICK_RETRIES)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _unreachable(error: BaseException) -> bool:
    """True for a tracking store that did not answer (connection refused, timeout, 5xx, locked SQLite),
    False for a refusal that retrying would not change (a bad request, no such run)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, MlflowException):
        code = getattr(error, "get_http_status_code", lambda: None)()
        text = str(error)
        return (code is not None and code >= 500) or any(
            s in text
            for s in ("Max retries exceeded", "Connection refused", "timed out", "database is locked")
        )
    return False


class BufferedMetrics:
    """The per-epoch metrics of one run, kept locally while the tracking server cannot be reached.

    Each batch carries the timestamp of the moment it was measured, so sending it again after a lost
    answer writes the same values (MLflow stores a metric point once per key, step, timestamp and
    value): replaying is idempotent. Used by a training loop: no experiment lookup at start, one quick
    attempt per epoch, the backlog sent first when the server answers again. A run created during an
    outage (a placeholder id) is written once the spool has sent it. What is still unsent when training
    ends is completed from the checkpoint's history (`complete_curve`).

    Args:
        say: where to say that the server stopped answering, and answers again; None (a training
            worker, a search trial) leaves that to the driver's `recording`.
        spool: the study's spool folder, where a placeholder run id finds its real id.
    """

    def __init__(self, tracking_uri: str, run_id: str, say=None, spool: str | Path | None = None):
        from mlflow.tracking import MlflowClient

        from ctvlab.spool import Spool

        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id = run_id
        self.spool = Spool(spool) if spool is not None else None
        self.pending: list[Any] = []
        self.replayed = 0  # values sent after an outage, over the run
        self.backlog = 0  # values held when the last attempt failed
        self.outage_since: float | None = None
        self.say = say or (lambda _message: None)

    def metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.pending.extend(_metric_entities(metrics, step))
        self.flush()

    def flush(self) -> bool:
        """Send the backlog; False while the server stays unreachable (the values are kept)."""
        from ctvlab.spool import NOTICE, PLACEHOLDER

        run_id = self.spool.resolve(self.run_id) if self.spool is not None else self.run_id
        if PLACEHOLDER.fullmatch(run_id):
            return False  # the run itself waits in the spool
        while self.pending:
            batch = self.pending[:500]
            try:
                with _quick_requests():
                    self.client.log_batch(run_id, metrics=batch)
            except Exception as e:
                if not _unreachable(e):
                    raise
                self.backlog = len(self.pending)
                if self.outage_since is None:
                    self.outage_since = time.monotonic()
                    self.say(f"tracking server {self.tracking_uri} unreachable since {time.strftime('%H:%M:%S')} "
                             f"({type(e).__name__}); training goes on, metrics are kept here and sent when it "
                             "answers again")  # fmt: skip
                    NOTICE.down(self.tracking_uri, self.spool.root if self.spool else None, e)
                return False
            del self.pending[: len(batch)]
        if self.outage_since is not None:
            self.replayed += self.backlog
            self.say(f"tracking server answers again: replayed {self.backlog} buffered metric value(s)")
            self.outage_since, self.backlog = None, 0
        return True


def _metric_entities(metrics: Mapping[str, Any], step: int | None) -> list[Any]:
    """MLflow Metric entities of the finite numeric values (booleans as 0/1), stamped now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = []
    for k, v in sorted(flatten(metrics).items()):
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            items.append(Metric(k, float(v), now, step or 0))
    return items


def complete_curve(
    log: RunLogger, history: list[Mapping[str, Any]], skip: tuple[str, ...] = ("epoch",)
) -> int:
    """Log every (metric, epoch) of a training history that the run does not hold yet; the number logged.

    The history comes from the run's checkpoint, which training writes whatever the tracking server's
    state: values lost to an outage that outlived the training loop are sent here. While the store is
    away the history is kept whole, and the curve is completed against what the store holds when the
    spool is sent (so no point is logged twice): 0 is returned then.
    """
    rows = [{k: v for k, v in row.items()} for row in history]
    return (
        log.tracker._send("complete_curve", {"run_id": log.run_id, "history": rows, "skip": list(skip)}) or 0
    )


def _complete_curve(
    tracker: Tracker, run_id: str, history: list[Mapping[str, Any]], skip: tuple[str, ...]
) -> int:
    from mlflow.entities import Metric

    keys = sorted({k for row in history for k in row if k not in skip})
    have = {k: {m.step for m in tracker.client.get_metric_history(run_id, k)} for k in keys}
    now = int(time.time() * 1000)
    items = []
    for row in history:
        epoch = int(row["epoch"])
        for k in keys:
            v = row.get(k)
            if epoch in have[k] or isinstance(v, str) or v is None:
                continue
            if isinstance(v, bool):
                v = int(v)
            if math.isfinite(float(v)):
                items.append(Metric(k, float(v), now, epoch))
    for i in range(0, len(items), 500):
        tracker.client.log_batch(run_id, metrics=items[i : i + 500])
    return len(items)


# Runs that belong to a stage's run without being one (a search's trials) carry their own tag.
CHILD_RUN_TAGS = ("tune-trial",)


def base_tags(
    stage: str, dataset_digest: str | None = None, split_digest: str | None = None
) -> dict[str, str]:
    """The tags every run of `stage` carries; `stage` is its name in `ctvlab.stage_table`.

    Raises:
        ValueError: `stage` is not a stage's name (a run that would be tagged under a name of its own).
    """
    from ctvlab.stage_table import BY_NAME

    if stage not in BY_NAME and stage not in CHILD_RUN_TAGS:
        raise ValueError(f"{stage!r} is not a stage of ctvlab.stage_table")
    tags = {TAG_STAGE: stage}
    if dataset_digest:
        tags[TAG_DATASET] = dataset_digest
    if split_digest:
        tags[TAG_SPLIT] = split_digest
    return tags


def spool_dir(cfg) -> Path:
    """Where a study keeps what its tracking store could not take: `<workdir>/tracking-spool`."""
    from ctvlab.spool import SPOOL_DIR

    return Path(cfg.workdir).resolve() / SPOOL_DIR


def tracker_for(cfg) -> Tracker:
    """The tracker of a study config: its experiment (`tracking.experiment`, else the study's name) in its
    store (`tracking.tracking_uri`, else `MLFLOW_TRACKING_URI`, else ./mlflow.db), with the study's spool."""
    return Tracker(cfg.tracking.experiment or cfg.name, cfg.tracking.tracking_uri, spool=spool_dir(cfg))


# --- sending what an outage kept ---------------------------------------------------------------------------

RETRY_EVERY_S = 5.0  # while the store is away, a process tries it again at most this often


class TrackingUnreachable(TrackingError):
    """The tracking store did not answer while the spool was being sent (what is left stays there)."""


def sync_spool(root: str | Path, tracking_uri: str | None = None, wait: bool = True) -> int:
    """Send what the spool at `root` holds, oldest first; the number of writes sent.

    Args:
        tracking_uri: send to this store instead of the one each write was meant for (a server that moved).
        wait: wait for another process's replay of the same spool to end (else return 0 at once).

    Raises:
        TrackingUnreachable: the store stopped answering; what is left stays for the next try.
    """
    import sys

    from ctvlab.spool import Spool

    spool = Spool(root)
    if not spool.journals():
        return 0
    sent = 0
    trackers: dict[str, Tracker] = {}
    with spool.replaying(wait) as mine:
        if not mine:
            return 0
        for journal, line, record in spool.pending():
            uri = tracking_uri or record["uri"]
            if uri not in trackers:
                trackers[uri] = Tracker("", uri, experiment_id="")
            op = record["op"]
            fields = spool.resolve(
                {k: v for k, v in record.items() if k not in ("op", "uri", "t", "local", "label", "pending")}
            )
            local = spool.local(record) if "local" in record else None
            try:
                if spool.unresolved(fields):  # its run could not be created: nothing to attach it to
                    raise ValueError(f"it refers to a run that was never created ({fields})")
                with _quick_requests():
                    result = _retry_locked(_apply)(trackers[uri], op, fields, local, replay=True)
            except Exception as e:
                if _unreachable(e):
                    raise TrackingUnreachable(
                        f"the tracking server {uri} does not answer; {spool.summary()} still wait in {root}"
                    ) from None
                # A write the store refuses for good (its run was deleted meanwhile): say so, go on.
                print(f"warning: MLflow refused a kept {op} of run {record.get('label') or fields.get('run_id')}: "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)  # fmt: skip
                result = None
            if op in ("create_run", "create_experiment") and result is not None:
                spool.record_id(record["pending"], result)
            spool.mark_sent(journal, line)
            sent += 1
        spool.tidy()
    return sent
