"""Preprocessing (`ctvlab preprocess`): a raw cohort in, a prepared dataset out (see `ctvlab.data.layout`).

In pipeline order:
    grid.py       the 3 mm RAS reference grid over the brain; resampling through the affines
    regions.py    NEL, NAV, the 4 cm ring, the U-Net target, the voxel categories
    normalize.py  division by the NAV mode (nT1c … nLip); CNI, CCrI, CrNI kept as they are
    prepare.py    one patient end to end, atomic writes, input and settings hashes
    ray_pipeline.py  the Ray Data pipeline over the validated cohort, the report, dataset.json
"""
