"""The project around the package: dependency lists agree, torch is never pinned, the README's commands
are the ones CI runs, the scripts parse, and the book's table of contents and link rewriting work."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / "kdbook"
UNPINNED = ("torch", "torchvision")


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def environment_requirements() -> tuple[list[str], list[str]]:
    """(conda dependencies, pip requirements) of environment.yml, the local install line excluded."""
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = [entry for entry in environment["dependencies"] if isinstance(entry, str)]
    pip_sections = [entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict)]
    assert len(pip_sections) == 1, "environment.yml should have one pip: section"
    pip = [line for line in pip_sections[0] if not line.startswith(("-e", "."))]
    return conda, pip


def by_name(requirements: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(line) for line in requirements]
    return {re.sub(r"[-_.]+", "-", requirement.name).lower(): requirement for requirement in parsed}


# ------------------------------------------------------------------------------------------- dependencies


def test_environment_yml_lists_the_pyproject_dependencies() -> None:
    project = pyproject()["project"]
    expected = by_name(project["dependencies"] + project["optional-dependencies"]["lab"])
    conda, pip = environment_requirements()
    listed = by_name(pip)
    assert sorted(listed) == sorted(expected), "environment.yml's pip list and pyproject.toml disagree"
    for name, requirement in expected.items():
        assert listed[name].specifier == requirement.specifier, f"{name}: version bounds differ"
    assert "pip" in conda and any(entry.startswith("python") for entry in conda)
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "-e ." in environment["dependencies"][-1]["pip"], "the package itself must be installed"


def test_environment_python_satisfies_requires_python() -> None:
    conda, _ = environment_requirements()
    (python,) = [entry for entry in conda if entry.startswith("python")]
    version = python.split("=")[-1]
    assert Requirement(f"python{pyproject()['project']['requires-python']}").specifier.contains(version)


def test_torch_is_never_pinned() -> None:
    project = pyproject()["project"]
    everything = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        everything += extra
    _, pip = environment_requirements()
    for source, requirements in (("pyproject.toml", everything), ("environment.yml", pip)):
        for name, requirement in by_name(requirements).items():
            if name in UNPINNED:
                operators = {spec.operator for spec in requirement.specifier}
                assert operators <= {">="}, f"{source} caps or pins {name}: {requirement}"


# --------------------------------------------------------------------------------------- commands and CI


def readme_commands() -> list[str]:
    """Lines of the README's bash code blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_gives_the_two_commands_and_ci_runs_the_test_command() -> None:
    commands = readme_commands()
    assert "bash scripts/book.sh" in commands
    assert "bash scripts/test.sh" in commands
    ci_lines = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set -", "cd "))
    ]
    assert [line.removeprefix("exec ") for line in ci_lines] == ["bash scripts/test.sh"]
    readme = (REPO / "README.md").read_text()
    assert "kdbook/_build/html/index.html" in readme
    for badge in (
        "https://mybinder.org/v2/gh/kdbook/kdbook/main?labpath=notebooks",
        "https://colab.research.google.com/github/kdbook/kdbook/blob/main/notebooks/00_start_here.ipynb",
    ):
        assert badge in readme


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.sh")) + ["../.ci/run"])
def test_shell_scripts_parse_and_are_strict(script: str) -> None:
    path = REPO / "scripts" / script
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_setup_skips_the_install_when_pyproject_is_unchanged() -> None:
    text = (REPO / "scripts" / "setup.sh").read_text()
    assert 'pip install --disable-pip-version-check -e "$ROOT[test,book]"' in text
    assert "sha256" in text and "STAMP" in text


# ---------------------------------------------------------------------------------------------- the book


def test_book_config_renders_without_executing() -> None:
    config = yaml.safe_load((BOOK / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["only_build_toc_files"] is True
    assert config["repository"]["url"] == "https://github.com/kdbook/kdbook"
    assert config["repository"]["branch"] == "main"
    assert config["launch_buttons"]["binderhub_url"] and config["launch_buttons"]["colab_url"]


def test_toc_lists_every_notebook_and_only_existing_notebooks() -> None:
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    lessons = [
        c["file"] for part in toc["parts"] for c in part["chapters"] if c["file"].startswith("lessons/")
    ]
    notebooks = sorted(path.stem for path in (REPO / "notebooks").glob("*.ipynb"))
    assert sorted(name.removeprefix("lessons/") for name in lessons) == notebooks
    assert (BOOK / "intro.md").is_file() and (BOOK / "references.md").is_file()


def test_book_toc_drops_missing_pages_and_appends_new_ones(tmp_path: Path) -> None:
    book_toc = load_module(REPO / "scripts" / "book_toc.py")
    book = tmp_path / "kdbook"
    (book / "lessons").mkdir(parents=True)
    shutil.copy(BOOK / "_toc.yml", book / "_toc.yml")
    for page in ("intro.md", "references.md"):
        (book / page).write_text("# page\n")
    for name in ("01_hinton_kd", "09_new_lesson"):
        (book / "lessons" / f"{name}.ipynb").write_text(json.dumps({"cells": []}))
    toc, dropped = book_toc.filtered_toc(book)
    files = [[c["file"] for c in part["chapters"]] for part in toc["parts"]]
    assert files == [["lessons/01_hinton_kd"], ["lessons/09_new_lesson"], ["references"]]
    assert "lessons/00_start_here" in dropped and "lessons/01_hinton_kd" not in dropped


def test_lesson_links_point_at_the_committed_notebooks() -> None:
    links = load_module(BOOK / "_ext" / "notebook_links.py")
    context = {
        "header_buttons": [
            {"type": "group", "buttons": [
                {"url": "https://colab.research.google.com/github/kdbook/kdbook/blob/main/kdbook/lessons/01_x.ipynb"},
                {"url": "https://mybinder.org/v2/gh/kdbook/kdbook/main?urlpath=lab/tree/kdbook/lessons/01_x.ipynb"},
            ]},
        ]
    }  # fmt: skip
    links.retarget_links(None, "lessons/01_x", "page.html", context, None)
    urls = [button["url"] for button in context["header_buttons"][0]["buttons"]]
    assert urls == [
        "https://colab.research.google.com/github/kdbook/kdbook/blob/main/notebooks/01_x.ipynb",
        "https://mybinder.org/v2/gh/kdbook/kdbook/main?urlpath=lab/tree/notebooks/01_x.ipynb",
    ]
    untouched = {"header_buttons": [{"url": "https://github.com/kdbook/kdbook/blob/main/kdbook/intro.md"}]}
    links.retarget_links(None, "intro", "page.html", untouched, None)
    assert untouched["header_buttons"][0]["url"].endswith("kdbook/intro.md")


@pytest.mark.book
def test_book_builds_offline(tmp_path: Path) -> None:
    """Build the book from a copy holding one tiny executed lesson; the lesson's links must be rewritten."""
    jupyter_book = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    if jupyter_book is None:
        pytest.skip("jupyter-book is not installed (pip install -e '.[book]')")
    import nbformat

    copy = tmp_path / "repo"
    shutil.copytree(BOOK, copy / "kdbook", ignore=shutil.ignore_patterns("_build", "lessons"))
    shutil.copytree(REPO / "scripts", copy / "scripts")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# A lesson\n\nThe loss $T^2 \\mathrm{KL}(p\\|q)$.")]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (copy / "kdbook" / "lessons").mkdir()
    nbformat.write(notebook, copy / "kdbook" / "lessons" / "01_hinton_kd.ipynb")
    toc = copy / "kdbook" / "_build" / "_toc.yml"
    subprocess.run([sys.executable, str(copy / "scripts" / "book_toc.py"), str(toc)], check=True)
    result = subprocess.run(
        [jupyter_book, "build", str(copy / "kdbook"), "--toc", str(toc)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    html = copy / "kdbook" / "_build" / "html"
    assert (html / "index.html").is_file()
    lesson = (html / "lessons" / "01_hinton_kd.html").read_text()
    assert "colab.research.google.com/github/kdbook/kdbook/blob/main/notebooks/01_hinton_kd.ipynb" in lesson
    assert "kdbook/lessons/01_hinton_kd.ipynb" not in lesson
    assert "A lesson" in lesson
