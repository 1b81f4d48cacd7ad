"""The ceiling of any imaging model on the synthetic cohort: the TRUE pre-RT tumour density against the
distance to the pre-RT T2L, as predictors of where the tumour progresses (T2L growth), on the simulation's
own grid (no images, no noise, no registration error).

No map can tell more about progression than the density it is computed from, so if the true density does
not beat the distance here, no imaging model can on the generated images. Per patient and pooled over
patients (the voxel models are pooled: they must compare voxels of different patients), over the
normal-appearing cells within 4 cm of the T2L.

    python benchmarks/synth_oracle.py --patients 30 --seed 0
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage as ndi
from sklearn.metrics import roc_auc_score

from ctvlab.config import SynthConfig
from ctvlab.synth.anatomy import growth_grid
from ctvlab.synth.clinical import draw_cohort
from ctvlab.synth.patient import patient_streams, template_units
from ctvlab.synth.tumour import pre_rt_regions, simulate_tumour

RING_MM = 40.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    plans = draw_cohort(SynthConfig(n_patients=max(args.patients, 1), seed=args.seed))
    grid = growth_grid(3.0)
    ys, dists, dens, per = [], [], [], []
    for plan in plans:
        spec = template_units(plan.tumour, plan.brain_scale)
        course = simulate_tumour(spec, grid, patient_streams(args.seed, plan.index)["tumour"])
        pre = pre_rt_regions(course.u_pre, course.depth_mm, spec, course.gtr_density, course.oedema)
        dist = ndi.distance_transform_edt(~pre["t2l"], sampling=grid.spacing)
        nav = (grid.brain >= 0.5) & ~pre["t2l"] & ~pre["cavity"] & (dist <= RING_MM)
        y = (course.u_prog >= spec.t2l_density)[nav]
        ys.append(y)
        dists.append(-dist[nav])
        dens.append(course.u_pre[nav])
        if 0 < y.sum() < y.size:
            per.append((roc_auc_score(y, -dist[nav]), roc_auc_score(y, course.u_pre[nav])))
    y = np.concatenate(ys)
    pooled = (roc_auc_score(y, np.concatenate(dists)), roc_auc_score(y, np.concatenate(dens)))
    print(f"{len(plans)} patients ({len(per)} with tumour newly visible outside the T2L), seed {args.seed}")
    print(f"pooled AUC      distance {pooled[0]:.3f}  true pre-RT density {pooled[1]:.3f}")
    print(f"per-patient AUC distance {np.mean([a for a, _ in per]):.3f}  true pre-RT density "
          f"{np.mean([b for _, b in per]):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
