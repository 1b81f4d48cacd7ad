"""Planning a training run or a search from the cluster it runs on, and never waiting silently.

A U-Net training run holds Ray resources in up to three places: the trial's own driver (one Tune trial, a
small CPU share), its Ray Train worker group (a placement group of one bundle per worker), and the Ray Data
tasks that read and prepare the volumes feeding it. A search trial of one worker is simpler: it trains in
its own process (`ctvlab.unet.search`), which holds the trial's CPUs, with no worker group and no Ray Data. The first two are held for the whole run; the data
tasks come and go. When the held resources take every CPU of the cluster, the data tasks wait forever and
so does the run, without a word. So every plan keeps `unet.train.data_cpus` free for Ray Data, caps the
data tasks at that budget, and runs only as many trials at once as fit beside it.

The arithmetic is plain functions over resource dicts ({"CPU": 2.0, "GPU": 0.0}); Ray appears only in
`cluster_view` and `pending_demands`.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ctvlab.config import StudyConfig
from ctvlab.errors import CtvlabError

# A Tune trial's own process only builds the datasets and waits for its worker group; a quarter CPU keeps
# it schedulable next to the workers without holding a core.
TRIAL_DRIVER_CPUS = 0.25
# Each Ray Data read/prepare task: loading a prepared volume is I/O and a few NumPy operations.
DATA_TASK_CPUS = 0.25


class ResourceError(CtvlabError):
    """A run cannot fit on the cluster, or waited for resources that never came."""


@dataclass(frozen=True)
class Cluster:
    """What a run is planned against: the cluster's total resources and its largest node's."""

    total: dict[str, float]
    largest_node: dict[str, float] | None  # None: unknown (planned from `ray.max_resources`)
    source: str  # where the figures come from, for messages


@dataclass(frozen=True)
class RunDemand:
    """The resources one training run (or one search trial) needs at once."""

    what: str  # "one trial" / "the training run"
    driver: dict[str, float]  # held by the trial's own process (empty for `ctvlab train`)
    worker: dict[str, float]  # one Ray Train worker's bundle
    num_workers: int
    data_cpus: float  # kept free for the Ray Data tasks that feed it
    keys: tuple[str, ...] = field(default=())  # the config keys that set these figures

    def held(self) -> dict[str, float]:
        """Resources held for the whole run: the driver and every worker."""
        out = dict(self.driver)
        for k, v in self.worker.items():
            out[k] = out.get(k, 0.0) + v * self.num_workers
        return {k: v for k, v in out.items() if v > 0}


def training_demand(cfg: StudyConfig) -> RunDemand:
    """What `ctvlab train` needs: its worker group (the driver is the command's own process)."""
    t = cfg.unet.train
    worker = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    keys = ["unet.train.num_workers", "unet.train.cpus_per_worker", "unet.train.data_cpus"]
    if t.use_gpu:
        keys.append("unet.train.gpus_per_worker")
    return RunDemand("the training run", {}, worker, t.num_workers, t.data_cpus, tuple(keys))


def trial_demand(cfg: StudyConfig) -> RunDemand:
    """What one search trial needs. One worker: the trial's own process trains, holding `tune.cpus_per_trial`
    and `tune.gpus_per_trial`. Several: its driver and its worker group (see `unet.spaces.trial_unet_config`:
    each of the `unet.train.num_workers` workers takes `tune.cpus_per_trial` and `tune.gpus_per_trial`)."""
    tcfg = cfg.tune
    worker = {"CPU": tcfg.cpus_per_trial, **({"GPU": tcfg.gpus_per_trial} if tcfg.gpus_per_trial > 0 else {})}
    if cfg.unet.train.num_workers == 1:
        keys = (
            ("tune.cpus_per_trial", "tune.gpus_per_trial")
            if tcfg.gpus_per_trial > 0
            else ("tune.cpus_per_trial",)
        )
        return RunDemand("one trial", worker, {}, 0, 0.0, keys)
    keys = ["tune.cpus_per_trial", "unet.train.num_workers", "unet.train.data_cpus"]
    if tcfg.gpus_per_trial > 0:
        keys.append("tune.gpus_per_trial")
    return RunDemand(
        "one trial", {"CPU": TRIAL_DRIVER_CPUS}, worker, cfg.unet.train.num_workers, cfg.unet.train.data_cpus,
        tuple(keys),
    )  # fmt: skip


def format_resources(res: dict[str, float]) -> str:
    """{"CPU": 1.25, "GPU": 0} -> "1.25 CPU" (zero entries and Ray's internal resources left out)."""
    shown = [f"{v:g} {k}" for k, v in sorted(res.items()) if v > 0 and k in ("CPU", "GPU")]
    return ", ".join(shown) or "nothing"


def unfit_reasons(demand: RunDemand, cluster: Cluster) -> list[str]:
    """Why `demand` can never run on `cluster`, even an empty one; [] when it fits."""
    reasons = []
    held = demand.held()
    cpus = cluster.total.get("CPU", 0.0)
    need_cpus = held.get("CPU", 0.0) + demand.data_cpus
    if need_cpus > cpus + 1e-9:
        data = f", plus {demand.data_cpus:g} kept free for its Ray Data tasks" if demand.data_cpus else ""
        reasons.append(
            f"{need_cpus:g} CPU ({format_resources(held)} held by the run{data}), but {cluster.source} has "
            f"{cpus:g} CPU"
        )
    gpus = cluster.total.get("GPU", 0.0)
    if held.get("GPU", 0.0) > gpus + 1e-9:
        reasons.append(f"{held['GPU']:g} GPU, but {cluster.source} has {gpus:g} GPU")
    if cluster.largest_node is not None:
        for name, bundle in (("its driver", demand.driver), ("each worker", demand.worker)):
            for k, v in bundle.items():
                have = cluster.largest_node.get(k, 0.0)
                if v > have + 1e-9 and not (k == "GPU" and held.get("GPU", 0.0) > gpus + 1e-9):
                    reasons.append(f"{name} needs {v:g} {k} on one node, but the largest node has {have:g}")
    return reasons


def check_fits(demand: RunDemand, cluster: Cluster) -> None:
    """Fail at once, before any work starts, when `demand` can never be scheduled on `cluster`.

    Raises:
        ResourceError: what the run needs, what the cluster has, and the config keys to change.
    """
    reasons = unfit_reasons(demand, cluster)
    if reasons:
        raise ResourceError(
            f"{demand.what} can never fit on this cluster: it needs " + "; and ".join(reasons) + ". "
            f"Lower {', '.join(demand.keys)} in the config, or run on a larger cluster "
            "(for a cluster that adds nodes on demand, set ray.max_resources to its largest size)."
        )


def check_study_fits(cfg: StudyConfig, *, search: bool) -> None:
    """`check_fits` for the U-Net stage of a study on the running Ray cluster: one search trial
    (`search=True`) or one training run."""
    demand = trial_demand(cfg) if search else training_demand(cfg)
    check_fits(demand, cluster_view(cfg.ray.max_resources))


def trials_at_once(demand: RunDemand, cluster: Cluster, configured: int | None = None) -> int:
    """How many trials run at once: as many as fit beside the data budget, at most `configured`.

    Each running trial holds `demand.held()`; the data budget is shared (data tasks finish, held
    resources do not), so n trials fit when n × held + data_cpus ≤ the cluster's resources.
    """
    held = demand.held()
    limits = []
    for k, v in held.items():
        have = cluster.total.get(k, 0.0) - (demand.data_cpus if k == "CPU" else 0.0)
        limits.append(math.floor(have / v + 1e-9))
    fit = max(1, min(limits)) if limits else 1
    return min(fit, configured) if configured else fit


def cluster_view(max_resources: dict[str, float] | None = None) -> Cluster:
    """The running Ray cluster's resources (or `ray.max_resources` for a cluster that grows on demand)."""
    if max_resources:
        return Cluster(dict(max_resources), None, "ray.max_resources")
    import ray

    total = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    largest = {k: max((float(n.get(k, 0.0)) for n in nodes), default=0.0) for k in ("CPU", "GPU")}
    return Cluster(total, largest, "the Ray cluster")


def pending_demands() -> list[str]:
    """The cluster's resource demands that are waiting, as `ray status` lists them ([] if unknown)."""
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=10)
    except Exception:  # a status query must never break the run it watches
        return []
    out = []
    demands = status.resource_demands
    for d in demands.placement_group_demand:
        bundles = " + ".join(f"{b.count}× {{{format_resources(b.bundle)}}}" for b in d.bundles_by_count)
        out.append(f"placement group {bundles} ({d.strategy or 'PACK'})")
    for d in demands.ray_task_actor_demand:
        for b in d.bundles_by_count:
            out.append(f"{b.count} task(s)/actor(s) of {{{format_resources(b.bundle)}}}")
    return out


# --- never wait silently ---------------------------------------------------------------------------


class StallWatch:
    """Fails a run that makes no progress while resource demands stay pending.

    `observe(now, pending)` is the whole rule (testable without Ray or threads): the clock starts when a
    demand becomes pending with no progress since; `progress()` (a reported epoch, a finished trial) or
    an empty demand list resets it. After `timeout_s` the watch fires once, with a message naming the
    pending demands. `start()` runs `observe` every `poll_s` seconds in a thread and calls `on_stall`.
    """

    def __init__(
        self,
        what: str,
        timeout_s: float,
        *,
        poll_s: float = 10.0,
        report_every_s: float = 60.0,
        pending: Callable[[], list[str]] = pending_demands,
        on_stall: Callable[[str], None] | None = None,
        say: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.timeout_s, self.poll_s, self.report_every_s = what, timeout_s, poll_s, report_every_s
        self._pending_fn, self._on_stall, self._clock = pending, on_stall, clock
        self._say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self._since: float | None = None
        self._last_report = -math.inf
        self.message: str | None = None
        self.last_pending: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def progress(self) -> None:
        self._since = None

    def observe(self, now: float, pending: list[str]) -> str | None:
        """Update with the demands pending at `now`; returns the failure message once the run stalled."""
        self.last_pending = pending
        if self.message is not None:
            return self.message
        if not pending:
            self._since = None
            return None
        if self._since is None:
            self._since = now
        waited = now - self._since
        if waited >= self.timeout_s:
            self.message = (
                f"{self.what} made no progress for {waited:.0f} s while the cluster could not schedule: "
                f"{'; '.join(pending)} (`ray status` lists them as pending demands). The cluster is too "
                "small for what the run asks at once, or busy with other work: lower tune.max_concurrent_trials, "
                "tune.cpus_per_trial or the unet.train resources, or free the cluster; ray.stall_timeout_s "
                "sets how long to wait."
            )
            return self.message
        if waited >= self.report_every_s and now - self._last_report >= self.report_every_s:
            self._last_report = now
            self._say(f"{self.what}: waiting {waited:.0f} s for {'; '.join(pending)} "
                      f"(fails after {self.timeout_s:.0f} s without progress)")  # fmt: skip
        return None

    def start(self) -> StallWatch:
        def loop():
            while not self._stop.wait(self.poll_s):
                if self.observe(self._clock(), self._pending_fn()) is not None:
                    if self._on_stall:
                        self._on_stall(self.message)
                    return

        self._thread = threading.Thread(target=loop, name="ctvlab-stall-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5)

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks (one of them holds this watch) into the experiment's state file;
        # the thread and its event belong to this process only.
        return {k: v for k, v in self.__dict__.items() if k not in ("_stop", "_thread")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _stop=threading.Event(), _thread=None)

    def __enter__(self) -> StallWatch:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def interrupt_main(_message: str) -> None:
    """Stop the main thread's blocking Ray call as Ctrl+C would (Ray Train aborts its run gracefully)."""
    import _thread
    import signal

    _thread.interrupt_main(signal.SIGINT)
