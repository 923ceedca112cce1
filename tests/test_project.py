"""The project around the package: dependency lists agree (pyproject.toml, environment.yml, binder/), torch is
never pinned, the README's commands are the ones CI runs, the scripts parse, every copy of the repository
address agrees with the book's configuration, and the book's table of contents, link rewriting and
offline build work."""

from __future__ import annotations

import html as html_module
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


def imported_distributions() -> dict[str, set[str]]:
    """Every distribution the package imports, and the files that import it (standard library and the package
    itself left out), mapped from module to distribution by the installed metadata."""
    import ast
    from importlib.metadata import packages_distributions

    providers = packages_distributions()
    found: dict[str, set[str]] = {}
    for path in (REPO / "kdbook_utils").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in ("kdbook_utils", "typing_extensions", "google"):
                    continue  # typing_extensions: type checking only; google: Colab's own module
                for distribution in providers.get(top, [top]):
                    name = re.sub(r"[-_.]+", "-", distribution).lower()
                    found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_package_the_code_imports_is_declared() -> None:
    project = pyproject()["project"]
    declared = set(by_name(project["dependencies"]))
    for extra in project["optional-dependencies"].values():
        declared |= set(by_name(extra))
    missing = {
        name: sorted(files) for name, files in imported_distributions().items() if name not in declared
    }
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_environment_python_satisfies_requires_python() -> None:
    conda, _ = environment_requirements()
    (python,) = [entry for entry in conda if entry.startswith("python")]
    version = python.split("=")[-1]
    assert Requirement(f"python{pyproject()['project']['requires-python']}").specifier.contains(version)


def binder_requirements() -> tuple[list[str], list[str]]:
    """(pip options, requirements) of binder/requirements.txt, comments and blank lines dropped."""
    text = (REPO / "binder" / "requirements.txt").read_text()
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    options = [line for line in lines if line.startswith("-")]
    return options, [line for line in lines if line and not line.startswith("-")]


def test_binder_installs_cpu_torch_then_the_package_with_its_lab_extra() -> None:
    options, requirements = binder_requirements()
    assert options == ["--index-url https://download.pytorch.org/whl/cpu"], (
        "binder/requirements.txt must take torch from PyTorch's CPU wheel index only (no CUDA libraries)"
    )
    dependencies = by_name(pyproject()["project"]["dependencies"])
    expected = {name: requirement for name, requirement in dependencies.items() if name in UNPINNED}
    listed = by_name(requirements)
    assert sorted(listed) == sorted(expected), "binder/requirements.txt holds torch and torchvision only"
    for name, requirement in expected.items():
        assert listed[name].specifier == requirement.specifier, f"{name}: bounds differ from pyproject.toml"
    post_build = REPO / "binder" / "postBuild"
    script = post_build.read_text()
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    assert post_build.stat().st_mode & 0o111, "binder/postBuild must be executable"
    installs = [line.strip() for line in script.splitlines() if "pip install" in line]
    assert installs == ['python -m pip install --no-cache-dir -e ".[lab]"'], (
        "postBuild installs the package with its lab extra (and nothing else)"
    )
    assert "lab" in pyproject()["project"]["optional-dependencies"]
    runtime = (REPO / "binder" / "runtime.txt").read_text().strip()
    conda, _ = environment_requirements()
    (python,) = [entry for entry in conda if entry.startswith("python")]
    assert runtime == f"python-{python.split('=')[-1]}", "binder/runtime.txt and environment.yml differ"


# What Colab preinstalls (googlecolab/backend-info, pip-freeze.txt and pip-freeze.gpu.txt, 2026-08-19, Python
# 3.13). The install cell must install the package alone: pip upgrades a dependency only when its version is
# below the package's lower bound. tests/colab_widgets.txt pins the same widget versions for the widget tests.
COLAB = {
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "ipywidgets": "7.7.1",
    "matplotlib": "3.10.0",
    "seaborn": "0.13.2",
    "pandas": "2.2.3",
    "tqdm": "4.67.3",
    "scikit-learn": "1.6.1",
    "numpy": "2.0.2",
    "scipy": "1.16.3",
    "pillow": "11.3.0",
    "ipython": "7.34.0",  # google-colab pins IPython 7: an ipython>=8 bound would replace Colab's own
}


def test_colab_s_preinstalled_packages_meet_every_dependency() -> None:
    project = pyproject()["project"]
    dependencies = by_name(project["dependencies"])
    assert sorted(dependencies) == sorted(COLAB), "a new dependency: add Colab's version of it to COLAB"
    for name, requirement in dependencies.items():
        assert requirement.specifier.contains(COLAB[name], prereleases=True), (
            f"{requirement} would make the Colab install cell replace Colab's {name} {COLAB[name]}"
        )
    assert Requirement(f"python{project['requires-python']}").specifier.contains("3.13")
    widgets = (REPO / "tests" / "colab_widgets.txt").read_text()
    assert f"ipywidgets=={COLAB['ipywidgets']}" in widgets


def test_torch_is_never_pinned() -> None:
    project = pyproject()["project"]
    everything = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        everything += extra
    _, pip = environment_requirements()
    _, binder = binder_requirements()
    for source, requirements in (
        ("pyproject.toml", everything),
        ("environment.yml", pip),
        ("binder/requirements.txt", binder),
    ):
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
    assert ci_lines[-1] == "exec bash scripts/test.sh", "CI must end by running the README's test command"
    setup = ci_lines[:-1]  # only the browser install for tests/test_browser.py may come before it
    assert all(line.startswith(("if ", "fi", "export DEBIAN_FRONTEND", "apt-get ")) for line in setup), setup
    installs = [line for line in setup if line.startswith("apt-get install")]
    assert installs, "CI installs the browser that tests/test_browser.py needs"
    for line in installs:
        assert {"-y", "-qq", "chromium", "chromium-driver"} <= set(line.split()), line
    readme = (REPO / "README.md").read_text()
    assert "kdbook/_build/html/index.html" in readme
    repository = load_module(REPO / "scripts" / "set_repository.py").configured_repository(REPO)
    for badge in (
        f"https://mybinder.org/v2/gh/{repository.owner_name}/{repository.branch}?labpath=notebooks/student)",
        (
            f"https://colab.research.google.com/github/{repository.owner_name}/blob/{repository.branch}"
            "/notebooks/student/00_start_here.ipynb"
        ),
    ):
        assert badge in readme  # the student editions: the instructor's notebooks hold the solutions
    launch_links = re.findall(r"https://(?:mybinder\.org|colab\.research\.google\.com)/[^)\s\"]+", readme)
    for path in [REPO / "kdbook" / "intro.md", *sorted((REPO / "notebooks").rglob("*.ipynb"))]:
        launch_links += re.findall(
            r"https://(?:mybinder\.org/v2|colab\.research\.google\.com/github)/[^)\s\"]+", path.read_text()
        )
    leaking = [link for link in launch_links if "notebooks" in link and "notebooks/student" not in link]
    assert not leaking, f"launch links that open the instructor's notebooks (with solutions): {leaking}"


@pytest.mark.parametrize(
    "script", sorted(p.name for p in (REPO / "scripts").glob("*.sh")) + ["../.ci/run", "../binder/postBuild"]
)
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


# -------------------------------------------------------------------------------- the repository address


def test_every_copy_of_the_repository_address_agrees_with_the_book_config() -> None:
    set_repository = load_module(REPO / "scripts" / "set_repository.py")
    disagreements = set_repository.find_disagreements(REPO)
    assert not disagreements, (
        "these links do not name kdbook/_config.yml's repository.url and branch; fix them all with "
        "`python3 scripts/set_repository.py <url> --branch <branch>`:\n" + "\n".join(map(str, disagreements))
    )
    counts = set_repository.count_links(REPO)
    assert counts[Path("README.md")] >= 2, "the README's Binder and Colab badges"
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        assert counts[notebook.relative_to(REPO)] >= 1, f"{notebook.name}: no Colab install line found"


def test_set_repository_rewrites_every_copy_and_back(tmp_path: Path) -> None:
    set_repository = load_module(REPO / "scripts" / "set_repository.py")
    (tmp_path / "kdbook").mkdir()
    shutil.copy(BOOK / "_config.yml", tmp_path / "kdbook" / "_config.yml")
    for page in BOOK.glob("*.md"):
        shutil.copy(page, tmp_path / "kdbook" / page.name)
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks")
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    (tmp_path / "kdbook" / "appendix.md").write_text(
        "See [the source](https://github.com/kdbook/kdbook/blob/main/kdbook_utils/train.py), "
        "[another project](https://github.com/kdbook/kdbook-extra) and "
        '`%pip install "kdbook-utils @ git+https://github.com/someone/else@dev"`.\n'
    )
    original = set_repository.configured_repository(tmp_path)
    set_repository.set_repository(original, tmp_path)  # make every copy agree first
    before = {path: path.read_text() for path in tmp_path.rglob("*") if path.is_file()}
    counts = set_repository.count_links(tmp_path)

    fork = set_repository.parse_repository("https://github.com/a-university/kd-labs.git", "fall2026")
    changed = set_repository.set_repository(fork, tmp_path)
    assert Path("kdbook/_config.yml") in changed and Path("README.md") in changed
    assert set_repository.configured_repository(tmp_path) == fork
    assert set_repository.find_disagreements(tmp_path) == []
    assert set_repository.count_links(tmp_path) == counts, "a link was lost or made up"
    for path in set_repository.files_with_links(tmp_path):
        text = path.read_text()
        assert f"github.com/{original.owner_name}/" not in text, path
        assert f"github.com/{original.owner_name}@" not in text, path
    config = (tmp_path / "kdbook" / "_config.yml").read_text()
    assert "url: https://github.com/a-university/kd-labs\n" in config and "branch: fall2026\n" in config
    assert config.count("\n#") == before[tmp_path / "kdbook" / "_config.yml"].count("\n#"), "comments kept"
    appendix = (tmp_path / "kdbook" / "appendix.md").read_text()
    assert "https://github.com/a-university/kd-labs/blob/fall2026/kdbook_utils/train.py" in appendix
    assert "https://github.com/kdbook/kdbook-extra" in appendix, "another repository's link must stay"
    notebook = (tmp_path / "notebooks" / "00_start_here.ipynb").read_text()
    assert "git+https://github.com/a-university/kd-labs@fall2026" in notebook
    nbformat_json = json.loads(notebook)  # still valid JSON
    assert nbformat_json["cells"]

    set_repository.set_repository(original, tmp_path)
    after = {path: path.read_text() for path in tmp_path.rglob("*") if path.is_file()}
    assert after == before, "moving to a fork and back must restore every file byte for byte"


def test_set_repository_rejects_addresses_it_cannot_link(tmp_path: Path) -> None:
    set_repository = load_module(REPO / "scripts" / "set_repository.py")
    with pytest.raises(ValueError, match="https://github.com/OWNER/NAME"):
        set_repository.parse_repository("https://gitlab.com/my-org/kd-course", "main")
    with pytest.raises(ValueError, match="branch 'feature/x'"):
        set_repository.parse_repository("https://github.com/my-org/kd-course", "feature/x")
    assert set_repository.parse_repository("https://github.com/my-org/kd-course/", "main").url == (
        "https://github.com/my-org/kd-course"
    )


# ---------------------------------------------------------------------------------------------- the book


def test_book_config_renders_without_executing() -> None:
    config = yaml.safe_load((BOOK / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["only_build_toc_files"] is True
    set_repository = load_module(REPO / "scripts" / "set_repository.py")
    set_repository.parse_repository(config["repository"]["url"], config["repository"]["branch"])  # valid
    assert config["repository"]["path_to_book"] == "kdbook"
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


def test_lesson_links_point_at_the_student_notebooks() -> None:
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
        "https://colab.research.google.com/github/kdbook/kdbook/blob/main/notebooks/student/01_x.ipynb",
        "https://mybinder.org/v2/gh/kdbook/kdbook/main?urlpath=lab/tree/notebooks/student/01_x.ipynb",
    ]
    untouched = {"header_buttons": [{"url": "https://github.com/kdbook/kdbook/blob/main/kdbook/intro.md"}]}
    links.retarget_links(None, "intro", "page.html", untouched, None)
    assert untouched["header_buttons"][0]["url"].endswith("kdbook/intro.md")


@pytest.mark.book
@pytest.mark.notebook
def test_book_builds_offline(built_book: Path) -> None:
    """The book built from this session's executed notebooks (one build, shared with every test that reads
    it): the lessons' links are rewritten to the student notebooks, math and scripts are the book's own."""
    html = built_book
    assert (html / "index.html").is_file()
    lesson = (html / "lessons" / "01_hinton_kd.html").read_text()
    repository = load_module(REPO / "scripts" / "set_repository.py").configured_repository(REPO)
    colab = f"colab.research.google.com/github/{repository.owner_name}/blob/{repository.branch}"
    assert f"{colab}/notebooks/student/01_hinton_kd.ipynb" in lesson
    assert "kdbook/lessons/01_hinton_kd.ipynb" not in lesson
    assert "Lesson 1" in lesson
    # Math is typeset by the book's own copy of MathJax, and code wraps (kdbook/_static/kdbook.css).
    assert 'src="../_static/mathjax/tex-chtml.js"' in lesson
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert any((html / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert "_static/kdbook.css" in lesson and "pre-wrap" in (html / "_static" / "kdbook.css").read_text()
    # A first visit (nothing in localStorage) starts in a valid mode: no "Got invalid theme mode" error.
    assert 'localStorage.getItem("mode") || "auto"' in lesson
    scripts = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", lesson)
    assert scripts and not [src for src in scripts if "://" in src], f"scripts from the network: {scripts}"


def book_text(page: Path) -> str:
    """A built page's visible text, line by line (tags dropped, entities decoded)."""
    markup = re.sub(r"(?is)<(script|style)\b.*?</\1>", "", page.read_text())
    markup = re.sub(r"(?i)<br\s*/?>|</(p|div|li|tr|h[1-6]|pre)>", "\n", markup)
    return html_module.unescape(re.sub(r"<[^>]+>", "", markup))


def solution_lines() -> list[str]:
    """Every line of every solution region of the instructor's notebooks (long enough to be telling)."""
    import nbformat

    lines = []
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            inside = False
            for line in cell.source.split("\n"):
                if "BEGIN SOLUTION" in line:
                    inside = True
                elif "END SOLUTION" in line:
                    inside = False
                elif inside and len(line.strip()) >= 20 and not line.strip().startswith("#"):
                    lines.append(line.strip())
    return lines


@pytest.mark.book
@pytest.mark.notebook
def test_the_built_book_shows_no_solution(built_book: Path) -> None:
    """The book is the student edition: no solution region, no hidden test, no line of a solution."""
    solutions = solution_lines()
    assert len(solutions) > 10, "the notebooks' solutions were found"
    leaks = []
    for page in sorted(built_book.rglob("*.html")):
        text = page.read_text()
        for marker in ("BEGIN SOLUTION", "BEGIN HIDDEN TESTS", "assert_passed"):
            if marker in text:
                leaks.append(f"{page.relative_to(built_book)}: {marker}")
        visible = book_text(page)
        leaks += [f"{page.relative_to(built_book)}: {line!r}" for line in solutions if line in visible]
    assert not leaks, "solution code in the built book: " + "; ".join(leaks[:8])


@pytest.mark.book
@pytest.mark.notebook
def test_the_built_book_renders_every_markdown_table(built_book: Path) -> None:
    """A Markdown table (in a page or a notebook output) becomes an HTML table, never raw '| a | b |' text."""
    raw = []
    for page in sorted(built_book.rglob("*.html")):
        for line in book_text(page).splitlines():
            if re.match(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*$", line):
                raw.append(f"{page.relative_to(built_book)}: {line.strip()[:60]}")
    assert not raw, "raw Markdown tables in the built book: " + "; ".join(raw[:8])
    lesson = (built_book / "lessons" / "01_hinton_kd.html").read_text()
    assert "<table" in lesson


@pytest.mark.book
@pytest.mark.notebook
def test_every_page_loads_each_of_its_scripts_once(built_book: Path) -> None:
    """A script included twice redeclares its constants (THEBE_JS_URL) and logs an error on every page."""
    repeated = []
    for page in sorted(built_book.rglob("*.html")):
        text = page.read_text()
        sources = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", text)
        repeated += [
            f"{page.relative_to(built_book)}: {src}" for src in set(sources) if sources.count(src) > 1
        ]
        if text.count("THEBE_JS_URL =") > 1:
            repeated.append(
                f"{page.relative_to(built_book)}: THEBE_JS_URL declared {text.count('THEBE_JS_URL =')} times"
            )
    assert not repeated, "; ".join(repeated[:8])
