"""A release a course can pin: the version is stated once and agrees with the changelog and the tag that the
install lines name; the wheel and the sdist build, carry every file the notebooks read, and notebook 00 runs
from the installed wheel in a fresh environment outside the repository."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import nbformat
import pytest

import kdbook_utils

REPO = Path(__file__).resolve().parents[1]
VERSION = kdbook_utils.__version__


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def git_files(*paths: str) -> list[str]:
    """Files that git tracks (or would: untracked but not ignored) under ``paths``, as repository paths."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the files that make the package cannot be listed")
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", *paths],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sorted(name for name in listing.split("\0") if name and (REPO / name).is_file())


def package_data_files() -> list[str]:
    """Every file of the package that is not Python source: what the notebooks read from it."""
    return [name for name in git_files("kdbook_utils") if not name.endswith(".py")]


# ------------------------------------------------------------------------------------------- the version


def test_the_version_the_changelog_and_the_pinned_tag_agree() -> None:
    changelog = (REPO / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", changelog, flags=re.MULTILINE)
    assert versions, "CHANGELOG.md has no '## 0.2.0 (date)' section"
    assert versions[0] == VERSION, f"CHANGELOG.md's latest section is {versions[0]}, the package is {VERSION}"
    repository = load_script("set_repository").configured_repository(REPO)
    if re.fullmatch(r"v\d+(\.\d+)*", repository.branch):  # a release tag (a fork may publish a branch)
        assert repository.branch == f"v{VERSION}", (
            f"kdbook/_config.yml pins {repository.branch} but the package is {VERSION}: run "
            f"`python3 scripts/set_repository.py --tag v{VERSION}`"
        )


# ----------------------------------------------------------------------------------- the wheel and sdist


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel (built from the sdist, as ``python -m build`` does), from a copy of the
    files git knows, so nothing else lying in the checkout can slip in. Offline: no build isolation (the
    test environment has setuptools and build)."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in git_files("."):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout.strip().splitlines()[-1])  # "Successfully built kdbook_utils-....tar.gz and ....whl"
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_the_wheel_and_the_sdist_carry_every_file_the_notebooks_read(built: dict[str, Path]) -> None:
    assert built["wheel"].name == f"kdbook_utils-{VERSION}-py3-none-any.whl"
    assert built["sdist"].name == f"kdbook_utils-{VERSION}.tar.gz"
    data = package_data_files()
    assert "kdbook_utils/results/timings.csv" in data and any(name.endswith(".json") for name in data)
    in_wheel = set(zipfile.ZipFile(built["wheel"]).namelist())
    missing = [name for name in data if name not in in_wheel]
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"
    with tarfile.open(built["sdist"]) as sdist:
        in_sdist = {member.split("/", 1)[1] for member in sdist.getnames() if "/" in member}
    missing = [name for name in [*data, *git_files("kdbook_utils")] if name not in in_sdist]
    assert not missing, f"not in the sdist: {missing}"
    assert not [name for name in in_wheel if name.startswith(("tests/", "notebooks/", "scripts/"))]


AUDIT_CELL = """\
# Added by tests/test_release.py: record every file this kernel opens.
import os as _os, sys as _sys
_REPOSITORY, _PROJECT_ENV = {repository!r}, {project_env!r}
_repository_reads, _package_reads = set(), set()

def _record_open(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, _os.PathLike)):
        path = _os.path.realpath(_os.fsdecode(args[0]))
        if path.startswith(_REPOSITORY + _os.sep) and not path.startswith(_PROJECT_ENV + _os.sep):
            _repository_reads.add(path)
        elif f"{{_os.sep}}kdbook_utils{{_os.sep}}" in path and not path.endswith((".py", ".pyc")):
            _package_reads.add(path)

_sys.addaudithook(_record_open)
"""

REPORT_CELL = """\
import json as _json, kdbook_utils as _kdbook_utils
print(_json.dumps({"package": _kdbook_utils.__file__, "version": _kdbook_utils.__version__,
                   "repository_reads": sorted(_repository_reads), "package_reads": sorted(_package_reads)}))
"""


def fresh_environment(folder: Path, wheel: Path) -> tuple[Path, Path]:
    """A virtual environment outside the repository with the wheel installed in its own site-packages; the
    dependencies (torch, ipykernel, ...) come from the project environment through a ``.pth`` line, whose
    own ``.pth`` files (the editable install's finder among them) Python does not run. Returns (python,
    site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site_packages = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip())  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--no-index",
         "--no-deps", "--target", str(site_packages), str(wheel)],
        check=True,
    )  # fmt: skip
    (site_packages / "kdbook-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site_packages


@pytest.mark.notebook
def test_notebook_00_runs_from_the_installed_wheel(
    built: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the kernel inherits this process's environment
    python, site_packages = fresh_environment(tmp_path / "venv", built["wheel"])
    site_packages = site_packages.resolve()
    work = tmp_path / "work"
    work.mkdir()
    found = subprocess.run(
        [str(python), "-c", "import kdbook_utils; print(kdbook_utils.__file__)"],
        capture_output=True, text=True, check=True, cwd=work,
    ).stdout.strip()  # fmt: skip
    assert Path(found).is_relative_to(site_packages), f"kdbook_utils imported from {found}, not the wheel"

    notebook = nbformat.read(REPO / "notebooks" / "00_start_here.ipynb", as_version=4)
    audit = AUDIT_CELL.format(repository=str(REPO.resolve()), project_env=str(Path(sys.prefix).resolve()))
    notebook.cells = [
        nbformat.v4.new_code_cell(audit),
        *notebook.cells,
        nbformat.v4.new_code_cell(REPORT_CELL),
    ]
    copy = work / "00_start_here.ipynb"
    nbformat.write(notebook, copy)
    executor = load_script("execute_notebooks")
    with executor.kernel_for_this_python(
        "quick", {"KDBOOK_CACHE": str(tmp_path / "cache")}, str(python)
    ) as name:
        executed = executor.execute_notebook(copy, kernel_name=name, timeout=900, cwd=work)
    (output,) = [out for out in executed.cells[-1].outputs if out.get("name") == "stdout"]
    report = json.loads(output.text)
    print(json.dumps(report, indent=1))
    assert Path(report["package"]).is_relative_to(site_packages) and report["version"] == VERSION
    assert report["repository_reads"] == [], "the notebook read files from the repository, not the package"
    installed = site_packages / "kdbook_utils"
    assert str(installed / "results" / "timings.csv") in report["package_reads"]
    assert all(Path(path).is_relative_to(installed) for path in report["package_reads"])
