"""Stage drivers: each runs one step of the study and records it in MLflow, joining the libraries below
(splits, voxel models, statistics, the U-Net, CTVs) to tracking. The CLI, the jobs and `ctvlab run` call
them; nothing below this package imports it.

- `analysis`: split, voxel-model cross-validation, voxel statistics;
- `evaluate`: the model CTV against the RTOG and EORTC CTVs on held-out patients;
- `predict`: a trained model applied to new patients.
"""
