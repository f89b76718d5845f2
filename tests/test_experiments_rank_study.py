"""The rank study's plan: equal token budgets, spectra at comparable points, resumable runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments import rank_study


@pytest.mark.parametrize("budget", sorted(rank_study.BUDGETS))
def test_every_batch_size_sees_the_same_tokens_in_fewer_steps(budget: str, tmp_path: Path) -> None:
    runs = rank_study.runs(budget)
    assert sorted(r.multiplier for r in runs) == [1, 4, 16]
    tokens = {r.steps * r.multiplier * rank_study.MICRO_BATCH * rank_study.SEQ_LEN for r in runs}
    assert tokens == {runs[0].tokens}
    assert runs[0].tokens >= (3_000_000 if budget == "long" else 1_000_000)
    for run in runs:
        cmd = run.command(tmp_path, threads=1)
        assert cmd[cmd.index("--grad-accum") + 1] == str(run.multiplier)
        assert "--resume" in cmd and "--spectrum-ema" in cmd
        every = int(cmd[cmd.index("--spectrum-every") + 1])
        assert rank_study.POINTS <= run.steps // every <= 1.1 * rank_study.POINTS
