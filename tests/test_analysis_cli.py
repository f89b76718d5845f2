"""adarank-spectrum: every subcommand through the installed entry point, and its error exits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import matplotlib.image
import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _entry_point():
    (script,) = entry_points(group="console_scripts", name="adarank-spectrum")
    return script.load()


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    """Call the console script's function in-process (fast), as the installed script does."""
    try:
        status = _entry_point()([str(a) for a in args])
    except SystemExit as exit_:  # argparse's --help and usage errors
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def _assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)  # decodes the whole file
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> dict[str, Path]:
    """Short real runs of the built-in model, one per low-rank optimizer (about 1 s each)."""
    folder = tmp_path_factory.mktemp("runs")
    paths = {}
    for optimizer in ("galore", "adarank"):
        paths[optimizer] = folder / f"{optimizer}.jsonl"
        status = _entry_point()(
            [
                "record",
                "--optimizer",
                optimizer,
                "--steps",
                "25",
                "--every",
                "5",
                "--update-gap",
                "10",
                "--out",
                str(paths[optimizer]),
            ]
        )
        assert status == 0
    return paths


def test_record_writes_a_log_and_reports_overhead(tmp_path, capsys):
    path = tmp_path / "adamw.jsonl"
    status, out, err = run_cli(
        "record",
        "--optimizer",
        "adamw",
        "--steps",
        "12",
        "--every",
        "4",
        "--out",
        path,
        capsys=capsys,
    )
    assert status == 0, err
    assert "overhead" in out and str(path) in out
    from adarank.analysis import load_log

    log = load_log(path)
    assert list(log.steps) == [0, 4, 8, 11]  # every 4, and the last step
    assert log.header["optimizer"]["class"] == "AdamW"
    assert {log.layer_type(name) for name in log.layer_names} == {
        "q",
        "k",
        "v",
        "o",
        "gate",
        "up",
        "down",
    }


def test_summary_prints_a_table_per_layer(logs, capsys):
    status, out, _ = run_cli("summary", logs["adarank"], capsys=capsys)
    assert status == 0
    assert "layers.0.self_attn.q_proj.weight" in out
    assert "optimizer" in out and "E0.9" in out and "mean over layers" in out


def test_summary_into_a_closed_pipe_exits_without_a_traceback(logs):
    # As `adarank-spectrum summary --json log | head -0`: the reader is gone before any write.
    code = "import sys; from adarank.analysis.cli import main; sys.exit(main(sys.argv[1:]))"
    read, write = os.pipe()
    os.close(read)
    result = subprocess.run(
        [sys.executable, "-c", code, "summary", "--json", str(logs["adarank"])],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    os.close(write)
    assert result.stderr == ""
    assert result.returncode == 1


def test_summary_json_has_first_last_min_per_measure(logs, capsys):
    status, out, _ = run_cli("summary", logs["adarank"], "--json", capsys=capsys)
    assert status == 0
    summary = json.loads(out)
    assert summary["optimizer"] == "AdaRankAdamW"
    assert summary["records"] == 6 and summary["last_step"] == 24  # 0, 5, ..., 20, 24
    layer = summary["layers"][0]
    assert layer["type"] == "q" and layer["shape"] == [128, 128]
    stats = layer["measures"]["energy_rank_0.9"]
    assert stats["min"] <= min(stats["first"], stats["last"])
    assert layer["measures"]["optimizer_rank"]["last"] >= 1


@pytest.fixture(scope="module")
def plotted(logs, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("figures")
    status = _entry_point()(["plot", str(logs["adarank"]), "--out", str(folder)])
    assert status == 0
    return sorted(folder.iterdir())


def test_plot_writes_valid_pngs(plotted):
    assert {p.name for p in plotted} == {
        "overview.png",
        "spectra.png",
        "ranks.png",
        "heatmap.png",
        "captured.png",
    }
    for path in plotted:
        _assert_valid_png(path)


def test_plots_are_byte_identical_across_runs(logs, plotted, tmp_path):
    from adarank.analysis import load_log
    from adarank.analysis.plots import overview_figure, save_figure

    again = save_figure(overview_figure(load_log(logs["adarank"])), tmp_path / "overview.png")
    (first,) = [path for path in plotted if path.name == "overview.png"]
    assert again.read_bytes() == first.read_bytes()


def test_plot_pdf_and_measure_options(logs, tmp_path, capsys):
    status, out, err = run_cli(
        "plot",
        logs["galore"],
        "--out",
        tmp_path,
        "--format",
        "pdf",
        "--measure",
        "stable_rank",
        "--steps",
        "0",
        "20",
        capsys=capsys,
    )
    assert status == 0, err
    for line in out.split():
        assert Path(line).read_bytes()[:5] == b"%PDF-"


def test_compare_writes_valid_pngs(logs, tmp_path, capsys):
    status, out, err = run_cli(
        "compare",
        logs["galore"],
        logs["adarank"],
        "--out",
        tmp_path,
        "--labels",
        "GaLore",
        "AdaRank",
        capsys=capsys,
    )
    assert status == 0, err
    written = [Path(line) for line in out.split()]
    assert {p.name for p in written} == {"compare.png", "compare_by_type.png"}
    for path in written:
        _assert_valid_png(path)


@pytest.mark.parametrize("command", [[], ["summary"], ["plot"], ["compare"], ["record"]])
def test_every_command_has_help(command, capsys):
    status, out, _ = run_cli(*command, "--help", capsys=capsys)
    assert status == 0
    assert "usage: adarank-spectrum" in out


def _bad_logs(folder: Path, good: Path) -> dict[str, Path]:
    empty = folder / "empty.jsonl"
    empty.write_bytes(b"")
    corrupt = folder / "corrupt.jsonl"
    corrupt.write_bytes(b"\x00\x01 this is not a log\n{}\n")
    header_only = folder / "header_only.jsonl"
    header_only.write_bytes(good.read_bytes().split(b"\n")[0] + b"\n")
    return {
        "missing": folder / "missing.jsonl",
        "empty": empty,
        "corrupt": corrupt,
        "header only": header_only,
    }


@pytest.mark.parametrize("command", ["summary", "plot", "compare"])
def test_bad_logs_give_one_line_error_and_nonzero_exit(command, logs, tmp_path, capsys):
    for kind, path in _bad_logs(tmp_path, logs["galore"]).items():
        args = [command, path] + (["--out", tmp_path / "out"] if command != "summary" else [])
        status, out, err = run_cli(*args, capsys=capsys)
        assert status == 1, kind
        assert err.startswith("adarank-spectrum: error: ") and err.count("\n") == 1, (kind, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _with_header(good: Path, path: Path, edit) -> Path:
    lines = good.read_bytes().split(b"\n")
    header = json.loads(lines[0])
    edit(header)
    path.write_bytes(b"\n".join([json.dumps(header).encode(), *lines[1:]]))
    return path


def _set_layer_field(key, value):
    def edit(header):
        header["layers"][0][key] = value

    return edit


MALFORMED_HEADERS = {
    "model is a string": lambda h: h.update(model="LlamaForCausalLM"),
    "optimizer is a string": lambda h: h.update(optimizer="GaLoreAdamW"),
    "optimizer class is a number": lambda h: h["optimizer"].update({"class": 3}),
    "model is a list": lambda h: h.update(model=["m"]),
    "run_name is an object": lambda h: h.update(run_name={"a": 1}),
    "matrix_shape is one number": _set_layer_field("matrix_shape", 64),
    "matrix_shape has three entries": _set_layer_field("matrix_shape", [4, 4, 4]),
    "matrix_shape is a string": _set_layer_field("matrix_shape", "64x64"),
    "matrix_shape holds a float": _set_layer_field("matrix_shape", [64, 1.5]),
    "shape is a number": _set_layer_field("shape", 7),
    "type is a list": _set_layer_field("type", ["q"]),
}


@pytest.mark.parametrize("command", ["summary", "plot", "compare"])
@pytest.mark.parametrize("kind", list(MALFORMED_HEADERS))
def test_malformed_header_gives_one_line_error_and_exit_1(kind, command, logs, tmp_path, capsys):
    path = _with_header(logs["galore"], tmp_path / "bad.jsonl", MALFORMED_HEADERS[kind])
    args = [command, path] + (["--out", tmp_path / "out"] if command != "summary" else [])
    status, _, err = run_cli(*args, capsys=capsys)
    assert status == 1, err
    assert err.startswith(f"adarank-spectrum: error: {path}: malformed header") and (
        err.count("\n") == 1
    ), err
    assert not (tmp_path / "out").exists()


def test_header_fields_may_be_null(logs, tmp_path, capsys):
    def blank(header):
        header.update(model=None, optimizer=None, run_name=None)
        for layer in header["layers"]:
            layer.update(matrix_shape=None, type=None, shape=None)

    path = _with_header(logs["galore"], tmp_path / "nulls.jsonl", blank)
    status, out, err = run_cli("summary", path, capsys=capsys)
    assert status == 0, err
    assert "no optimizer" in out


def test_torn_log_still_summarises_with_a_warning(logs, tmp_path, capsys):
    data = logs["adarank"].read_bytes()
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(data[: len(data) - 500])
    status, out, err = run_cli("summary", torn, "--json", capsys=capsys)
    assert status == 0
    assert err.startswith("adarank-spectrum: warning: ") and "torn last line" in err
    assert json.loads(out)["records"] == 5


def test_unknown_measure_is_an_error(logs, tmp_path, capsys):
    status, _, err = run_cli(
        "plot", logs["galore"], "--out", tmp_path, "--measure", "nope", capsys=capsys
    )
    assert status == 1 and "no quantity 'nope'" in err


def test_installed_script_exits_nonzero_without_traceback(tmp_path):
    script = shutil.which("adarank-spectrum", path=str(Path(sys.executable).parent))
    assert script, "the console script is not installed; run pip install -e ."
    missing = subprocess.run(
        [script, "summary", str(tmp_path / "nothing.jsonl")], capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("adarank-spectrum: error:")
    assert "Traceback" not in missing.stderr
    usage = subprocess.run([script], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
