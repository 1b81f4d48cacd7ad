"""Does the synthetic cohort carry the study's phenomenon? An independent voxel-wise check with targets.

Generates (or reuses) a normal and a `--null` cohort, resamples every map and mask to a 3 mm RAS grid
through the affines (nibabel + scipy, nothing from ctvlab.preprocess), divides each map by its median in
normal-appearing voxels, takes the brain voxels within 4 cm of the pre-RT T2L, and fits a random forest
per patient-grouped 5-fold split for the study's two targets (NAV→NEL, and NAV→CEL or NEL→CEL, each
against NAV→NAV). For both cohorts it prints the AUC of all 13 maps, of the anatomical maps, of the
distance to the pre-RT T2L alone, of anatomy + distance and of all maps + distance; early (PFS < 7 months)
and late progressors; the standard-of-care CTVs (RTOG: (CEL ∪ T2L) + 20 mm, EORTC: (CEL ∪ cavity) + 15 mm,
within the brain) against the composite progression target; then every target with ok or OUT.

    python benchmarks/synth_check.py --patients 101 --seed 0 --out /tmp/synth_check

The null cohort is the control: its diffusion and MRSI see the visible lesion only, so they must add
nothing to anatomy + distance there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

ANAT = ["nT1c", "nT1", "nFLAIR"]
FEATURES = [*ANAT, "nADC", "nFA", "nCho", "nCre", "nNAA", "nLac", "nLip", "CNI", "CCrI", "CrNI"]
MAPS = {
    "nT1c": "t1c", "nT1": "t1", "nFLAIR": "flair", "nADC": "adc", "nFA": "fa", "nCho": "cho", "nCre": "cre",
    "nNAA": "naa", "nLac": "lac", "nLip": "lip", "CNI": "cni", "CCrI": "ccri", "CrNI": "crni",
}  # fmt: skip
MASKS = ["brain_mask", "cel_mask", "t2l_mask", "cavity_mask", "ventricles_mask", "cel_progression_mask",
         "t2l_progression_mask"]  # fmt: skip
VOXEL_MM = 3.0
RING_MM = 40.0


def target_grid(brain_img: nib.Nifti1Image) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A 3 mm RAS grid covering the brain's world bounding box."""
    idx = np.argwhere(np.asarray(brain_img.dataobj) > 0)
    corners = np.array(np.meshgrid(*[[idx[:, a].min(), idx[:, a].max()] for a in range(3)], indexing="ij"))
    corners = corners.reshape(3, -1).T
    world = corners @ brain_img.affine[:3, :3].T + brain_img.affine[:3, 3]
    lo, hi = world.min(0) - 6, world.max(0) + 6
    shape = tuple(int(np.ceil((b - a) / VOXEL_MM)) + 1 for a, b in zip(lo, hi, strict=True))
    aff = np.diag([VOXEL_MM] * 3 + [1.0])
    aff[:3, 3] = lo
    return aff, shape


def resample(img: nib.Nifti1Image, aff: np.ndarray, shape, order: int = 1, cval: float = 0.0) -> np.ndarray:
    m = np.linalg.inv(img.affine) @ aff
    data = np.asarray(img.dataobj, dtype=np.float32)
    return ndi.affine_transform(
        np.nan_to_num(data), m[:3, :3], m[:3, 3], output_shape=shape, order=order, cval=cval, mode="constant"
    )


def patient_table(root: Path, row) -> dict[str, np.ndarray] | None:
    paths = row.paths(root)
    brain_img = nib.load(paths["brain_mask"])
    aff, shape = target_grid(brain_img)
    m = {k: resample(nib.load(paths[k]), aff, shape) >= 0.5 for k in MASKS}
    brain = m["brain_mask"]
    nav = brain & ~m["cavity_mask"] & ~m["ventricles_mask"] & ~m["t2l_mask"] & ~m["cel_mask"]
    nel = m["t2l_mask"] & ~m["cel_mask"]
    if not m["t2l_mask"].any():
        return None
    dist = ndi.distance_transform_edt(~m["t2l_mask"], sampling=VOXEL_MM)
    ring = brain & (dist <= RING_MM)
    feats = {}
    coverage = np.zeros(shape, dtype=bool)
    for f, col in MAPS.items():
        if col not in paths:
            feats[f] = np.full(shape, 0.0 if f[0] != "n" else 1.0, dtype=np.float32)
            continue
        img = nib.load(paths[col])
        v = resample(img, aff, shape)
        if col in ("cho", "cre", "naa", "lac", "lip", "cni", "ccri", "crni"):
            inside = resample(nib.Nifti1Image(np.isfinite(np.asarray(img.dataobj, np.float32)).astype(np.float32),
                                              img.affine), aff, shape, order=0) > 0.5  # fmt: skip
            coverage = inside
        else:
            inside = brain
        if f.startswith("n"):
            ref = np.median(v[nav & inside]) if (nav & inside).sum() > 20 else 1.0
            v = v / ref if ref else v
            v[~inside] = 1.0
        else:
            v[~inside] = 0.0
        feats[f] = v
    stable = ring & nav & ~m["t2l_progression_mask"] & ~m["cel_progression_mask"]
    nav_nel = ring & nav & m["t2l_progression_mask"] & ~m["cel_progression_mask"]
    cel_prog = ring & ((nav & m["cel_progression_mask"]) | (nel & m["cel_progression_mask"] & ~m["cel_mask"]))
    sel = stable | nav_nel | cel_prog
    return {
        "X": np.stack([feats[f][sel] for f in FEATURES] + [dist[sel]], 1),  # the last column: distance
        "y_nel": np.where(nav_nel[sel], 1, np.where(stable[sel], 0, -1)),
        "y_cel": np.where(cel_prog[sel], 1, np.where(stable[sel], 0, -1)),
        "dist": dist[sel],
        "mrsi": coverage[sel],
        "pfs": np.full(sel.sum(), row.pfs_months),
    }


def load_cohort(root: Path) -> list[dict]:
    from ctvlab.ingest.manifest import read_manifest

    rows, problems, _ = read_manifest(root)
    assert not problems, problems
    tables = []
    for r in rows:
        t = patient_table(root, r)
        if t is not None:
            t["pid"] = r.patient_id
            tables.append(t)
    return tables


def cv_auc(
    tables: list[dict], target: str, features: list[str], seed: int = 0
) -> tuple[float, float, np.ndarray]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import roc_auc_score

    cols = [[*FEATURES, "dist"].index(f) for f in features]
    rng = np.random.default_rng(seed)
    rng.permutation(len(tables))  # the draw `folds_of` makes, so that the subsampling below stays
    folds = folds_of(len(tables), seed)
    aucs, importances = [], np.zeros(len(features))
    for k in range(5):
        test = [tables[i] for i in folds[k]]
        train = [tables[i] for j in range(5) if j != k for i in folds[j]]

        def stack(ts, sub):
            xs, ys = [], []
            for t in ts:
                keep = t[target] >= 0
                x, y = t["X"][keep][:, cols], t[target][keep]
                # bound the cost: training keeps every progressed voxel and up to 1500 stable ones per
                # patient; testing a random 6000 voxels per patient (unbiased for the AUC)
                if sub:
                    neg = np.flatnonzero(y == 0)
                    drop = rng.choice(neg, max(len(neg) - 1500, 0), replace=False)
                    pick = np.setdiff1d(np.arange(len(y)), drop)
                else:
                    pick = rng.choice(len(y), min(len(y), 6000), replace=False)
                x, y = x[pick], y[pick]
                xs.append(x)
                ys.append(y)
            return np.concatenate(xs), np.concatenate(ys)

        xtr, ytr = stack(train, True)
        xte, yte = stack(test, False)
        if len(np.unique(yte)) < 2 or len(np.unique(ytr)) < 2:
            continue
        rf = RandomForestClassifier(
            n_estimators=60, max_depth=10, min_samples_leaf=5, class_weight="balanced", max_samples=0.3,
            n_jobs=2, random_state=seed,
        )  # fmt: skip
        rf.fit(xtr, ytr)
        aucs.append(roc_auc_score(yte, rf.predict_proba(xte)[:, 1]))
        importances += rf.feature_importances_
    return float(np.mean(aucs)), float(np.std(aucs)), importances / max(len(aucs), 1)


def folds_of(n: int, seed: int = 0) -> list[np.ndarray]:
    """The five patient folds every score here is measured on."""
    return np.array_split(np.random.default_rng(seed).permutation(n), 5)


def distance_auc(tables: list[dict], target: str, seed: int = 0) -> float:
    """AUC of "closer to the pre-RT T2L is likelier to progress", measured like the forests: pooled over
    each fold's test patients, averaged over the folds (a pooled AUC over all patients at once is lower,
    since patients differ in how far they recur: comparing it with the forests' would flatter them)."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for fold in folds_of(len(tables), seed):
        y = np.concatenate([tables[i][target][tables[i][target] >= 0] for i in fold])
        d = np.concatenate([tables[i]["dist"][tables[i][target] >= 0] for i in fold])
        if len(np.unique(y)) == 2:
            aucs.append(roc_auc_score(y, -d))
    return float(np.mean(aucs))


def margin_ctv(region: np.ndarray, brain: np.ndarray, margin_mm: float) -> np.ndarray:
    return (ndi.distance_transform_edt(~region, sampling=VOXEL_MM) <= margin_mm) & brain


def soc_ctvs(root: Path, row) -> dict[str, tuple[float, float]]:
    """(sensitivity, specificity) of the RTOG and EORTC CTVs against the composite progression target."""
    paths = row.paths(root)
    brain_img = nib.load(paths["brain_mask"])
    aff, shape = target_grid(brain_img)
    m = {k: resample(nib.load(paths[k]), aff, shape) >= 0.5 for k in MASKS}
    brain = m["brain_mask"]
    target = (m["cel_progression_mask"] | m["t2l_progression_mask"]) & brain
    out = {}
    ctvs = {"rtog": margin_ctv(m["cel_mask"] | m["t2l_mask"], brain, 20.0),
            "eortc": margin_ctv(m["cel_mask"] | m["cavity_mask"], brain, 15.0)}  # fmt: skip
    for name, ctv in ctvs.items():
        sens = (ctv & target).sum() / max(target.sum(), 1)
        spec = 1.0 - (ctv & ~target).sum() / max((brain & ~target).sum(), 1)
        out[name] = (float(sens), float(spec))
    return out


def covered(tables: list[dict]) -> list[dict]:
    """The voxels that have all 13 maps (inside the PRESS box), of the patients that have any."""
    out = []
    for t in tables:
        k = t["mrsi"]
        if k.sum() >= 50:
            out.append(
                {**{x: t[x][k] for x in ("X", "y_nel", "y_cel", "dist", "mrsi", "pfs")}, "pid": t["pid"]}
            )
    return out


def measure(tables: list[dict]) -> dict[str, float]:
    """Every AUC the targets need, for one cohort: on every ring voxel (MRSI outside the PRESS box set to
    normal) and on the voxels with all 13 maps ("covered": the study's voxels)."""
    out: dict[str, float] = {}
    with_dist = ["dist"]
    for view, ts in (("", tables), ("cov_", covered(tables))):
        for target in ("y_cel", "y_nel"):
            t = view + target[2:]
            out[f"{t}_all"] = cv_auc(ts, target, FEATURES)[0]
            out[f"{t}_anat"] = cv_auc(ts, target, ANAT)[0]
            out[f"{t}_distance"] = distance_auc(ts, target)
            out[f"{t}_anat_dist"] = cv_auc(ts, target, ANAT + with_dist)[0]
            out[f"{t}_all_dist"] = cv_auc(ts, target, FEATURES + with_dist)[0]
            early = [x for x in ts if x["pfs"][0] < 7]
            late = [x for x in ts if x["pfs"][0] >= 7]
            out[f"{t}_early"] = cv_auc(early, target, FEATURES)[0] if len(early) >= 5 else float("nan")
            out[f"{t}_late"] = cv_auc(late, target, FEATURES)[0] if len(late) >= 5 else float("nan")
    return out


def print_cohort(name: str, r: dict[str, float]) -> None:
    print(f"\n== {name}")
    print("target | voxels | all | anat | distance | anat+dist | all+dist | early | late")
    for view, label in (("", "every ring voxel"), ("cov_", "with MRSI (13 maps)")):
        for t in ("cel", "nel"):
            print(f"{t.upper():6s} | {label} | " + " | ".join(f"{r[f'{view}{t}_{k}']:.3f}" for k in
                  ("all", "anat", "distance", "anat_dist", "all_dist", "early", "late")))  # fmt: skip


def check_targets(
    normal: dict[str, float], null: dict[str, float], soc: dict[str, tuple[float, float]]
) -> int:
    """Print each target of the synthetic cohort with ok/OUT; the number OUT."""
    rows = []
    for t in ("cel", "nel"):
        rows.append(
            (
                f"{t.upper()}: all maps ≥ distance + 0.02 (voxels with MRSI)",
                normal[f"cov_{t}_all"] - normal[f"cov_{t}_distance"],
                0.02,
                None,
            )
        )
    rows.append(("NEL: diffusion+MRSI add to anatomy+distance (normal, voxels with MRSI) ≥ 0.03",
                 normal["cov_nel_all_dist"] - normal["cov_nel_anat_dist"], 0.03, None))  # fmt: skip
    for t in ("cel", "nel"):
        rows.append((f"{t.upper()}: diffusion+MRSI add nothing on the null cohort ≤ 0.01 (voxels with MRSI)",
                     null[f"cov_{t}_all_dist"] - null[f"cov_{t}_anat_dist"], None, 0.01))  # fmt: skip
    rows.append(
        (
            "CEL: early − late ≥ 0.08 (voxels with MRSI)",
            normal["cov_cel_early"] - normal["cov_cel_late"],
            0.08,
            None,
        )
    )
    rows.append(("RTOG sensitivity ≥ 0.88", soc["rtog"][0], 0.88, None))
    rows.append(("RTOG specificity 0.72–0.86", soc["rtog"][1], 0.72, 0.86))
    rows.append(("EORTC sensitivity 0.64–0.84", soc["eortc"][0], 0.64, 0.84))
    rows.append(("EORTC specificity 0.87–0.96", soc["eortc"][1], 0.87, 0.96))
    out = 0
    print("\n== targets")
    for label, value, lo, hi in rows:
        ok = (lo is None or value >= lo) and (hi is None or value <= hi)
        out += not ok
        print(f"{'ok ' if ok else 'OUT'} {label}: {value:+.3f}" if "add" in label or "−" in label or "≥ distance" in label
              else f"{'ok ' if ok else 'OUT'} {label}: {value:.3f}")  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=101)
    p.add_argument("--out", type=Path, default=Path("/tmp/synth_check"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    from ctvlab.config import SynthConfig
    from ctvlab.ingest.manifest import read_manifest
    from ctvlab.synth.cohort import generate_cohort
    from ctvlab.synth.table1 import cohort_report, compare_to_study

    results = {}
    for null in (False, True):
        root = args.out / ("null" if null else "normal")
        cfg = SynthConfig(n_patients=args.patients, seed=args.seed, null=null, num_workers=args.workers)
        if not (root / "manifest.csv").exists():
            t = time.time()
            generate_cohort(root, cfg, progress=False)
            print(f"generated {root} in {time.time() - t:.0f} s")
        results[null] = measure(load_cohort(root))
        print_cohort("null cohort" if null else "normal cohort", results[null])
    root = args.out / "normal"
    rows, _, _ = read_manifest(root)
    per = [soc_ctvs(root, r) for r in rows]
    soc = {
        k: (float(np.mean([x[k][0] for x in per])), float(np.mean([x[k][1] for x in per])))
        for k in ("rtog", "eortc")
    }
    print(f"\nSOC CTVs (normal cohort, {len(per)} patients): RTOG sensitivity {soc['rtog'][0]:.3f} specificity "
          f"{soc['rtog'][1]:.3f}; EORTC sensitivity {soc['eortc'][0]:.3f} specificity {soc['eortc'][1]:.3f}")  # fmt: skip
    problems = compare_to_study(cohort_report(root))
    print("Table 1 and recurrence pattern: " + ("within tolerance" if not problems else "; ".join(problems)))
    n_out = check_targets(results[False], results[True], soc) + bool(problems)
    print(f"\n{n_out} target(s) OUT")


if __name__ == "__main__":
    main()
