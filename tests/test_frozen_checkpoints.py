"""Checkpoints written by an earlier adarank load into today's optimizer and resume as that
code resumed (``fixtures/frozen_states_v0.pt``, written by ``fixtures/make_frozen_states.py``
on main at 2d6fe0e, before the optimizer core was restructured).

Tolerance: |Δ| ≤ 2e-6 + 1e-5·|w| on the parameters, ranks exact. The fixture was written on
the CPU by the same kernels (the one-matrix path's single-tensor kernel, the fast path's
multi-tensor kernel) in the same order, so on the CPU that wrote it a resumed run reproduces
the saved parameters bit for bit; on another CPU the BLAS and LAPACK kernels (chosen by
micro-architecture) round differently, by up to ~5e-7 after these steps (seen on an AMD
EPYC). A resume on one machine is bit-identical (``test_optimizer_state``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
FROZEN = torch.load(FIXTURES / "frozen_states_v0.pt", weights_only=True)
CONFIG_NAMES = [k for k, v in FROZEN.items() if isinstance(v, dict)]


def _maker():
    spec = importlib.util.spec_from_file_location(
        "make_frozen_states", FIXTURES / "make_frozen_states.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_frozen_checkpoint_resumes_as_the_code_that_wrote_it(name):
    entry = FROZEN[name]
    maker = _maker()
    params, opt = maker.build(entry["class"], entry["options"], entry["params"])
    opt.load_state_dict(entry["state_dict"])
    for grads in entry["grads"]:
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()
    for n, p in params.items():
        torch.testing.assert_close(
            p.detach(), entry["params_after"][n], rtol=1e-5, atol=2e-6, msg=n
        )
    assert opt.ranks() == entry["ranks_after"]
