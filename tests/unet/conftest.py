"""One torch thread per test: the volumes are tiny, and on a shared 2-core machine two threads spin
against each other and run ten times slower."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
