"""Faults a team meets, on the smoke study: what ctvlab says, what MLflow records, what the files hold.

    python benchmarks/faults.py --out /tmp/ctvlab-faults [--only tracking-search ...] [--record]
    python benchmarks/faults.py --searches 10 --out /tmp/ctvlab-searches [--record]

Faults (each in its own working directory, each run with its own `mlflow server` on 127.0.0.1):
- tracking-search, tracking-final: the tracking server killed (SIGKILL) 5 s into the search (the final
  model) and started again 30 s later on the same port and store;
- tracking-never: killed 5 s into the search and not started again until the run has ended; then started,
  `ctvlab sync` sends what was kept, and `ctvlab run` finishes the study;
- disk-full: the prepared dataset's folder on a size-limited filesystem (a tmpfs smaller than the dataset,
  mounted here as root) that fills during preprocessing; then resized and the study run again;
- read-only-results: `ctvlab evaluate` and `ctvlab report` on a finished study whose results folder is a
  read-only bind mount; then the mount removed and `evaluate` run again;
- killed-worker: the final model's Ray Train worker killed (SIGKILL) after its first epoch.

The tracking and worker faults start from a copy of the undisturbed run's working directory with the model
stages' stamps removed, so that the search, the final model, the evaluation and the report run again (the
cohort, preprocessing and the voxel models are current and skipped): their MLflow runs are compared with the
undisturbed run's same runs. The disk-full fault starts from the cohort only and is compared on every run.

For each fault: the exit code (of the faulted run; after the arrow, of the run that finished the study), the
message shown (the console lines about the fault), the runs by status in MLflow, the metric keys and points
of each run against the undisturbed run's, and whether the files equal the undisturbed run's after the rerun
(the cohort, the prepared dataset and split digests, the voxel-model and statistics tables, the model's
weights and the evaluation tables; chaos.py's digests).

`--searches N` runs `ctvlab tune --smoke-test` N times on one prepared smoke study against one server and
counts the trials' MLflow runs by status: a trial that ran and was stopped by the scheduler must end FINISHED.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import free_port, model_outputs, outputs

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "demo.yaml"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled",
       "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)]), "COLUMNS": "200"}  # fmt: skip
FAULT_LINE = re.compile(
    r"tracking server|error:|✗|waiting up to|ctvlab sync|disk is full|read-only|permission denied|"
    r"[Ww]orker.*(died|failed|restart)|[Rr]estart|unexpectedly"
)
STAGES_AGAIN = ("model", "final", "evaluate")  # the stamps removed so that these run again


class Server:
    """A real `mlflow server` on 127.0.0.1 with its stores under `root`; killed and started again on the
    same port and stores."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import urllib.request

        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'backend.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]  # fmt: skip
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.root / "server.log").read_text()[-2000:]
                    raise SystemExit(f"mlflow server did not start: {log}") from None
                time.sleep(0.5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def ctvlab(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    fh = open(log, "a")  # noqa: SIM115 (the child owns it until it ends)
    return subprocess.Popen([sys.executable, "-m", "ctvlab.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                            cwd=cwd, env=ENV, start_new_session=True)  # fmt: skip


def study_args(workdir: Path, uri: str, *extra: str) -> list[str]:
    return ["--config", str(CONFIG), "--smoke-test", "--workdir", str(workdir), "--tracking-uri", uri, *extra]


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout_s: float = 1800) -> bool:
    """Wait until `log` has a line matching `pattern` (True) or the process ended (False)."""
    deadline = time.monotonic() + timeout_s
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        if rx.search(log.read_text(errors="replace")):
            return True
        if proc.poll() is not None:
            return bool(rx.search(log.read_text(errors="replace")))
        time.sleep(0.2)
    return False


def fault_lines(log: Path, since: int = 0) -> list[str]:
    text = log.read_text(errors="replace").splitlines()[since:]
    seen, out = set(), []
    for line in text:
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
        if FAULT_LINE.search(line) and line not in seen and not line.startswith(("│", "┃", "┏", "└")):
            seen.add(line)
            out.append(line)
    return out


# --- the MLflow record ---------------------------------------------------------------------------------


def record(uri: str) -> dict:
    """Each run's status, metric keys and points, by the run's kind (trial ids are random: 'trial-*')."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ctvlab-demo")
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    by_kind: dict[str, list] = collections.defaultdict(list)
    for r in runs:
        kind = "trial-*" if r.info.run_name.startswith("trial-") else r.info.run_name
        points = sum(len(client.get_metric_history(r.info.run_id, k)) for k in r.data.metrics)
        by_kind[kind].append((r.info.status, tuple(sorted(r.data.metrics)), points))
    return {"status": collections.Counter(r.info.status for r in runs),
            "runs": {k: sorted(v) for k, v in by_kind.items()}}  # fmt: skip


def compare(ref: dict, got: dict, kinds: set[str] | None = None) -> str:
    """'equal (N runs)' or what differs, for the runs of `kinds` (all of the reference's by default)."""
    kinds = kinds or set(ref["runs"])
    diffs = []
    for kind in sorted(kinds):
        a, b = ref["runs"].get(kind, []), got["runs"].get(kind, [])
        if [(k, p) for _, k, p in a] != [(k, p) for _, k, p in b]:
            keys_a = [len(k) for _, k, _ in a]
            keys_b = [len(k) for _, k, _ in b]
            diffs.append(
                f"{kind}: keys {keys_b} vs {keys_a}, points {[p for *_, p in b]} vs {[p for *_, p in a]}"
            )
    n = sum(len(ref["runs"].get(k, [])) for k in kinds)
    return f"equal ({n} runs)" if not diffs else "DIFFERENT: " + "; ".join(diffs)


def statuses(rec: dict, kinds: set[str] | None = None) -> str:
    if kinds is None:
        counts = rec["status"]
    else:
        counts = collections.Counter(s for k in kinds for s, *_ in rec["runs"].get(k, []))
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"


def files_equal(ref: Path, workdir: Path) -> str:
    try:
        a, b = {**outputs(ref), **model_outputs(ref)}, {**outputs(workdir), **model_outputs(workdir)}
    except (OSError, ValueError, KeyError) as e:
        return f"not comparable ({type(e).__name__}: {e})"
    differ = [k for k in a if a[k] != b.get(k)]
    return f"{len(a) - len(differ)} of {len(a)} equal" + (f" (differ: {', '.join(differ)})" if differ else "")


def model_stages_again(root: Path, ref: dict):
    """(root, working directory, started server) of a fault that reruns the model stages of the
    undisturbed run (`copy_for_model_stages`), with an MLflow server of its own."""
    work = root / "w"
    copy_for_model_stages(ref["work"], work)
    server = Server(root / "mlflow")
    server.start()
    return root, work, server


def copy_for_model_stages(reference: Path, workdir: Path) -> None:
    """The undisturbed run's working directory without what the search and later stages wrote."""
    shutil.copytree(reference, workdir, symlinks=True,
                    ignore=shutil.ignore_patterns("ray", "results", "tracking-spool", ".ctvlab.lock"))  # fmt: skip
    smoke = workdir / "smoke"
    for stage in STAGES_AGAIN:
        (smoke / "stamps" / f"{stage}.json").unlink(missing_ok=True)
    for pointer in ("train_last_run.json", "tune_last_search.json"):
        (smoke / pointer).unlink(missing_ok=True)
    # The voxel-model and statistics tables are compared with the reference's: keep them.
    shutil.copytree(reference / "smoke" / "results", smoke / "results",
                    ignore=shutil.ignore_patterns("model", "search_model", "evaluate", "report.html"))  # fmt: skip


MODEL_KINDS = {"tune", "trial-*", "final", "evaluate", "report"}


# --- the faults ------------------------------------------------------------------------------------------


def reference_run(root: Path) -> dict:
    """An undisturbed `ctvlab run` of the smoke study in `root`, against its own server."""
    server = Server(root / "mlflow")
    server.start()
    work = root / "w"
    log = root / "run.log"
    t0 = time.monotonic()
    rc = ctvlab(["run", *study_args(work, server.uri)], root, log).wait()
    if rc != 0:
        raise SystemExit(f"the undisturbed run failed ({rc}): {log.read_text()[-3000:]}")
    return {"server": server, "work": work, "record": record(server.uri), "seconds": time.monotonic() - t0}


def tracking_outage(out: Path, ref: dict, name: str, stage: str, down_s: float | None) -> dict:
    """Kill the server 5 s into `stage`; start it again after `down_s` (None: only after the run ended,
    then `ctvlab sync` and a second `ctvlab run`)."""
    root, work, server = model_stages_again(out / name, ref)
    log = root / "run.log"
    extra = [] if down_s is not None else ["--set", "tracking.outage_wait_s=30"]
    proc = ctvlab(["run", *study_args(work, server.uri, *extra)], root, log)
    if not wait_for(log, rf"▶ \d+/\d+ {stage}", proc):
        raise SystemExit(f"{name}: the run never reached {stage}: {log.read_text()[-3000:]}")
    time.sleep(5)
    server.kill()
    killed_at = time.monotonic()
    if down_s is not None:
        time.sleep(max(0.0, down_s - (time.monotonic() - killed_at)))
        server.start()
    rc = proc.wait()
    codes = [rc]
    if down_s is None:
        server.start()
        codes.append(ctvlab(["sync", str(work / "smoke" / "tracking-spool")], root, log).wait())
        codes.append(ctvlab(["run", *study_args(work, server.uri)], root, log).wait())
    rec = record(server.uri)
    server.kill()
    return {"fault": name, "exit": " → ".join(map(str, codes)), "message": fault_lines(log),
            "runs": statuses(rec), "record": compare(ref["record"], rec, MODEL_KINDS),
            "files": files_equal(ref["work"], work)}  # fmt: skip


def disk_full(out: Path, ref: dict) -> dict:
    root = out / "disk-full"
    work = root / "w"
    smoke = work / "smoke"
    shutil.copytree(ref["work"] / "smoke" / "cohort", smoke / "cohort")
    (smoke / "stamps").mkdir(parents=True)
    shutil.copy2(ref["work"] / "smoke" / "stamps" / "cohort.json", smoke / "stamps" / "cohort.json")
    prep = smoke / "prep"
    prep.mkdir()
    size_mb = 40  # the smoke study's prepared dataset is about 100 MB
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(prep)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        return {"fault": "disk-full", "exit": "not run", "message": [f"cannot mount a tmpfs: {mounted.stderr.strip()}"],
                "runs": "", "record": "", "files": ""}  # fmt: skip
    try:
        server = Server(root / "mlflow")
        server.start()
        log = root / "run.log"
        codes = [ctvlab(["run", *study_args(work, server.uri)], root, log).wait()]
        lines = fault_lines(log)
        subprocess.run(["mount", "-o", "remount,size=400m", str(prep)], check=True)
        codes.append(ctvlab(["run", *study_args(work, server.uri)], root, log).wait())
        rec = record(server.uri)
        server.kill()
        return {"fault": f"disk-full (tmpfs {size_mb} MB under prep/)", "exit": " → ".join(map(str, codes)),
                "message": lines, "runs": statuses(rec), "record": compare(ref["record"], rec),
                "files": files_equal(ref["work"], work)}  # fmt: skip
    finally:
        subprocess.run(["umount", str(prep)], capture_output=True)


def read_only_results(out: Path, ref: dict) -> dict:
    root = out / "read-only-results"
    work = root / "w"
    shutil.copytree(ref["work"], work, symlinks=True, ignore=shutil.ignore_patterns(".ctvlab.lock"))
    results = work / "smoke" / "results"
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    runs_before = sum(ref["record"]["status"].values())
    uri = ref["server"].uri
    log = root / "run.log"
    steps = [
        ["mount", "--bind", str(results), str(results)],
        ["mount", "-o", "remount,ro,bind", str(results)],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", str(results)], capture_output=True)
            return {"fault": "read-only-results", "exit": "not run", "message": [done.stderr.strip()],
                    "runs": "", "record": "", "files": ""}  # fmt: skip
    try:
        codes, lines = [], []
        for command in ("evaluate", "report"):
            mark = len(log.read_text().splitlines()) if log.exists() else 0
            codes.append(ctvlab([command, *study_args(work, uri)], root, log).wait())
            lines += [f"{command}: {x}" for x in fault_lines(log, mark)]
        after = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    finally:
        subprocess.run(["umount", str(results)], check=True)
    rec_failed = record(uri)
    new_runs = sum(rec_failed["status"].values()) - runs_before
    codes_again = ctvlab(["evaluate", *study_args(work, uri)], root, log).wait()
    return {"fault": "read-only-results (evaluate, report)", "exit": f"{codes[0]}, {codes[1]} → {codes_again}",
            "message": lines, "runs": f"{new_runs} new run(s) while read-only",
            "record": "unchanged" if after == before else "FILES CHANGED",
            "files": f"results unchanged while read-only: {after == before}; after: {files_equal(ref['work'], work)}"}  # fmt: skip


def killed_worker(out: Path, ref: dict) -> dict:
    root, work, server = model_stages_again(out / "killed-worker", ref)
    log = root / "run.log"
    proc = ctvlab(["run", *study_args(work, server.uri)], root, log)
    if not wait_for(log, r"▶ \d+/\d+ final model", proc):
        raise SystemExit(f"killed-worker: the run never reached the final model: {log.read_text()[-3000:]}")
    # After the first epoch's checkpoint (the worker's epoch lines stay in Ray's logs): killed in epoch 2.
    victim = None
    deadline = time.monotonic() + 600
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        if list((work / "smoke" / "ray").glob("unet-*/checkpoint_*")):
            victim = next((p for p in descendants(proc.pid) if "RayTrainWorker" in cmdline(p)), None)
        time.sleep(0.1)
    if victim is not None:
        os.kill(victim, signal.SIGKILL)
    rc = proc.wait()
    rec = record(server.uri)
    server.kill()
    lines = fault_lines(log) + ([] if victim else ["(no training worker found to kill)"])
    return {"fault": "killed-worker (final model)", "exit": str(rc), "message": lines, "runs": statuses(rec),
            "record": compare(ref["record"], rec, MODEL_KINDS), "files": files_equal(ref["work"], work)}  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the run's own Ray processes, never another user's)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --- ten searches ----------------------------------------------------------------------------------------


def searches(out: Path, n: int, ref: dict) -> None:
    from mlflow.tracking import MlflowClient

    root, work, server = model_stages_again(out / "searches", ref)
    log = root / "tune.log"
    rows = []
    for i in range(n):
        rc = ctvlab(["tune", *study_args(work, server.uri)], root, log).wait()
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("ctvlab-demo")
        parents = client.search_runs([exp.experiment_id], "tags.`ctvlab.stage` = 'tune'",
                                     order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
        trials = client.search_runs(
            [exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
        )
        count = collections.Counter(t.info.status for t in trials)
        early = sum(t.data.tags.get("ctvlab.stopped_early") == "true" for t in trials)
        no_model = sum("model" not in {a.path for a in client.list_artifacts(t.info.run_id)} for t in trials)
        rows.append((i + 1, rc, dict(count), early, no_model))
        print(f"search {i + 1:2d}: exit {rc}, trials {dict(count)}, stopped early {early}, without a model {no_model}",
              flush=True)  # fmt: skip
    server.kill()
    total: collections.Counter = collections.Counter()
    for r in rows:
        total.update(r[2])
    bad = total.get("FAILED", 0) + total.get("KILLED", 0) + total.get("RUNNING", 0)
    print(f"\n{n} consecutive smoke searches: exits {collections.Counter(r[1] for r in rows)}; trial runs "
          f"{dict(total)}; FAILED, KILLED or left RUNNING: {bad}; trials without a model artifact: "
          f"{sum(r[4] for r in rows)}")  # fmt: skip


# --- the table ---------------------------------------------------------------------------------------------


KEY_LINE = re.compile(r"^(\w+: )?(error:|tracking server|waiting up to|sent \d+)|died|[Rr]estart")


def shown(lines: list[str]) -> list[str]:
    """The lines of a fault's message that say what happened (not one per patient, not the summary's copy)."""
    key = [x for x in lines if KEY_LINE.search(x)]
    return key or lines[:3]


def table(rows: list[dict]) -> str:
    head = "| fault | exit code | message shown | runs by status in MLflow | metric keys and points vs undisturbed | files after the rerun |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        msg = (
            "<br>".join(m.replace("|", "\\|").replace("\n", " ") for m in shown(r["message"])[:5]) or "(none)"
        )
        lines.append(f"| {r['fault']} | {r['exit']} | {msg} | {r['runs']} | {r['record']} | {r['files']} |")
    return "\n".join(lines)


FAULTS = (
    "tracking-search",
    "tracking-final",
    "tracking-never",
    "disk-full",
    "read-only-results",
    "killed-worker",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ctvlab-faults")
    p.add_argument("--only", nargs="+", choices=FAULTS, default=list(FAULTS))
    p.add_argument("--searches", type=int, default=0, help="instead: N consecutive smoke searches")
    p.add_argument(
        "--study", type=Path, help="with --searches: a finished smoke study's --workdir to start from"
    )
    p.add_argument("--record", action="store_true", help="also write the output to docs/results/")
    p.add_argument("--determinism", action="store_true", help="also a second undisturbed run, compared")
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: give a new --out (this benchmark never deletes a folder)")
    args.out.mkdir(parents=True)
    from record import recorded

    with recorded("fault_searches" if args.searches else "faults", args.record):
        t0 = time.monotonic()
        if args.searches and args.study:
            searches(args.out, args.searches, {"work": args.study.resolve()})
            return
        ref = reference_run(args.out / "reference")
        print(f"undisturbed run: {ref['seconds']:.0f} s; MLflow: {statuses(ref['record'])}", flush=True)
        if args.determinism:  # how far two undisturbed runs agree: the yardstick for "files equal"
            again = reference_run(args.out / "undisturbed-2")
            again["server"].kill()
            print(f"a second undisturbed run: MLflow record {compare(ref['record'], again['record'])}; files "
                  f"{files_equal(ref['work'], again['work'])}", flush=True)  # fmt: skip
        try:
            if args.searches:
                searches(args.out, args.searches, ref)
                return
            rows = []
            plan = {
                "tracking-search": lambda: tracking_outage(args.out, ref, "tracking-search", "search", 30),
                "tracking-final": lambda: tracking_outage(args.out, ref, "tracking-final", "final model", 30),
                "tracking-never": lambda: tracking_outage(args.out, ref, "tracking-never", "search", None),
                "disk-full": lambda: disk_full(args.out, ref),
                "read-only-results": lambda: read_only_results(args.out, ref),
                "killed-worker": lambda: killed_worker(args.out, ref),
            }
            for name in args.only:
                t = time.monotonic()
                try:
                    rows.append(plan[name]())
                except (Exception, SystemExit) as e:  # one harness failing must not lose the other rows
                    rows.append({"fault": name, "exit": "benchmark error", "message": [f"{type(e).__name__}: {e}"],
                                 "runs": "", "record": "", "files": ""})  # fmt: skip
                print(
                    f"{name}: {json.dumps(rows[-1], ensure_ascii=False)} ({time.monotonic() - t:.0f} s)",
                    flush=True,
                )
        finally:
            ref["server"].kill()
        print()
        print(table(rows))
        print(
            f"\nwall time {(time.monotonic() - t0) / 60:.1f} min; runs under {args.out} (kept; delete them when done)"
        )


if __name__ == "__main__":
    main()
