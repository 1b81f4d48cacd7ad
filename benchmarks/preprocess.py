"""Preprocessing throughput: the Ray Data pipeline against a plain serial loop, on the same cohort.

    .venv/bin/python benchmarks/preprocess.py [--patients 24] [--cohort DIR] [--phantoms]

Both runs call `ctvlab.preprocess.preprocess_cohort` on the same cohort into separate folders; only the
engine differs (`ray`: one patient per Ray Data task; `serial`: a loop in one process). Both validate
the cohort first (the same code), which also brings every file into the page cache before either
patient stage starts. Reported: the patient stage's patients per second for each and their ratio,
end-to-end seconds, and peak resident memory: of the serial process, and of each Ray worker that
processed patients (`VmHWM` from /proc). The two runs must produce the same dataset digest.

Before timing, both sides import the preprocessing modules once (the Ray side on as many workers as it
will use), so that neither pays its one-off imports inside the measured stage.

Without `--cohort`, a synthetic cohort is generated (`ctvlab synth`); `--phantoms` uses the analytic
test phantoms at 1 mm instead (about the same voxel count per patient as the synthetic cohort's 2 mm
MNI grid), which needs nothing but the test helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SERIAL_CHILD = """
import json, resource, sys
from pathlib import Path
import ctvlab.preprocess.prepare, nibabel, pyarrow.parquet, scipy.ndimage  # imports outside the timing
from ctvlab.config import PreprocessConfig
from ctvlab.preprocess.ray_pipeline import preprocess_cohort
cfg = PreprocessConfig.model_validate_json(sys.argv[3])
report = preprocess_cohort(Path(sys.argv[1]), Path(sys.argv[2]), cfg, progress=False, engine="serial")
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
print(json.dumps({"report": report.model_dump(mode="json"), "peak_mib": peak_mib}))
"""


def _warm(row: dict) -> dict:
    import nibabel  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import scipy.ndimage  # noqa: F401

    import ctvlab.preprocess.prepare  # noqa: F401

    time.sleep(0.5)  # hold the worker so that the next warm-up task lands on another one
    return {"pid": os.getpid()}


def make_cohort(args: argparse.Namespace, root: Path) -> Path:
    cohort = root / "cohort"
    if args.phantoms:
        sys.path.insert(0, str(REPO))
        from tests.phantoms import PhantomSpec, make_phantom_cohort

        spec = PhantomSpec(anat_spacing=(1.0, 1.0, 1.0), anat_shape=(96, 112, 96), noise=0.02)
        make_phantom_cohort(cohort, n=args.patients, spec=spec)
        return cohort
    try:
        from ctvlab.synth.cohort import generate_cohort
    except ImportError:
        sys.exit("ctvlab.synth.cohort is not available: give --cohort DIR or --phantoms")
    from ctvlab.config import SynthConfig

    generate_cohort(cohort, SynthConfig(n_patients=args.patients))
    return cohort


def run_serial(cohort: Path, out: Path, cfg_json: str) -> tuple[dict, float]:
    """The serial loop in a fresh process: (report, its peak RSS in MiB)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-c", SERIAL_CHILD, str(cohort), str(out), cfg_json],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"serial run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["report"], result["peak_mib"]


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def warm_ray(cfg, workers: int) -> None:
    """Start the local Ray and import the preprocessing modules on `workers` workers."""
    import ray.data

    from ctvlab.runtime import init_ray

    init_ray()
    warm = ray.data.from_items([{"i": i} for i in range(workers)], override_num_blocks=workers)
    warm.map(_warm, num_cpus=cfg.cpus_per_patient, compute=ray.data.TaskPoolStrategy(size=workers)).take_all()


def run_ray(cohort: Path, out: Path, cfg) -> dict:
    """The Ray Data pipeline in this process (Ray already started): its report."""
    from ctvlab.preprocess.ray_pipeline import preprocess_cohort

    report = preprocess_cohort(cohort, out, cfg, progress=False, engine="ray")
    return report.model_dump(mode="json")


def ray_worker_peaks() -> list[float]:
    """Peak RSS (MiB) of every Ray worker process of the local Ray started by this process, largest first.

    Workers rename themselves "ray::<task>" (their command line); Ray's agents do too, so those are
    left out by name.
    """
    peaks = []
    from faults import descendants  # the same walk of /proc

    for pid in descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::") and b"Agent" not in cmd and (peak := _peak_rss_mib(pid)) is not None:
            peaks.append(peak)
    return sorted(peaks, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=24, help="cohort size when generating (default 24)")
    parser.add_argument("--cohort", type=Path, help="an existing cohort folder (default: generate one)")
    parser.add_argument("--phantoms", action="store_true", help="generate 1 mm analytic phantoms instead")
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each engine; the best counts")
    args = parser.parse_args()

    from ctvlab.config import PreprocessConfig
    from ctvlab.preprocess.ray_pipeline import local_concurrency

    root = args.workdir or Path(tempfile.mkdtemp(prefix="ctvlab-bench-preprocess-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        cohort = args.cohort or make_cohort(args, root)
        made = time.perf_counter() - t
        cfg = PreprocessConfig()
        workers = cfg.max_concurrent_patients or local_concurrency(cfg)

        # Best of `repeats` for each side, alternating, so that a burst of other load on the machine
        # does not decide the ratio. The serial runs go first: Ray's processes are children too.
        serials = [run_serial(cohort, root / f"prep_serial_{i}", cfg.model_dump_json()) for i in range(1)]
        warm_ray(cfg, workers)
        rays = [run_ray(cohort, root / "prep_ray_0", cfg)]
        for i in range(1, args.repeats):
            import ray

            ray.shutdown()
            serials.append(run_serial(cohort, root / f"prep_serial_{i}", cfg.model_dump_json()))
            warm_ray(cfg, workers)
            rays.append(run_ray(cohort, root / f"prep_ray_{i}", cfg))
        ray_peaks = ray_worker_peaks()
        serial, serial_peak = min(serials, key=lambda r: r[0]["process_s"])
        ray_report = min(rays, key=lambda r: r["process_s"])

        n = len(serial["processed"])
        if n == 0 or sorted(ray_report["processed"]) != sorted(serial["processed"]):
            sys.exit(
                f"the runs processed different patients: {serial['processed']} vs {ray_report['processed']}"
            )
        same = ray_report["digest"] == serial["digest"]
        s_rate, r_rate = n / serial["process_s"], n / ray_report["process_s"]
        s_total, r_total = n / serial["elapsed_s"], n / ray_report["elapsed_s"]
        lines = [
            f"cohort: {cohort} ({n} patients{f', generated in {made:.0f} s' if not args.cohort else ''}); "
            f"{os.cpu_count()} cores, {workers} patients at once in the pipeline",
            f"{'':24}{'serial':>12}{'ray data':>12}{'ratio':>9}",
            f"{'patient stage (s)':24}{serial['process_s']:12.1f}{ray_report['process_s']:12.1f}",
            f"{'patients / s':24}{s_rate:12.3f}{r_rate:12.3f}{r_rate / s_rate:8.2f}x",
            f"{'end to end (s)':24}{serial['elapsed_s']:12.1f}{ray_report['elapsed_s']:12.1f}",
            f"{'patients / s, end to end':24}{s_total:12.3f}{r_total:12.3f}{r_total / s_total:8.2f}x",
            f"{'  of which validation (s)':24}{serial['validate_s']:12.1f}{ray_report['validate_s']:12.1f}",
            f"peak RSS (MiB): serial process {serial_peak:.0f} (its validation threads included); "
            f"Ray driver {_peak_rss_mib(os.getpid()) or 0:.0f} (validation included); Ray workers "
            + ", ".join(f"{p:.0f}" for p in ray_peaks[:workers])
            + f" (one patient at a time; largest {workers} of {len(ray_peaks)})",
            f"same dataset digest: {same}; best of {args.repeats} run(s) each",
        ]
        print("\n".join(lines))
        if not same:
            sys.exit(1)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
