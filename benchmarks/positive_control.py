"""The positive control: on a cohort where the truth favours imaging by a known amount, the model CTV must
cover more of the new progression than a uniform margin of the same volume; on its null twin (the same
patients, diffusion and MRSI blind to the infiltration) it must not.

    .venv/bin/python benchmarks/positive_control.py [--patients 101] [--seed 1] [--epochs 40]
        [--base-features 8] [--cohorts strong strong-null today] [--out DIR [--reuse]] [--quick] [--power]
        [--external N [--external-seed S]]

For each cohort: generate it (`ctvlab.synth`, its true pre-RT density kept as ground truth), prepare it,
split it (67/16/18 at 101), train ONE fixed U-Net configuration on it (`ctvlab train`'s Ray Train path,
validation-chosen threshold), and score every test patient (`ctvlab.stages.control`): the model CTV against
the same-volume margin, and PREDICT-GBM's top-k of the probability at the RTOG, EORTC and 15 mm volumes,
each beside the ceiling (the true density's gain at that volume). Prints every expectation with ok / OUT:

- strong: the model CTV covers more of the new progression than the same-volume margin (paired Wilcoxon
  p < 0.05) and gains at least a third of the ceiling at its own volume;
- strong-null: it does not (p > 0.05 and |mean gain| < 0.01);
- today: the measured gain and the ceiling, whatever they are.

`--external N` also scores each cohort's model on N patients it never saw: a cohort generated with the same
settings and another seed (`--external-seed`, default the seed + 1; the twins of a setting share it, so
they are again the same patients), every one of them scored at the threshold the test patients get. The
18 test patients of a 101-patient cohort leave a standard error of about 0.02 to 0.04 on a mean gain; 101
external patients (about 93 with new progression) bring it to about 0.016–0.018 (measured; patients with a
handful of new voxels swing between coverage 0 and 1, so it does not fall as 1/sqrt(n) from the test
patients' figure).

`--power` adds the intermediate signal settings and draws the power curve (the model's gain and the
ceiling against the signal, with their intervals): run it with `--patients N` at a team's own cohort size to
see what effect that many patients can detect. `--quick`: 40 patients, strong and strong-null only,
20 epochs; 7 minutes on an idle 2-core machine. `--out DIR` keeps everything (cohorts, prepared data, models,
tables, figure); without it a temporary folder is removed at the end. `--reuse` with `--out` takes each cohort
that an earlier invocation with the same settings finished there as it is (its `result.json`), and starts
the unfinished ones again.

Trained network (2 cores): 8 base features (the study's 48 is out of reach of 2 CPU cores in this time), PCC
loss, Ranger at lr 1e-3, batch 1, the study's augmentation, early stopping after 8 epochs without a better
validation Tversky; everything else is ctvlab's default.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

# Signal settings of the synthetic cohort (`ctvlab.config.SynthConfig`), from null to strong. The "-null"
# twin of a setting has the same patients and the same ceiling, with diffusion and MRSI blind to the
# infiltration.
SETTINGS: dict[str, dict] = {
    "today": {},
    "today-null": {"null": True},
    "mild": {"preset": "mild"},
    "moderate": {"preset": "moderate"},
    "strong": {"preset": "strong"},
    "strong-null": {"preset": "strong", "null": True},
}
# The power curve's x axis: no signal (the strong cohort's null twin), today's cohort, two stronger ones.
POWER = ("strong-null", "today", "moderate", "strong")


def study_config(workdir: Path, epochs: int, base_features: int):
    from ctvlab.config import StudyConfig

    cfg = StudyConfig(name="positive-control", workdir=workdir)
    cfg.tracking.tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg.unet.model.base_features = base_features
    cfg.unet.loss.name = "pcc"
    cfg.unet.optim.lr = 1e-3
    cfg.unet.train.epochs = epochs
    cfg.unet.train.patience = 8
    cfg.unet.train.checkpoint_every = epochs
    cfg.unet.train.cpus_per_worker = 1.5  # two threads beside Ray Data's 0.5 on 2 cores
    return cfg


def prepared(name: str, report) -> dict[str, str]:
    """The patients preprocessing left out, with why (printed as `ctvlab preprocess` prints them); stops only
    when the cohort as a whole failed.

    A generated patient can be refused like a team's (e.g. too few normal-appearing voxels inside the MRSI
    box to normalise a metabolite map); the others are the cohort, as `ctvlab preprocess` leaves them."""
    if report.errors or report.cohort_problems or report.n_prepared == 0:
        problems = [*report.cohort_problems, *(f"{e.patient_id}: {e.reason}" for e in report.errors)]
        raise SystemExit(f"{name}: preprocessing failed: " + "; ".join(problems or ["no patient prepared"]))
    why = {p.patient_id: "; ".join(p.problems) or "invalid" for p in report.invalid}
    why.update({f.patient_id: f.reason for f in report.failed})
    if why:
        from rich.console import Console

        from ctvlab.preprocess.ray_pipeline import print_preprocess_report

        print(f"{name}: preprocessing left out {len(why)} patient(s):")
        print_preprocess_report(report, Console(soft_wrap=True))
    return why


def run_cohort(
    name: str, root: Path, patients: int, seed: int, epochs: int, base_features: int, reuse: bool = False
) -> dict:
    from ctvlab.config import PreprocessConfig, SplitConfig, SynthConfig
    from ctvlab.preprocess.ray_pipeline import preprocess_cohort
    from ctvlab.splits import write_split
    from ctvlab.stages.control import score_test_patients, summary
    from ctvlab.stages.train import train_unet
    from ctvlab.synth.cohort import generate_cohort

    work = root / name
    settings = {"patients": patients, "seed": seed, "epochs": epochs, "base_features": base_features}
    if (
        reuse and (work / "result.json").is_file()
    ):  # this cohort's finished result, from an earlier invocation
        result = json.loads((work / "result.json").read_text())
        if result.get("settings") != settings:
            raise SystemExit(
                f"{name}: {work / 'result.json'} was made with {result.get('settings')}, not {settings}"
            )
        print(f"{name}: reusing the result in {work} (made {result.get('finished_at', '?')})")
        return {**result, "summary": pd.read_csv(work / "summary.csv")}
    if work.exists():
        shutil.rmtree(work)  # an unfinished cohort of an earlier invocation: start it again
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    synth = SynthConfig(n_patients=patients, seed=seed, **SETTINGS[name])
    cohort, prep = work / "cohort", work / "prep"
    generate_cohort(cohort, synth, progress=False)
    left_out = prepared(name, preprocess_cohort(cohort, prep, PreprocessConfig(), progress=False))
    write_split(prep, SplitConfig(seed=seed))
    t_data = time.perf_counter() - t0
    cfg = study_config(work, epochs, base_features)
    trained = train_unet(cfg, prep, register=False)
    t_train = time.perf_counter() - t0 - t_data
    ctv_table, volume_table, threshold = score_test_patients(prep, trained.model_dir, cfg, cohort)
    table = summary(ctv_table, volume_table)
    for df, fname in ((ctv_table, "ctv.csv"), (volume_table, "volumes.csv"), (table, "summary.csv")):
        df.to_csv(work / fname, index=False)
    result = {"name": name, "threshold": threshold, "epochs_run": trained.epochs_run,
              "best_val_tversky": trained.best_metrics.get("val_tversky"), "seconds_data": t_data,
              "seconds_train": t_train, "n_test": len(ctv_table), "settings": settings,
              "model_dir": str(trained.model_dir), "left_out": left_out,
              "finished_at": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    (work / "result.json").write_text(json.dumps(result, indent=2, default=float))
    return {**result, "summary": table}


def run_external(name: str, root: Path, result: dict, patients: int, seed: int, epochs: int,
                 base_features: int) -> dict:  # fmt: skip
    """Score the cohort's trained model on `patients` new patients of the same settings (seed `seed`).

    Kept in `<cohort>/external/` and taken as it is when an earlier invocation finished it with the same
    settings and the same model (its weights' digest)."""
    import hashlib

    from ctvlab.config import PreprocessConfig, SynthConfig
    from ctvlab.preprocess.ray_pipeline import preprocess_cohort
    from ctvlab.stages.control import score_external, summary
    from ctvlab.synth.cohort import generate_cohort

    work, ext = root / name, root / name / "external"
    model_dir = Path(result.get("model_dir") or work / "results" / "model")
    weights = hashlib.sha256((model_dir / "weights.pt").read_bytes()).hexdigest()
    settings = {"patients": patients, "seed": seed, "model_sha256": weights}
    done = ext / "result.json"
    out = json.loads(done.read_text()) if done.is_file() else {}
    if out.get("settings") == settings:
        print(f"{name}: reusing the external scoring in {ext} (made {out.get('finished_at', '?')})")
        return {**out, "summary": pd.read_csv(ext / "summary.csv")}
    if ext.exists():
        shutil.rmtree(ext)  # made for another model or other settings, or unfinished: made again
    ext.mkdir(parents=True)
    t0 = time.perf_counter()
    cohort, prep = ext / "cohort", ext / "prep"
    generate_cohort(cohort, SynthConfig(n_patients=patients, seed=seed, **SETTINGS[name]), progress=False)
    left_out = prepared(
        f"{name} (external)", preprocess_cohort(cohort, prep, PreprocessConfig(), progress=False)
    )
    t_data = time.perf_counter() - t0
    cfg = study_config(work, epochs, base_features)
    ctv_table, volume_table, threshold = score_external(model_dir, cfg, work / "prep", prep, cohort)
    table = summary(ctv_table, volume_table)
    for df, fname in ((ctv_table, "ctv.csv"), (volume_table, "volumes.csv"), (table, "summary.csv")):
        df.to_csv(ext / fname, index=False)
    out = {"name": f"{name} (external)", "threshold": threshold, "n_test": len(ctv_table), "settings": settings,
           "seconds_data": t_data, "seconds_score": time.perf_counter() - t0 - t_data, "left_out": left_out,
           "finished_at": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    done.write_text(json.dumps(out, indent=2, default=float))
    return {**out, "summary": table}


def line(table: pd.DataFrame, volume: str, map_name: str = "model") -> pd.Series | None:
    rows = table[(table["volume"] == volume) & (table["map"] == map_name)]
    return rows.iloc[0] if len(rows) else None


def print_cohort(res: dict) -> None:
    t = res["summary"]
    if "epochs_run" in res:
        print(f"\n{res['name']}: {res['n_test']} test patients · {res['epochs_run']} epochs (best val Tversky "
              f"{res['best_val_tversky']:.3f}) · threshold {res['threshold']:.2f} · data {res['seconds_data']:.0f} s, "
              f"training {res['seconds_train']:.0f} s")  # fmt: skip
    else:
        left = f", {len(res['left_out'])} left out by preprocessing" if res.get("left_out") else ""
        print(f"\n{res['name']}: {res['n_test']} patients the model never saw (seed {res['settings']['seed']}{left}) · "
              f"threshold {res['threshold']:.2f} · data {res['seconds_data']:.0f} s, scoring "
              f"{res['seconds_score']:.0f} s")  # fmt: skip
    print(f"  {'volume':<22}{'map':<9}{'coverage':>9}{'margin':>8}{'gain':>8}  {'95% CI':<17}{'p':>8}  "
          f"{'better/worse':>12}{'ceiling':>9}{'share':>7}")  # fmt: skip
    for r in t.itertuples():
        ceiling = getattr(r, "ceiling", float("nan"))
        share = getattr(r, "share_of_ceiling", float("nan"))
        print(f"  {r.volume:<22}{r.map:<9}{r.coverage:9.3f}{r.margin:8.3f}{r.gain:+8.3f}  "
              f"[{r.low:+.3f}, {r.high:+.3f}] {r.p:8.2g}  {r.better:>5}/{r.worse:<6}"
              f"{ceiling:+9.3f}{share:7.0%}")  # fmt: skip


def expectations(
    results: dict[str, dict], external: dict[str, dict] | None = None
) -> list[tuple[str, bool, str]]:
    out = []
    if "strong" in results:
        t = results["strong"]["summary"]
        drawn, at_k = line(t, "model CTV (as drawn)"), line(t, "model CTV")
        ceiling = float(at_k["ceiling"]) if at_k is not None else float("nan")
        out.append(("strong: the model CTV covers more than the same-volume margin (p < 0.05)",
                    drawn is not None and drawn["gain"] > 0 and drawn["p"] < 0.05,
                    f"gain {drawn['gain']:+.3f}, p = {drawn['p']:.2g}" if drawn is not None else "not run"))  # fmt: skip
        out.append(("strong: the model's gain is at least a third of the ceiling at its volume",
                    at_k is not None and np.isfinite(ceiling) and at_k["gain"] >= ceiling / 3,
                    f"top-k gain {at_k['gain']:+.3f} of ceiling {ceiling:+.3f}" if at_k is not None else "not run"))  # fmt: skip
    if "strong-null" in results:
        drawn = line(results["strong-null"]["summary"], "model CTV (as drawn)")
        ok = drawn is not None and drawn["p"] > 0.05 and abs(drawn["gain"]) < 0.01
        out.append(("strong-null: no gain over the same-volume margin (p > 0.05, |gain| < 0.01)", ok,
                    f"gain {drawn['gain']:+.3f}, p = {drawn['p']:.2g}" if drawn is not None else "not run"))  # fmt: skip
    for name, res in (external or {}).items():
        drawn = line(res["summary"], "model CTV (as drawn)")
        detail = f"gain {drawn['gain']:+.3f} [{drawn['low']:+.3f}, {drawn['high']:+.3f}], p = {drawn['p']:.2g}, {res['n_test']} patients ({int(drawn['n'])} with new progression)"
        if name == "strong":
            out.append(("strong, external patients: the model CTV covers more than the same-volume margin (p < 0.05)",
                        drawn["gain"] > 0 and drawn["p"] < 0.05, detail))  # fmt: skip
        elif name == "strong-null":
            out.append(("strong-null, external patients: no gain over the same-volume margin (p > 0.05, |gain| < 0.01)",
                        drawn["p"] > 0.05 and abs(drawn["gain"]) < 0.01, detail))  # fmt: skip
        else:
            out.append((f"{name}, external patients: measured (no expectation)", True, detail))
    if "today" in results:
        t = results["today"]["summary"]
        drawn, at_k = line(t, "model CTV (as drawn)"), line(t, "model CTV")
        out.append(("today: measured (no expectation)", True,
                    f"model CTV gain {drawn['gain']:+.3f} (p = {drawn['p']:.2g}); ceiling at its volume "
                    f"{at_k['ceiling']:+.3f}"))  # fmt: skip
    return out


def power_curve(results: dict[str, dict], path: Path, external: dict[str, dict] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in POWER if n in results]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9.6, 4.4))
    for volume, colour in (("model CTV", "C0"), ("margin 10 mm", "C1"), ("margin 20 mm", "C2")):
        model = [line(results[n]["summary"], volume) for n in names]
        g = np.array([m["gain"] if m is not None else np.nan for m in model])
        lo = np.array([m["low"] if m is not None else np.nan for m in model])
        hi = np.array([m["high"] if m is not None else np.nan for m in model])
        ceil = np.array([m["ceiling"] if m is not None else np.nan for m in model])
        ax.errorbar(x, g, yerr=[g - lo, hi - g], color=colour, marker="o", capsize=3,
                    label=f"model, top-k at the {volume} volume")  # fmt: skip
        ax.plot(x, ceil, color=colour, ls="--", marker="x", label=f"ceiling (true density) at {volume}")
    ext = [line(external[n]["summary"], "model CTV") if n in (external or {}) else None for n in names]
    if any(e is not None for e in ext):
        g = np.array([e["gain"] if e is not None else np.nan for e in ext])
        lo = np.array([e["low"] if e is not None else np.nan for e in ext])
        hi = np.array([e["high"] if e is not None else np.nan for e in ext])
        n_ext = max(external[n]["n_test"] for n in names if n in external)
        ax.errorbar(x + 0.08, g, yerr=[g - lo, hi - g], color="C0", mfc="white", marker="s", ls=":", capsize=3,
                    label=f"model, top-k at the model CTV volume, {n_ext} patients it never saw")  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, names)
    ax.set_xlabel("signal setting of the synthetic cohort")
    ax.set_ylabel("coverage gain over the same-volume margin")
    n = results[names[0]]["n_test"] if names else 0
    ax.set_title(f"Power curve: {n} test patients per cohort (95% patient-bootstrap intervals)", fontsize=9,
                 loc="left")  # fmt: skip
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=101)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--base-features", type=int, default=8)
    ap.add_argument(
        "--cohorts", nargs="+", default=["strong", "strong-null", "today"], choices=sorted(SETTINGS)
    )
    ap.add_argument("--out", type=Path, help="keep cohorts, prepared data, models and tables here")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="with --out: take a cohort finished there by an earlier run as is",
    )
    ap.add_argument(
        "--external",
        type=int,
        default=0,
        metavar="N",
        help="also score each model on N new patients of the same settings (0: none)",
    )
    ap.add_argument("--external-seed", type=int, help="the new patients' seed (default: --seed + 1)")
    ap.add_argument("--quick", action="store_true", help="40 patients, strong and strong-null, 20 epochs")
    ap.add_argument("--power", action="store_true", help="all signal settings and the power curve")
    ap.add_argument(
        "--record", action="store_true", help="also write the output to docs/results/positive_control.md"
    )
    ap.add_argument(
        "--record-as",
        choices=["positive_control", "positive_control_power", "positive_control_power_101"],
        help="the page --record writes (default: positive_control, or positive_control_power with --power)",
    )
    args = ap.parse_args()
    from record import recorded

    page = args.record_as or ("positive_control_power" if args.power else "positive_control")
    with recorded(page, args.record):
        run(args)


def run(args) -> None:
    if args.quick:
        args.patients, args.epochs, args.cohorts = 40, 20, ["strong", "strong-null"]
    if args.power:
        args.cohorts = [n for n in POWER if n in SETTINGS]

    from ctvlab.runtime import init_ray

    if args.external and args.external_seed == args.seed:
        raise SystemExit(
            f"--external-seed {args.seed} is the training cohort's seed: its patients would be the same"
        )
    root = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="ctvlab-control-"))
    root.mkdir(parents=True, exist_ok=True)
    init_ray()
    t0 = time.perf_counter()
    print(f"positive control: {args.patients} patients (seed {args.seed}) per cohort, {args.epochs} epochs at most, "
          f"{args.base_features} base features; cohorts {', '.join(args.cohorts)}; outputs in {root}")  # fmt: skip
    try:
        results, external = {}, {}
        for name in args.cohorts:
            results[name] = run_cohort(
                name,
                root,
                args.patients,
                args.seed,
                args.epochs,
                args.base_features,
                args.reuse and bool(args.out),
            )
            print_cohort(results[name])
            if args.external:
                ext_seed = args.seed + 1 if args.external_seed is None else args.external_seed
                external[name] = run_external(name, root, results[name], args.external, ext_seed,
                                              args.epochs, args.base_features)  # fmt: skip
                print_cohort(external[name])
        print()
        for text, ok, detail in expectations(results, external):
            print(f"{'ok ' if ok else 'OUT'}  {text}: {detail}")
        if args.power:
            print(f"power curve: {power_curve(results, root / 'power_curve.png', external)}")
        record = {n: {**{k: v for k, v in r.items() if k != "summary"}, "summary": r["summary"].to_dict("records")}
                  for n, r in results.items()}  # fmt: skip
        for n, r in external.items():
            record[n]["external"] = {**{k: v for k, v in r.items() if k != "summary"},
                                     "summary": r["summary"].to_dict("records")}  # fmt: skip
        (root / "positive_control.json").write_text(json.dumps(record, indent=2, default=float))
        print(f"total {time.perf_counter() - t0:.0f} s")
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
