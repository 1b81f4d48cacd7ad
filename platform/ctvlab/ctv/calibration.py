"""Is the network's voxel probability a probability? Reliability table and expected calibration error.

Over the evaluated patients' voxels in the region the network sees (brain within the analysis ring), the
predicted probability is binned (10 equal-width bins by default); in each bin the mean prediction
(confidence) is set against the share of voxels that are target (frequency). A calibrated map lies on the
diagonal. The expected calibration error is Σ_b (n_b / N)·|frequency_b − confidence_b| (Naeini et al.
2015; Guo et al. 2017). Counts are accumulated patient by patient (`ReliabilityCounts.add`), so no voxel
array is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ReliabilityCounts"]


@dataclass
class ReliabilityCounts:
    """Per-bin voxel counts, summed predictions and summed outcomes over patients."""

    bins: int = 10
    n: np.ndarray = field(init=False)
    sum_prob: np.ndarray = field(init=False)
    sum_target: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.n = np.zeros(self.bins, dtype=np.int64)
        self.sum_prob = np.zeros(self.bins)
        self.sum_target = np.zeros(self.bins)

    def add(self, prob: np.ndarray, target: np.ndarray, region: np.ndarray) -> None:
        """Count one patient's voxels of `region` (prob in [0, 1], target binary)."""
        region = np.asarray(region, dtype=bool)
        p = np.clip(np.asarray(prob, dtype=np.float64)[region], 0.0, 1.0)
        t = np.asarray(target, dtype=bool)[region]
        b = np.minimum((p * self.bins).astype(int), self.bins - 1)  # probability 1.0 in the last bin
        self.n += np.bincount(b, minlength=self.bins)
        self.sum_prob += np.bincount(b, weights=p, minlength=self.bins)
        self.sum_target += np.bincount(b, weights=t.astype(float), minlength=self.bins)

    def table(self):
        """One row per bin: lower and upper edge, voxels, mean prediction, share that is target."""
        import pandas as pd

        edges = np.linspace(0.0, 1.0, self.bins + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return pd.DataFrame({"low": edges[:-1], "high": edges[1:], "n": self.n,
                                 "confidence": self.sum_prob / self.n, "frequency": self.sum_target / self.n})  # fmt: skip

    def ece(self) -> float:
        """Expected calibration error over the counted voxels (NaN without any)."""
        total = int(self.n.sum())
        if total == 0:
            return float("nan")
        used = self.n > 0
        gap = np.abs(self.sum_target[used] / self.n[used] - self.sum_prob[used] / self.n[used])
        return float(np.sum(self.n[used] / total * gap))
