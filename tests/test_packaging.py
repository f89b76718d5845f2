"""The installed distribution: one import path for the analysis package, no generic top name."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("adarank", "analysis", "experiments", "paper_figures", "tests", "examples")


def _python_files() -> list[Path]:
    files = []
    for folder in SOURCE_DIRS:
        root = REPO / folder
        if root.is_dir() and not root.is_symlink():
            files += sorted(root.rglob("*.py"))
    return files


def test_no_source_file_imports_bare_analysis() -> None:
    # `analysis` is the repository folder; the installed package is `adarank.analysis`.
    offenders = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name == "analysis" or name.startswith("analysis.") for name in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == [], f"import adarank.analysis instead of analysis at {offenders}"


def test_source_tree_resolves_analysis_under_adarank() -> None:
    import adarank.analysis
    from adarank.analysis import SpectrumLogger, load_log

    assert Path(adarank.analysis.__file__).resolve() == REPO / "analysis" / "__init__.py"
    assert SpectrumLogger.__module__ == "adarank.analysis.hooks"
    assert load_log.__module__ == "adarank.analysis.io"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # Build from a copy of the files the wheel is made of, so the repository gets no build/ or
    # egg-info folders; adarank/analysis stays the symbolic link it is in the repository.
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("adarank", "analysis"):
        shutil.copytree(REPO / folder, source / folder, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (path,) = out.glob("adarank-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_has_adarank_as_its_only_package(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    top_level = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"adarank"}
    for module in ("__init__", "hooks", "io", "metrics", "plots", "cli"):
        assert f"adarank/analysis/{module}.py" in names


def test_wheel_console_script_points_into_adarank(wheel: zipfile.ZipFile) -> None:
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "adarank-spectrum = adarank.analysis.cli:main" in text


def test_wheel_metadata_has_license_classifiers_and_py_typed(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = wheel.read(metadata).decode()
    assert "License-Expression: MIT" in text
    assert "Classifier: Typing :: Typed" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "adarank/py.typed" in names
    assert "Provides-Extra: integrations" in text


def test_import_adarank_loads_torch_but_nothing_heavy_it_does_not_need() -> None:
    # scipy, fbpca and matplotlib serve the fbpca backend and the analysis package; transformers
    # and lightning the integrations. None of them is imported by `import adarank`.
    heavy = ("scipy", "fbpca", "matplotlib", "transformers", "lightning", "adarank.analysis")
    code = f"import sys, adarank; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO
    )
    assert result.stdout.strip() == ""
