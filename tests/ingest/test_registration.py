"""The registration check's similarity equals scikit-learn's normalised mutual information."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from ctvlab.ingest.registration import _labels, _nmi


def _cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=4000)
    yield "independent", x, rng.normal(size=4000)
    yield "related", x, np.exp(x) + 0.3 * rng.normal(size=4000)
    yield "identical", x, x.copy()
    yield "one constant", x, np.full(4000, 7.0)
    yield "both constant", np.zeros(500), np.ones(500)
    yield "piecewise", np.repeat([0.0, 1.0, 5.0], 300), np.tile([2.0, 3.0, 4.0], 300)
    yield "heavy tails", rng.standard_cauchy(3000), rng.standard_cauchy(3000)


@pytest.mark.parametrize(("what", "a", "b"), list(_cases()), ids=[c[0] for c in _cases()])
def test_nmi_equals_scikit_learns(what, a, b):
    expected = normalized_mutual_info_score(_labels(a), _labels(b))
    assert _nmi(a, b) == pytest.approx(expected, abs=1e-12), what
