"""The widget tests again, under the ipywidgets that Colab ships (7.7.1; the project's own environment has
ipywidgets 8): a small virtual environment holds Colab's widget packages (tests/colab_widgets.txt) in its
own site-packages and reaches every other package (torch, matplotlib, pytest, ...) through a ``.pth`` line
naming the project environment's site-packages, which comes after its own on ``sys.path``. Built from the
wheels that scripts/setup.sh downloaded, so the test runs offline, in about two seconds plus the tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import ipywidgets
import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PINS = REPO / "tests" / "colab_widgets.txt"
WHEELS = Path(sys.prefix) / "colab-widgets-wheels"


def colab_versions() -> dict[str, str]:
    """``{"ipywidgets": "7.7.1", ...}`` from tests/colab_widgets.txt."""
    lines = [line.split("#", 1)[0].strip() for line in PINS.read_text().splitlines()]
    pins = [Requirement(line) for line in lines if line]
    return {pin.name: next(iter(pin.specifier)).version for pin in pins}


def make_environment(folder: Path) -> Path:
    """A virtual environment with Colab's widget packages in front of the project's; returns its python."""
    if not WHEELS.is_dir():
        pytest.fail(
            f"the wheels of Colab's widget packages are not in {WHEELS}; run `bash scripts/setup.sh` "
            "(it downloads them when tests/colab_widgets.txt or pyproject.toml changed)"
        )
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--no-index",
         "--no-deps", "--find-links", str(WHEELS), "--target", site_packages, "-r", str(PINS)],
        check=True,
    )  # fmt: skip
    (Path(site_packages) / "kdbook-project-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_the_widget_tests_pass_with_colab_s_ipywidgets(tmp_path: Path) -> None:
    python = make_environment(tmp_path / "colab-widgets")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    report_versions = "import ipywidgets as i, widgetsnbextension as w; print(i.__version__, w.__version__)"
    versions = subprocess.run(
        [str(python), "-c", report_versions],
        capture_output=True,
        text=True,
        check=True,
        env=environment,
        cwd=REPO,
    ).stdout.split()
    expected = colab_versions()
    assert versions == [expected["ipywidgets"], expected["widgetsnbextension"]]
    assert ipywidgets.__version__.split(".")[0] != versions[0].split(".")[0], (
        "the project's environment and the Colab one should hold different major versions of ipywidgets"
    )
    result = subprocess.run(
        [str(python), "-m", "pytest", "tests/test_widgets.py", "-q", "-p", "no:cacheprovider",
         "-W", "ignore::DeprecationWarning"],
        capture_output=True, text=True, env=environment, cwd=REPO, check=False,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    assert result.returncode == 0, (
        f"under ipywidgets {versions[0]}:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
    )
    assert re.fullmatch(r"\d+ passed in [\d.]+s", summary), f"skips or errors under ipywidgets 7: {summary}"
