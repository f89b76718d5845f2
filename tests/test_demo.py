"""experiments.demo: what it prints and what it leaves on disk (about 40 s: marked slow)."""

from __future__ import annotations

import pytest

from experiments import demo

pytest.importorskip("tokenizers", reason="needs the experiments extra")


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True])
def test_demo_deletes_its_checkpoints_and_prints_no_shared_peak_memory(tmp_path, capsys, keep):
    out = tmp_path / "demo"
    flags = ["--keep-checkpoints"] if keep else []
    argv = ["--steps", "2", "--model", "tiny", "--out", str(out), "--no-progress", *flags]
    assert demo.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    kept = sorted(p.parent.name for p in out.rglob("ckpt.pt"))
    assert kept == (["adamw", "adarank"] if keep else [])
    header = next(line for line in lines if "peak memory MiB" in line)
    column = header.split("|").index(" peak memory MiB ")
    rows = [line for line in lines if line.startswith(("| adamw ", "| adarank "))]
    assert len(rows) == 2
    assert all(row.split("|")[column].strip() == "-" for row in rows)
