"""ANTsPy's SyN on the same synthetic follow-ups as `register_accuracy.py`: the measurement behind the library.

Reads the cohort and truth that `benchmarks/register_accuracy.py --out DIR` wrote and registers each
follow-up with `ants.registration(type_of_transform="SyN")` (rigid, affine, then SyN), with the same
metric masks as `ctvlab register` (the pre-RT brain less the lesions and cavity grown by 5 mm; the
follow-up less its lesion mask grown by 5 mm). Prints the Dice of each progression mask (linear
interpolation cut at 0.5, as ctvlab does), the median and largest landmark error (mm) and the seconds.

antspyx 0.6.3 requires numpy < 2.4 and scipy < 1.16, which ctvlab's own pins exclude, so it is not a
dependency: install it into a folder of its own and put that folder after ctvlab's environment on the path.

    pip install --target /tmp/antslib antspyx==0.6.3
    python benchmarks/register_accuracy.py --patients 3 --spacing 2.5 --out /tmp/register_accuracy
    python benchmarks/register_ants.py --antspy /tmp/antslib --out /tmp/register_accuracy
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ctvlab.ingest import followup as F

LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS: ANTs' points are LPS


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj) > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--antspy", type=Path, help="folder antspyx was installed into (searched last)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/register_accuracy"))
    args = ap.parse_args()
    if args.antspy:
        sys.path.append(str(args.antspy))
    import ants
    import pandas as pd

    root, truth = args.out / "cohort", args.out / "truth"
    print(f"ANTsPy {ants.__version__} SyN")
    print("patient  Dice CEL  Dice T2L  landmarks median/max mm  seconds")
    for pid in sorted(p.name for p in truth.iterdir()):
        fixed = ants.image_read(str(root / pid / "t1c.nii.gz"))
        moving = ants.image_read(str(root / pid / "followup" / "t1c.nii.gz"))
        spacing = fixed.spacing
        lesions = _array(root / pid / "t2l_mask.nii.gz") | _array(root / pid / "cel_mask.nii.gz")
        lesions |= _array(root / pid / "cavity_mask.nii.gz")
        keep = _array(root / pid / "brain_mask.nii.gz") & (
            ndi.distance_transform_edt(~lesions, sampling=spacing) > F.EXCLUDE_MM
        )
        changed = _array(root / pid / "followup" / "lesion_mask.nii.gz")
        moving_keep = ndi.distance_transform_edt(~changed, sampling=moving.spacing) > F.EXCLUDE_MM
        start = time.perf_counter()
        reg = ants.registration(
            fixed,
            moving,
            type_of_transform="SyN",
            mask=fixed.new_image_like(keep.astype("float32")),
            moving_mask=moving.new_image_like(moving_keep.astype("float32")),
            random_seed=1,
        )
        seconds = time.perf_counter() - start
        dice = []
        for column in F.MASK_NAMES:
            mask = ants.image_read(str(root / pid / "followup" / f"{column}.nii.gz")).astype("float32")
            moved = (
                ants.apply_transforms(fixed, mask, reg["fwdtransforms"], interpolator="linear").numpy() >= 0.5
            )
            dice.append(F.dice(moved, _array(truth / pid / f"{column}.nii.gz")))
        lm = np.load(truth / pid / "landmarks.npz")
        # the image transforms (fixed -> moving points, as ITK's) carry pre-RT points to the follow-up
        pts = pd.DataFrame(lm["pre_rt"] * LPS, columns=["x", "y", "z"])
        out = ants.apply_transforms_to_points(3, pts, reg["fwdtransforms"])[["x", "y", "z"]].to_numpy() * LPS
        err = np.linalg.norm(out - lm["followup"], axis=1)
        print(
            f"{pid}      {dice[0]:.3f}     {dice[1]:.3f}     {np.median(err):.2f} / {err.max():.2f}               {seconds:.0f}"
        )


if __name__ == "__main__":
    main()
