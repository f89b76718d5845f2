"""``python -m paper_figures`` on the tiny committed fixture runs (tests/fixtures/runs/tiny_*).

The fixtures come from ``python -m experiments.pretrain --model tiny --steps 12 --optimizer
{adamw,galore,adarank} --out tests/fixtures/runs/tiny_{opt} --eval-every 4 --spectrum-every 4
--threads 1 --max-works 3 --no-progress`` with ``ckpt.pt`` deleted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from paper_figures.build import END, FIGURES, START, main

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "tests" / "fixtures" / "runs.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paper_figures", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _outputs(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The entry point run once, as a user would, into a fresh directory."""
    out = tmp_path_factory.mktemp("figures")
    result = _run_command("--runs", str(RUNS), "--out", str(out), "--no-readme")
    assert result.returncode == 0, result.stderr
    return out


def _fixture_copy(tmp_path: Path) -> Path:
    """The fixture runs copied under tmp_path with a runs file of absolute paths; returns it."""
    spec = json.loads(RUNS.read_text())
    copied = {}
    for name, runs in spec.items():
        copied[name] = {}
        for key, source in runs.items():
            target = tmp_path / "runs" / Path(source).name
            shutil.copytree(REPO / source, target)
            copied[name][key] = str(target)
    runs_file = tmp_path / "runs.json"
    runs_file.write_text(json.dumps(copied))
    return runs_file


def test_every_figure_is_a_png_and_results_hold_the_table(built: Path) -> None:
    names = json.loads(RUNS.read_text())
    for comparison in names:
        for figure in FIGURES:
            path = built / comparison / f"{figure.NAME}.png"
            assert path.is_file(), path
            assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    results = (built / "results.md").read_text()
    assert "| run | optimizer | val ppl |" in results
    for run in ("tiny_adamw", "tiny_galore", "tiny_adarank"):
        assert f"| {run} |" in results
    assert "state / AdamW" in results and "| AdamW | " in results
    assert f"](tiny/{FIGURES[0].NAME}.png)" in results


def test_second_build_is_byte_identical(built: Path, tmp_path: Path) -> None:
    # In-process this time, into another folder: neither the process nor the path may leak in.
    assert main(["--runs", str(RUNS), "--out", str(tmp_path), "--no-readme"]) == 0
    first, second = _outputs(built), _outputs(tmp_path)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two builds"


def test_readme_section_between_markers_is_replaced(tmp_path: Path) -> None:
    readme = tmp_path / "docs" / "README.md"
    readme.parent.mkdir()
    before, after = "# project\n\nIntro.\n\n## Results\n", "\n## Next section\n\nKept.\n"
    readme.write_text(f"{before}{START}\nhand-typed numbers\n{END}{after}")
    out = tmp_path / "figures"
    # No study results here: this test is about the comparisons' section and its links.
    none = str(tmp_path / "none")
    no_studies = ["--sweep-root", none, "--rank-study-root", none, "--budget-root", none]
    no_studies += ["--genre-root", none]
    assert main(["--runs", str(RUNS), "--out", str(out), "--readme", str(readme), *no_studies]) == 0
    text = readme.read_text()
    assert text.startswith(before + START) and text.endswith(END + after)
    section = text[text.index(START) : text.index(END)]
    assert "hand-typed numbers" not in section
    assert "| tiny_adarank | adarank |" in section
    images = [line for line in section.splitlines() if line.startswith("![")]
    links = [line[line.index("](") + 2 : -1] for line in images]
    assert len(links) == len(FIGURES)
    for link in links:  # relative to the README's folder, and pointing at the figures
        assert not Path(link).is_absolute()
        assert (readme.parent / link).resolve().read_bytes()[:8] == PNG_SIGNATURE
    # A second build leaves the README as it is (one figure redrawn is enough to show it).
    assert (
        main(
            [
                "--runs",
                str(RUNS),
                "--out",
                str(out),
                "--readme",
                str(readme),
                "--figure",
                "memory",
                *no_studies,
            ]
        )
        == 0
    )
    assert readme.read_text() == text


def test_readme_without_markers_fails_before_drawing(tmp_path: Path, capsys) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nNo markers here.\n")
    out = tmp_path / "figures"
    assert main(["--runs", str(RUNS), "--out", str(out), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and START in err and "README.md" in err
    assert not out.exists()
    assert readme.read_text() == "# project\n\nNo markers here.\n"


@pytest.mark.parametrize("missing", ["spectrum.jsonl", "metrics.jsonl", "summary.json", ""])
def test_missing_log_exits_nonzero_naming_it(tmp_path: Path, missing: str, capsys) -> None:
    runs_file = _fixture_copy(tmp_path)
    victim = tmp_path / "runs" / "tiny_galore"
    if missing:
        (victim / missing).unlink()
    else:
        shutil.rmtree(victim)
    out = tmp_path / "figures"
    assert main(["--runs", str(runs_file), "--out", str(out), "--no-readme"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and str(victim / missing).rstrip("/") in err
    assert not out.exists()


def test_missing_log_fails_the_command(tmp_path: Path) -> None:
    runs_file = _fixture_copy(tmp_path)
    (tmp_path / "runs" / "tiny_adarank" / "spectrum.jsonl").unlink()
    result = _run_command("--runs", str(runs_file), "--out", str(tmp_path / "o"), "--no-readme")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'runs' / 'tiny_adarank' / 'spectrum.jsonl'}: no such file "
        "(run 'adarank' is incomplete)"
    ]
