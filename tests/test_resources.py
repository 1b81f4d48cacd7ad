"""Planning runs from the cluster's resources, the stall watch, and where a submitted job writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctvlab.config import StudyConfig, apply_smoke_test, load_config
from ctvlab.errors import ConfigError
from ctvlab.jobkit import job_path_problems, settle_job_paths
from ctvlab.resources import (
    Cluster,
    ResourceError,
    StallWatch,
    check_fits,
    training_demand,
    trial_demand,
    trials_at_once,
    unfit_reasons,
)
from ctvlab.tracking import artifact_location
from ctvlab.unet.search_progress import progress_line, trial_done_line, trial_state_line

REPO = Path(__file__).resolve().parents[1]


def node_cluster(*nodes: dict[str, float]) -> Cluster:
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    largest = {k: max(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    return Cluster(total, largest, "the Ray cluster")


def smoke_demo() -> StudyConfig:
    return apply_smoke_test(load_config(REPO / "jobs" / "configs" / "demo.yaml"))


@pytest.mark.parametrize(
    ("cpus_per_trial", "num_workers", "cluster_cpus", "configured", "expected"),
    [
        # one-worker trials train in their own process: they hold their CPUs and need no Ray Data budget
        (0.5, 1, 2, None, 4),
        (1.0, 1, 2, None, 2),  # the demo's search on 2 cores
        (1.0, 2, 8, None, 3),  # Ray Train trials: 0.25 + 2 × 1 held each, 0.5 for data: (8 - 0.5) // 2.25
        (1.0, 2, 4, None, 1),  # two would starve Ray Data (the silent hang): (4 - 0.5) // 2.25
        (1.0, 1, 8, 2, 2),  # a configured limit below what fits is kept
        (0.5, 1, 2, 8, 4),  # a configured limit above it is not
    ],
)
def test_trials_at_once_leave_the_data_budget_free(
    cpus_per_trial, num_workers, cluster_cpus, configured, expected
):
    cfg = StudyConfig()
    cfg.tune.cpus_per_trial = cpus_per_trial
    cfg.unet.train.num_workers = num_workers
    demand = trial_demand(cfg)
    cluster = node_cluster({"CPU": cluster_cpus})
    n = trials_at_once(demand, cluster, configured)
    assert n == expected
    assert n * demand.held()["CPU"] + demand.data_cpus <= cluster_cpus  # never the hang's arithmetic


def test_gpus_bound_the_trials_at_once():
    cfg = StudyConfig()
    cfg.tune.cpus_per_trial = 4
    cfg.tune.gpus_per_trial = 1
    cluster = Cluster({"CPU": 40, "GPU": 4}, None, "ray.max_resources")
    assert trials_at_once(trial_demand(cfg), cluster) == 4


def test_the_demo_smoke_study_fits_a_two_core_cluster():
    check_fits(trial_demand(smoke_demo()), node_cluster({"CPU": 2}))
    check_fits(training_demand(smoke_demo()), node_cluster({"CPU": 2}))


def test_a_trial_that_can_never_fit_names_need_have_and_keys():
    cfg = smoke_demo()
    cfg.unet.train.num_workers = 2  # a Ray Train trial: driver, workers and the Ray Data budget
    with pytest.raises(ResourceError) as e:
        check_fits(trial_demand(cfg), node_cluster({"CPU": 2}))
    msg = str(e.value)
    assert "one trial can never fit on this cluster" in msg
    assert "needs 2.75 CPU (2.25 CPU held by the run, plus 0.5 kept free for its Ray Data tasks)" in msg
    assert "the Ray cluster has 2 CPU" in msg
    assert "tune.cpus_per_trial, unet.train.num_workers, unet.train.data_cpus" in msg
    with pytest.raises(ResourceError) as e:  # a one-worker trial holds its own CPUs only
        check_fits(trial_demand(smoke_demo()), node_cluster({"CPU": 0.5}))
    assert "needs 1 CPU (1 CPU held by the run), but the Ray cluster has 0.5 CPU" in str(e.value)
    assert "Lower tune.cpus_per_trial in the config" in str(e.value)


@pytest.mark.parametrize(
    ("train", "nodes", "expected"),
    [
        ({"num_workers": 2, "cpus_per_worker": 1.0}, [{"CPU": 2}], ["2.5 CPU"]),
        ({"num_workers": 1, "use_gpu": True}, [{"CPU": 8}], ["1 GPU, but the Ray cluster has 0 GPU"]),
        # enough CPUs in total, but no node can hold one 4-CPU worker
        (
            {"num_workers": 2, "cpus_per_worker": 4.0},
            [{"CPU": 3}] * 4,
            ["each worker needs 4 CPU on one node"],
        ),
        ({"num_workers": 1, "cpus_per_worker": 1.0}, [{"CPU": 2}], []),
    ],
)
def test_training_fit(train, nodes, expected):
    cfg = StudyConfig()
    for k, v in train.items():
        setattr(cfg.unet.train, k, v)
    reasons = unfit_reasons(training_demand(cfg), node_cluster(*nodes))
    assert len(reasons) == len(expected)
    for reason, part in zip(reasons, expected, strict=True):
        assert part in reason


def test_stall_watch_fires_only_after_pending_demands_without_progress():
    said: list[str] = []
    watch = StallWatch("search s", 100, report_every_s=30, pending=list, say=said.append)
    pg = ["placement group 1× {1 CPU} (PACK)"]
    assert watch.observe(0, pg) is None
    assert watch.observe(50, []) is None  # nothing pending: the clock stops
    assert watch.observe(60, pg) is None
    watch.progress()  # an epoch reported: the clock restarts
    assert watch.observe(100, pg) is None
    assert watch.observe(140, pg) is None
    assert said and "waiting 40 s for placement group 1× {1 CPU} (PACK)" in said[0]
    msg = watch.observe(200, pg)
    assert msg is not None and "search s made no progress for 100 s" in msg
    assert "placement group 1× {1 CPU} (PACK)" in msg and "ray.stall_timeout_s" in msg
    assert watch.observe(210, []) == msg  # it fires once and stays fired


@pytest.mark.parametrize(
    ("workdir", "uri", "problems"),
    [
        ("/data/runs/demo", None, []),
        ("/data/runs/demo", "sqlite:////data/mlflow.db", []),
        ("/data/runs/demo", "http://10.0.0.10:5000", []),
        ("runs/demo", None, ["workdir 'runs/demo' is relative"]),
        ("/data/runs/demo", "sqlite:///mlflow.db", ["relative SQLite path"]),
    ],
)
def test_job_path_problems(workdir, uri, problems):
    found = job_path_problems(Path(workdir), uri)
    assert len(found) == len(problems)
    for text, part in zip(found, problems, strict=True):
        assert part in text


def test_a_job_without_a_store_tracks_into_its_workdir(tmp_path):
    cfg = StudyConfig(workdir=tmp_path / "study")
    settle_job_paths(cfg, env_tracking_uri=None)
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'study' / 'mlflow.db'}"
    with pytest.raises(ConfigError, match="temporary copy of its working directory"):
        settle_job_paths(StudyConfig(workdir=Path("runs/x")), env_tracking_uri=None)


def test_sqlite_artifacts_sit_next_to_the_database():
    assert (
        artifact_location("sqlite:////data/db/mlflow.db", "ctvlab demo")
        == "file:///data/db/mlruns/ctvlab_demo"
    )
    assert artifact_location("http://10.0.0.10:5000", "x") is None


def test_progress_line_says_what_each_trial_waits_for():
    states = [
        trial_state_line("a1", "RUNNING", 0, 2),
        trial_state_line("b2", "RUNNING", None, 2),
        trial_state_line("c3", "PENDING", None, 2),
    ]
    line = progress_line("search-x", states, ["placement group 1× {0.5 CPU} (PACK)"])
    assert line == (
        "search search-x: a1 epoch 1/2 · b2 starting: reading its data (a Ray Train trial also waits for its workers) · "
        "c3 waiting for a trial slot · pending on the cluster: placement group 1× {0.5 CPU} (PACK)"
    )


def test_a_stall_watch_survives_pickling_by_tune():
    import ray.cloudpickle

    watch = StallWatch("search s", 100, pending=list).start()
    try:
        copy = ray.cloudpickle.loads(ray.cloudpickle.dumps(watch))
    finally:
        watch.stop()
    assert copy.timeout_s == 100 and copy.observe(0, []) is None


def test_a_finished_trial_says_its_best_validation_score():
    line = trial_done_line("s1", "a1", {"best_val_tversky": 0.78312, "epoch": 3}, 2, 5)
    assert line == "search s1: trial a1 finished (2 of 5 so far) after 4 epochs: best val Tversky 0.7831"
    assert trial_done_line("s1", "a2", {}, 3, 5).endswith("(3 of 5 so far): no validation score")


def test_a_local_mlflow_store_is_refused_on_a_cluster_of_several_nodes():
    """Trials on another node cannot reach the head's SQLite file; one node, or a server, is fine."""
    from ctvlab.errors import ConfigError
    from ctvlab.runtime import is_local_store, refuse_local_store_on_cluster

    assert is_local_store("sqlite:////abs/mlflow.db") and is_local_store("file:///abs/mlruns")
    assert is_local_store("/abs/mlruns") and not is_local_store("http://10.0.0.5:5000")
    with pytest.raises(ConfigError, match=r"2 nodes .* tracking server"):
        refuse_local_store_on_cluster("sqlite:////abs/mlflow.db", alive_nodes=2)
    refuse_local_store_on_cluster("sqlite:////abs/mlflow.db", alive_nodes=1)
    refuse_local_store_on_cluster("https://mlflow.internal", alive_nodes=8)
