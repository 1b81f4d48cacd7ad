"""How well does `ctvlab register` bring follow-up masks back onto the pre-RT grid? Synthetic truth.

Writes `--patients` pre-RT patients on the MNI152 anatomy and their follow-ups in their own space
(`ctvlab.synth.followup`: a rigid move of `--rotation` degrees about a random axis and about 8 mm, a smooth
deformation of up to 3 mm, a grown resection cavity, an enhancing progression), registers each follow-up
back with the command's defaults, and prints per patient: the Dice of each registered progression mask
against the truth, the median and largest landmark error (mm, landmarks in the brain away from the
changes) before and after, the NMI inside the brain before and after, and the seconds taken. Then the NMI
that two deliberately failed follow-ups reach (turned 90 degrees with the header left as it was; another
anatomy: the follow-up's content replaced by smoothed noise), which the refusal floor `MIN_NMI` must
separate from the registered ones.

    python benchmarks/register_accuracy.py --patients 3 --spacing 2.5 --out /tmp/register_accuracy
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ctvlab.ingest import followup as F
from ctvlab.synth.followup import FollowupSpec, write_followup, write_pre_rt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=3)
    ap.add_argument("--spacing", type=float, default=2.5, help="voxel size of both scans, mm")
    ap.add_argument("--rotation", type=float, default=5.0, help="degrees")
    ap.add_argument("--out", type=Path, default=Path("/tmp/register_accuracy"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    root, truth = args.out / "cohort", args.out / "truth"
    settings = F.Settings()
    print(f"SimpleITK Euler3D -> affine -> B-spline ({settings.mesh_mm:.0f} mm), {args.spacing} mm voxels")
    print("patient  Dice CEL  Dice T2L  landmarks median/max mm (before)  NMI before -> after  seconds")
    dices, medians, seconds = [], [], []
    rows = []
    for i in range(args.patients):
        pid = f"S{i:02d}"
        row = write_pre_rt(root, pid, truth, spacing_mm=args.spacing)
        rows.append(row)
        shift = tuple(np.random.default_rng(100 + i).uniform(-8, 8, 3))
        spec = FollowupSpec(spacing_mm=args.spacing, rotation_deg=args.rotation, shift_mm=shift, seed=i)
        lm = write_followup(root, row, truth, spec)
        exclude = F.pre_rt_exclusions(root, row)
        start = time.perf_counter()
        tr, masks, sc = F.register_patient(
            root / row.t1c,
            root / row.brain_mask,
            exclude,
            F.find_followup(root, row.t1c),
            settings,
            min_nmi=0,
        )
        sec = time.perf_counter() - start
        d = [
            F.dice(masks[c], np.asarray(nib.load(truth / pid / f"{c}.nii.gz").dataobj) > 0)
            for c in F.MASK_NAMES
        ]
        err = np.linalg.norm(F.map_points_ras(tr, lm["pre_rt"]) - lm["followup"], axis=1)
        err0 = np.linalg.norm(lm["pre_rt"] - lm["followup"], axis=1)
        print(
            f"{pid}      {d[0]:.3f}     {d[1]:.3f}     {np.median(err):.2f} / {err.max():.2f} ({np.median(err0):.1f})"
            f"               {sc['nmi_before']:.3f} -> {sc['nmi_after']:.3f}      {sec:.0f}"
        )
        dices += d
        medians.append(np.median(err))
        seconds.append(sec)
    print(
        f"all: Dice min {min(dices):.3f}, median landmark error max {max(medians):.2f} mm, "
        f"{np.mean(seconds):.0f} s per patient"
    )

    # deliberately failed follow-ups: what NMI a registration that cannot succeed ends at
    row = rows[0]
    fu = root / row.t1c.replace("t1c.nii.gz", "followup/t1c.nii.gz")
    good = nib.load(fu)
    data = np.asarray(good.dataobj)
    noise = ndi.gaussian_filter(np.random.default_rng(0).random(data.shape), 2.0) * (data > 0.05)
    for name, bad in (("turned 90 degrees", np.rot90(data, axes=(0, 2)).copy()), ("smoothed noise", noise)):
        nib.save(nib.Nifti1Image(bad.astype(np.float32), good.affine), fu)
        exclude = F.pre_rt_exclusions(root, row)
        _, _, sc = F.register_patient(
            root / row.t1c,
            root / row.brain_mask,
            exclude,
            F.find_followup(root, row.t1c),
            settings,
            min_nmi=0,
        )
        print(
            f"failed ({name}): NMI {sc['nmi_before']:.3f} -> {sc['nmi_after']:.3f} (refused below {F.MIN_NMI})"
        )
    nib.save(good, fu)


if __name__ == "__main__":
    main()
