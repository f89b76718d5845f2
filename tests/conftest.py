from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global RNG state and 2 threads (CI's cores)."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
