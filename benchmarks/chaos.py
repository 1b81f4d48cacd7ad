"""Kill a smoke study with SIGKILL at random moments across its stages, resume it each time, and compare
its final outputs with an uninterrupted run's.

    python benchmarks/chaos.py --kills 20 --out /tmp/ctvlab-chaos

1. Starts one local Ray cluster (`ray start --head`, its own temporary folder, 4 logical CPUs) that every
   run joins with `--address`, as runs on a team's cluster do: a kill ends the driver and Ray cleans up
   its tasks, trials and training workers.
2. Reference: `ctvlab run --config jobs/configs/demo.yaml --smoke-test` uninterrupted, timing each stage.
   With `--determinism`, a second uninterrupted run shows which outputs are reproducible at all.
3. Chaos: `--kills` moments, each in a stage drawn uniformly among the stages that last 2 s or more in
   the reference run, at an offset drawn uniformly within that stage's duration; in stage order. An
   attempt starts `ctvlab run` in the chaos folder, waits until that stage starts (or a later one, when the
   resumed run has already passed it), waits the offset, and kills the run's whole process group with
   SIGKILL. Then the next attempt resumes. A resumed run that finishes before its kill completes that
   study, and the remaining moments go to a new one, so every moment gets its kill. Each study is finally
   run to the end once more.
4. Compares the two runs' outputs by content digest: the cohort (NIfTI by decoded bytes), the prepared
   dataset and split digests, the voxel-model and statistics tables (timings dropped, pseudonyms mapped
   back to ids: each prepared dataset has its own salt). Those must be equal. The network's weights and
   the evaluation that follows from them are compared too, beside a second uninterrupted run
   (`--determinism`): training with concurrent trials is not bit-reproducible run to run, so there the
   question is whether the chaos run differs more than two clean runs do. Counts the patients that
   reached the prepared dataset and the split.

Prints: kills survived (attempts that were killed and whose work the next run resumed), the stages the
kills fell in, outputs equal (per output), patients lost.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "demo.yaml"
STAGE_LINE = re.compile(r"▶ \d+/\d+ (.+?)\s*$")
DONE_LINE = re.compile(r"✓ ran in (\d+) s")
SUMMARY = "ctvlab run: summary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(log: Path) -> tuple[subprocess.Popen, str, str]:
    """A one-node Ray cluster of 4 logical CPUs with its own temporary folder: (process, address, temp)."""
    temp = tempfile.mkdtemp(prefix="rc-")
    port = free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=4", "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return proc, address, temp


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGINT, signal.SIGKILL):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                continue


def launch(workdir: Path, address: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ctvlab.cli", "run", "--config", str(CONFIG), "--smoke-test",
           "--workdir", str(workdir), "--address", address,
           "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(REPO / "platform")}  # fmt: skip
    fh = open(log, "w")  # noqa: SIM115 (the child owns it until it ends)
    return subprocess.Popen(
        cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=workdir
    )


def stages_seen(log: Path) -> list[str]:
    return [
        m.group(1) for line in log.read_text(errors="replace").splitlines() if (m := STAGE_LINE.search(line))
    ]


def reference_run(workdir: Path, address: str) -> tuple[float, list[tuple[str, float, float]]]:
    """An uninterrupted run: its duration and each stage's (name, start, end) in seconds from launch."""
    workdir.mkdir(parents=True)
    log = workdir / "run.log"
    t0 = time.monotonic()
    proc = launch(workdir, address, log)
    seen: list[tuple[str, float]] = []
    while proc.poll() is None:
        names = stages_seen(log)
        for name in names[len(seen) :]:
            seen.append((name, time.monotonic() - t0))
        time.sleep(0.2)
    total = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{log.read_text()[-3000:]}")
    for name in stages_seen(log)[len(seen) :]:
        seen.append((name, total))
    timeline = [
        (name, start, seen[i + 1][1] if i + 1 < len(seen) else total) for i, (name, start) in enumerate(seen)
    ]
    return total, timeline


def attempt(
    workdir: Path, address: str, log: Path, stage: str, offset: float, order: list[str]
) -> str | None:
    """One `ctvlab run`, killed `offset` s after `stage` (or a later one) starts: the stage it was in, or
    None when the run finished first."""
    proc = launch(workdir, address, log)
    target = order.index(stage)
    started_at = None
    while proc.poll() is None:
        reached = [order.index(n) for n in stages_seen(log) if n in order]
        if started_at is None and reached and max(reached) >= target:
            started_at = time.monotonic()
        if started_at is not None and time.monotonic() - started_at >= offset:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        return None
    names = stages_seen(log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return names[-1] if names else "start-up"


def chaos_run(root: Path, address: str, moments: list[tuple[str, float]], order: list[str]) -> dict:
    """Attempts killed at `moments` ((stage, offset s)), each resuming the last. A resumed run can finish
    before its kill (it had less left to do than the reference): that study is then complete, and the
    remaining moments go to a new study, so that every moment gets its kill. Each study is finally run to
    the end once more."""
    studies: list[Path] = []
    pending = list(moments)
    kills, landed, finished_early, missed = 0, [], 0, 0
    while pending:
        workdir = root / f"study-{len(studies) + 1}"
        workdir.mkdir(parents=True)
        studies.append(workdir)
        killed_here = 0
        while pending:
            stage, offset = pending[0]
            where = attempt(
                workdir, address, workdir / f"attempt-{kills + missed:02d}.log", stage, offset, order
            )
            if where is None:
                finished_early += 1
                print(f"  {workdir.name}: the resumed run finished before its kill in {stage}", flush=True)
                if killed_here == 0:  # even a fresh study outran it: this moment cannot be hit
                    pending.pop(0)
                    missed += 1
                break
            pending.pop(0)
            kills += 1
            killed_here += 1
            landed.append(where)
            print(f"  kill {kills:2d} ({workdir.name}): in {where} ({offset:.1f} s into {stage})", flush=True)
    finals = {}
    for workdir in studies:
        log = workdir / "final.log"
        proc = launch(workdir, address, log)
        proc.wait()
        finals[workdir] = proc.returncode == 0 and SUMMARY in log.read_text(errors="replace")
    return {"kills": kills, "landed": landed, "finished_early": finished_early, "missed": missed,
            "studies": studies, "finals": finals}  # fmt: skip


# --- comparing outputs ---------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)  # gzip headers carry a time stamp; the image does not
    return hashlib.sha256(data).hexdigest()


def folder_digest(folder: Path, pattern: str = "*") -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob(pattern) if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


def model_digest(folder: Path) -> str:
    import torch

    state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()


TIMING = ("fit_s", "predict_s", "permutation_s", "cpu_s", "seconds")


def table_digest(folder: Path, pattern: str, prep: Path) -> str:
    """Digest of CSV tables with run-specific columns removed: timings, and the pseudonyms (keyed by each
    prepared dataset's own random salt) mapped back to patient ids."""
    import pandas as pd

    from ctvlab.splits import pseudonymise

    cohort = pd.read_csv(prep.parent / "cohort" / "manifest.csv")["patient_id"].astype(str)
    back = {v: k for k, v in pseudonymise(prep, cohort).items()}
    h = hashlib.sha256()
    for f in sorted(folder.rglob(pattern)):
        df = pd.read_csv(f)
        df = df.drop(columns=[c for c in df.columns if c in TIMING or c.endswith("_seconds")])
        df = df.replace(back)
        h.update(str(f.relative_to(folder)).encode())
        h.update(df.to_csv(index=False).encode())
    return h.hexdigest()


def outputs(workdir: Path) -> dict[str, str]:
    """Digests of the outputs that do not depend on the trained network (reproducible run to run)."""
    smoke = workdir / "smoke"
    res, prep = smoke / "results", smoke / "prep"
    return {
        "cohort (images, masks, manifest)": folder_digest(smoke / "cohort"),
        "prepared dataset (digest)": json.loads((prep / "dataset.json").read_text())["digest"],
        "split (digest)": json.loads((prep / "splits.json").read_text())["digest"],
        "voxel-model CV tables": table_digest(res / "voxel_models", "*.csv", prep),
        "statistics tables": table_digest(res / "stats", "*.csv", prep),
    }


def model_outputs(workdir: Path) -> dict[str, str]:
    """The trained network and what follows from it: reproducible only as far as training is."""
    res = workdir / "smoke" / "results"
    return {
        "model weights": model_digest(res / "model"),
        "evaluation tables": table_digest(res / "evaluate", "*.csv", workdir / "smoke" / "prep"),
    }


def model_pcc(workdir: Path) -> float:
    import pandas as pd

    t = pd.read_csv(workdir / "smoke" / "results" / "evaluate" / "per_patient.csv")
    return float(t.loc[t["ctv"] == "model", "pcc"].mean())


def patients(workdir: Path) -> tuple[int, int, int]:
    """(patients in the cohort, in the prepared dataset, in the split)."""
    import pandas as pd

    smoke = workdir / "smoke"
    cohort = pd.read_csv(smoke / "cohort" / "manifest.csv")
    report = json.loads((smoke / "prep" / "preprocess_report.json").read_text())
    split = pd.read_parquet(smoke / "prep" / "splits.parquet")
    return len(cohort), int(report["n_prepared"]), int(split["patient_id"].nunique())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ctvlab-chaos")
    p.add_argument("--determinism", action="store_true", help="also a second uninterrupted run")
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(
            f"{args.out} exists: give a new --out (this benchmark never deletes a folder it did not create)"
        )
    args.out.mkdir(parents=True)
    # A terminated benchmark stops its cluster too (the `finally` below runs on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    proc, address, temp = start_cluster(args.out / "ray.log")
    try:
        t0 = time.monotonic()
        total, timeline = reference_run(args.out / "reference", address)
        print(
            f"reference run: {total:.0f} s; stages: "
            + ", ".join(f"{n} {e - s:.0f} s" for n, s, e in timeline)
        )
        rng = random.Random(args.seed)
        order = [n for n, _, _ in timeline]
        # Each kill: a stage drawn uniformly among those that last long enough to be hit, a moment drawn
        # uniformly within it (stage order kept: the run advances as a real interrupted study would).
        long_enough = [(n, e - s) for n, s, e in timeline if e - s >= 2.0]
        picks = sorted((rng.choice(long_enough) for _ in range(args.kills)), key=lambda x: order.index(x[0]))
        moments = [(name, rng.uniform(0.0, duration)) for name, duration in picks]
        ref2 = None
        if args.determinism:
            reference_run(args.out / "reference-2", address)
            ref2 = True
        result = chaos_run(args.out / "chaos", address, moments, order)
        elapsed = time.monotonic() - t0
    finally:
        stop(proc)
        shutil.rmtree(temp, ignore_errors=True)

    ref = outputs(args.out / "reference")
    studies, finals = result["studies"], result["finals"]
    print()
    print(
        f"kills survived: {result['kills'] if all(finals.values()) else 0} of {result['kills']} "
        f"across {len(studies)} studies (resumed runs that finished before their kill: {result['finished_early']}; "
        f"moments no run reached: {result['missed']}); final runs "
        + ", ".join(f"{w.name} {'ok' if ok else 'FAILED'}" for w, ok in finals.items())
    )
    landed = {s: result["landed"].count(s) for s in dict.fromkeys(result["landed"])}
    print("kills per stage: " + ", ".join(f"{s} {n}" for s, n in landed.items()))
    n_equal, n_compared, lost, total_patients = 0, 0, 0, 0
    for w in studies:
        got = outputs(w)
        same = [k for k in ref if ref[k] == got[k]]
        n_equal, n_compared = n_equal + len(same), n_compared + len(ref)
        print(
            f"outputs equal in {w.name}: {len(same)} of {len(ref)} (those that do not depend on the trained network)"
        )
        for k in ref:
            print(f"  {'equal    ' if k in same else 'DIFFERENT'} {k}")
        n_cohort, n_prep, n_split = patients(w)
        lost += n_cohort - min(n_prep, n_split)
        total_patients += n_cohort
    runs = [
        "reference",
        *(["reference-2"] if ref2 is not None else []),
        *(str(w.relative_to(args.out)) for w in studies),
    ]
    models = {r: model_outputs(args.out / r) for r in runs}
    for k in models["reference"]:
        same = [r for r in runs[1:] if models[r][k] == models["reference"][k]]
        print(f"  {k}: equal to the reference in {', '.join(same) or 'no other run'}")
    print(
        "  model CTV PCC (test patients' mean): "
        + ", ".join(f"{r} {model_pcc(args.out / r):.4f}" for r in runs)
    )
    print(f"outputs equal: {n_equal} of {n_compared}; patients lost: {lost} of {total_patients}")
    print(f"wall time {elapsed / 60:.1f} min; runs under {args.out} (kept; delete them when done)")
    sys.exit(0 if all(finals.values()) and n_equal == n_compared and lost == 0 else 1)


if __name__ == "__main__":
    main()
