"""`ctvlab predict` on one patient with the study's network on CPU: seconds per patient and peak memory.

    .venv/bin/python benchmarks/predict.py [--raw COHORT] [--patient ID] [--base-features 48] [--threads 2]

The patient: one of `--raw` (a cohort folder), or by default one synthetic patient (`ctvlab synth`, MNI152
anatomy; its T1c grid is the one the outputs are written on). The model: an untrained network of the study's
size (48 base features, six channels; time and memory do not depend on the weights). Prints the seconds
of the whole prediction (3 mm inputs from the raw files, network, resampling to the native grid, three
CTVs with mm margins there, NIfTI, overlay, report) and of its first part (3 mm inputs and network), and the peak
resident memory. The patient is run once to warm up, then timed `--repeats` times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", type=Path, default=None, help="cohort folder (default: one synthetic patient)")
    ap.add_argument("--patient", default=None, help="patient id (default: the cohort's first)")
    ap.add_argument("--base-features", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch

    from ctvlab.config import StudyConfig
    from ctvlab.ingest.manifest import read_manifest
    from ctvlab.stages.predict import predict_cohort
    from evaluate import study_size_model

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ctvlab-bench-predict-"))
    raw = args.raw
    if raw is None:
        from ctvlab.synth.cohort import generate_cohort

        raw = work / "cohort"
        cfg = StudyConfig().synth.model_copy(update={"n_patients": 1, "seed": 0})
        generate_cohort(raw, cfg)
    pid = args.patient or read_manifest(raw, "predict")[2][0]
    model = str(study_size_model(args.base_features))
    cfg = StudyConfig()
    cfg.ctv.threshold = 0.5

    def once(i: int) -> tuple[float, dict]:
        t0 = time.perf_counter()
        out = predict_cohort(raw, work / f"out{i}", cfg, model_uri=model, patients=[pid], device="cpu",
                             threshold=0.5, progress=False)  # fmt: skip
        if out.failed:
            raise SystemExit(out.failed[pid])
        return time.perf_counter() - t0, json.loads((work / f"out{i}" / pid / "report.json").read_text())

    once(0)
    runs = [once(i + 1) for i in range(args.repeats)]
    total = statistics.median(r[0] for r in runs)
    network = statistics.median(r[1]["seconds"]["network"] for r in runs)
    grid = "×".join(str(n) for n in runs[0][1]["grid"]["shape"])
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"patient {pid} · native T1c grid {grid} · network {args.base_features} base features, 6 channels · "
          f"{args.threads} thread(s) · load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"seconds per patient: {total:.1f} (3 mm inputs + network: {network:.1f}; model loading included)")
    print(f"peak memory (resident, whole process): {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
