"""Evaluation cost against inference: building the three CTVs and all their metrics, per patient.

    .venv/bin/python benchmarks/evaluate.py [--data runs/demo/prep] [--model runs/demo/results/model]
                                            [--base-features 48] [--threads 2] [--repeats 3]

For every test patient of a prepared dataset (default: the demo's), times (a) the network's inference
on the full 3 mm grid (`ctvlab.unet.inference.predict_probability`, what `ctvlab evaluate` runs) and (b) the
evaluation proper (`evaluate_patient`: model, RTOG and EORTC CTVs with millimetre margins, then
sensitivity, specificity, Dice, HD95, Tversky, PCC, volume and progression coverage for each). Each is the
median of `--repeats` runs after one warm-up.

The model: `--model DIR` (a ctvlab model folder, e.g. the demo's `results/model`), or, by default, an
untrained network of the study's size (48 base features, six channels): inference time does not depend on
the weights, and the study's size is what evaluation has to keep up with. Goal: (b) < 25% of (a) on CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def study_size_model(base_features: int) -> Path:
    """A ctvlab model folder holding an untrained network of the given width (all six channels)."""
    import json

    import torch

    from ctvlab.config import UNetModelConfig
    from ctvlab.unet.model import build_unet, model_spec
    from ctvlab.unet.trainer import SPEC_FILE, WEIGHTS_FILE

    cfg = UNetModelConfig(base_features=base_features, modality_set="all")
    net = build_unet(cfg, 6)
    folder = Path(tempfile.mkdtemp(prefix="ctvlab-bench-model-"))
    torch.save(net.state_dict(), folder / WEIGHTS_FILE)
    (folder / SPEC_FILE).write_text(json.dumps(model_spec(cfg, 6)))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("runs/demo/prep"))
    ap.add_argument("--model", type=Path, default=None, help="a ctvlab model folder (default: study size)")
    ap.add_argument("--base-features", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--patients", type=int, default=None, help="at most this many test patients")
    args = ap.parse_args()

    import torch

    from ctvlab.config import StudyConfig
    from ctvlab.ctv.scoring import evaluate_patient
    from ctvlab.data.readers import load_patient
    from ctvlab.splits import load_split
    from ctvlab.unet.inference import load_model, predict_probability

    if not (args.data / "splits.json").exists():
        raise SystemExit(
            f"{args.data}: no prepared dataset with a split; run `make demo` or pass --data PREP"
        )
    torch.set_num_threads(args.threads)
    model = load_model(args.model or study_size_model(args.base_features), device="cpu")
    cfg = StudyConfig()
    ids = load_split(args.data).patients("test")[: args.patients]
    print(f"{len(ids)} test patients · model {model.spec.get('base_features')} base features · "
          f"{args.threads} thread(s) · load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'patient':>10} {'grid':>14} {'inference s':>12} {'evaluation s':>13} {'ratio':>7}")
    inf_total = ev_total = 0.0
    for pid in ids:
        p = load_patient(args.data, pid)
        t_inf, prob = timed(lambda p=p: predict_probability(model, p), args.repeats)
        t_ev, _ = timed(lambda p=p, prob=prob: evaluate_patient(prob, 0.5, p, cfg), args.repeats)
        inf_total, ev_total = inf_total + t_inf, ev_total + t_ev
        grid = "×".join(str(s) for s in p.features.shape[1:])
        print(f"{pid:>10} {grid:>14} {t_inf:12.3f} {t_ev:13.3f} {t_ev / t_inf:7.1%}")
    print(f"total: inference {inf_total:.2f} s, evaluation {ev_total:.2f} s → evaluation = "
          f"{ev_total / inf_total:.1%} of inference (goal < 25%)")  # fmt: skip


if __name__ == "__main__":
    main()
