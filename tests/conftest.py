"""Shared fixtures.

``cifar10_root``: the real CIFAR-10 JPEG copy, extracted once from the project's zips into a cache
folder (never into the repository) and reused by later sessions. The zips are looked for in
``$KDBOOK_CIFAR10_JPEG``, else ``<repo>/../shared/data/cifar10-jpeg`` (CI clones the repository with
``shared/`` beside it); tests that need them are skipped with the reason when they are missing.

``executed_notebooks``: every notebook in ``notebooks/`` executed once per test session with the quick
preset, on first request, and kept: the notebook tests check the executed copies, and the browser test
builds the book from them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

REPO = Path(__file__).resolve().parents[1]
CIFAR10_ZIPS = ("train.zip", "test.zip")
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 900  # seconds a notebook cell may run


def cifar10_zip_folder() -> Path:
    configured = os.environ.get("KDBOOK_CIFAR10_JPEG")
    return Path(configured).expanduser() if configured else REPO.parent / "shared" / "data" / "cifar10-jpeg"


def _extraction_folder() -> Path:
    cache = os.environ.get("KDBOOK_CACHE")
    base = (
        Path(cache).expanduser() / "test-data" if cache else Path(tempfile.gettempdir()) / "kdbook-test-data"
    )
    return base / "cifar10-jpeg"


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    """A folder holding ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` of the real CIFAR-10."""
    source = cifar10_zip_folder()
    archives = [source / name for name in CIFAR10_ZIPS]
    missing = [str(path) for path in archives if not path.is_file()]
    if missing:
        pytest.skip(
            f"the real CIFAR-10 zips are not here ({', '.join(missing)} missing); set KDBOOK_CIFAR10_JPEG "
            "to the folder holding train.zip and test.zip to run this test"
        )
    target = _extraction_folder()
    stamp = ";".join(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}" for path in archives)
    stamp_file = target / ".extracted-from"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return target

    # Extract next to the target, then rename, so an interrupted run never leaves a half-extracted copy.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".cifar10-jpeg-"))
    try:
        for archive in archives:
            with zipfile.ZipFile(archive) as opened:
                opened.extractall(staging)
        (staging / stamp_file.name).write_text(stamp)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def decoded_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of decoded CIFAR-10 tensors for the whole session: a test that gives itself a private
    cache links its ``decoded/`` here (:func:`private_cache`), so the 60,000 JPEGs are decoded once."""
    return tmp_path_factory.mktemp("decoded")


def private_cache(folder: Path, decoded: Path) -> Path:
    """A fresh cache folder at ``folder`` whose decoded images are the session's (see ``decoded_images``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "decoded").symlink_to(decoded, target_is_directory=True)
    return folder


# ----------------------------------------------------------------------------------- executed notebooks


def load_executor() -> ModuleType:
    """``scripts/execute_notebooks.py``, the executor that ``scripts/book.sh`` uses."""
    path = REPO / "scripts" / "execute_notebooks.py"
    spec = importlib.util.spec_from_file_location("execute_notebooks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class NotebookRun:
    """One notebook's execution: the executed copy (``None`` if a cell failed), or the error."""

    source: Path
    executed: Path | None
    error: Exception | None
    seconds: float


class ExecutedNotebooks:
    """Runs each notebook's student edition (what the book shows) at most once per session, in a fresh
    kernel running this Python with the quick preset. All runs share one empty cache folder
    (``KDBOOK_CACHE``), as in a student's session. Executed copies (outputs and widget state included)
    are written to ``folder``."""

    def __init__(self, folder: Path, cache: Path) -> None:
        self.folder = folder
        (folder / "editions").mkdir(exist_ok=True)
        self.cache = cache
        self.executor = load_executor()
        self.kernel_name: str = self.executor.KERNEL_NAME
        self._runs: dict[str, NotebookRun] = {}

    def run(self, source: Path) -> NotebookRun:
        """Execute ``source`` (a notebook in ``notebooks/``) unless this session already has."""
        if source.name in self._runs:
            return self._runs[source.name]
        start = time.perf_counter()
        executed: Path | None = None
        error: Exception | None = None
        with self.executor.kernel_for_this_python("quick", {"KDBOOK_CACHE": str(self.cache)}) as name:
            try:
                student = self.executor.student_edition_of(source, self.folder / "editions")
                notebook = self.executor.execute_notebook(
                    student, kernel_name=name, timeout=CELL_TIMEOUT_S, cwd=source.parent
                )
            except (CellExecutionError, CellTimeoutError, DeadKernelError) as failure:
                error = failure
            except BaseException as interruption:  # e.g. the test's time limit: no second attempt later
                self._runs[source.name] = NotebookRun(source, None, interruption, time.perf_counter() - start)
                raise
            else:
                executed = self.folder / source.name
                nbformat.write(notebook, executed)
        run = NotebookRun(source, executed, error, time.perf_counter() - start)
        self._runs[source.name] = run
        return run

    def run_all(self) -> list[NotebookRun]:
        """Every notebook in ``notebooks/``, in order (those already run are not run again)."""
        return [self.run(source) for source in NOTEBOOKS]


@pytest.fixture(scope="session")
def executed_notebooks(tmp_path_factory: pytest.TempPathFactory) -> ExecutedNotebooks:
    folder, cache = tmp_path_factory.mktemp("executed-notebooks"), tmp_path_factory.mktemp("kdbook-cache")
    return ExecutedNotebooks(folder, cache)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory: pytest.TempPathFactory, executed_notebooks: ExecutedNotebooks) -> Path:
    """The book built once per session, as ``scripts/book.sh`` builds it, from this session's executed
    notebooks (their student editions); every test that reads the built book reads this one."""
    jupyter_book = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    if jupyter_book is None:
        pytest.skip("jupyter-book is not installed (pip install -e '.[book]')")
    runs = executed_notebooks.run_all()
    failed = [run.source.name for run in runs if run.executed is None]
    assert not failed, f"the book would lack pages: these notebooks failed to run: {', '.join(failed)}"
    copy = tmp_path_factory.mktemp("book")
    shutil.copytree(REPO / "kdbook", copy / "kdbook", ignore=shutil.ignore_patterns("_build", "lessons"))
    shutil.copytree(REPO / "scripts", copy / "scripts")
    (copy / "kdbook" / "lessons").mkdir()
    for run in runs:
        assert run.executed is not None
        shutil.copy(run.executed, copy / "kdbook" / "lessons" / run.source.name)
    generated = copy / "kdbook" / "_generated" / "times.md"
    subprocess.run([sys.executable, "-c", (f"from kdbook_utils.lessons import write_timings_markdown as w; "
                    f"w({str(generated)!r})")], check=True)  # fmt: skip
    toc = copy / "kdbook" / "_build" / "_toc.yml"
    subprocess.run([sys.executable, str(copy / "scripts" / "book_toc.py"), str(toc)], check=True)
    build = [jupyter_book, "build", str(copy / "kdbook"), "--toc", str(toc)]
    result = subprocess.run(build, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "WARNING" not in result.stdout + result.stderr, "the book builds without warnings"
    return copy / "kdbook" / "_build" / "html"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Browser tests run last: they reuse the notebooks that the notebook tests executed."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
