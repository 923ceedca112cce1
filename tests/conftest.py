"""Shared fixtures.

``cifar10_root``: the real CIFAR-10 JPEG copy, extracted once from the project's zips into a cache
folder (never into the repository) and reused by later sessions. The zips are looked for in
``$KDBOOK_CIFAR10_JPEG``, else ``<repo>/../shared/data/cifar10-jpeg`` (CI clones the repository with
``shared/`` beside it); tests that need them are skipped with the reason when they are missing.

``executed_notebooks``: every notebook in ``notebooks/`` executed once per test session with the quick
preset, on first request, and kept: the notebook tests check the executed copies, and the browser test
builds the book from them.

The test command runs pytest in two processes (pytest-xdist, ``scripts/test.sh``). What a session does once
(extract CIFAR-10, execute a notebook, build the book) is done once for both: the work sits in a folder the
workers share (:func:`shared_folder`) and a file lock lets the first worker that needs it do it while the
other waits and reuses the result. Tests are grouped so that each group runs in one worker
(:func:`pytest_collection_modifyitems`): one group per executed notebook, one for the book and the browser,
one for the tests of real CIFAR-10, and one per module otherwise (its module-scoped fixtures built once).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
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


def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder every worker of this test session shares (the session's own temporary folder without
    pytest-xdist, where the workers' folders sit side by side with it)."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created if missing): one worker at a time."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    with exclusive(target.parent / ".cifar10-jpeg.lock"):  # two workers never extract at once
        return _extract(archives, target)


def _extract(archives: list[Path], target: Path) -> Path:
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
    return shared_folder(tmp_path_factory, "decoded")


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


class NotebookFailed(Exception):
    """A notebook that the other worker executed failed: its error, as that worker recorded it."""


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
        """Execute ``source`` (a notebook in ``notebooks/``) unless this session already has (in this worker
        or the other: the executed copy and a record of the run are in the shared folder)."""
        if source.name in self._runs:
            return self._runs[source.name]
        record = self.folder / f"{source.stem}.run.json"
        with exclusive(self.folder / f"{source.stem}.lock"):
            if record.is_file():
                done = json.loads(record.read_text())
                run = NotebookRun(source, self.folder / source.name if done["executed"] else None,
                                  None if done["error"] is None else NotebookFailed(done["error"]), done["seconds"])  # fmt: skip
            else:
                run = self._execute(source)
                record.write_text(json.dumps({"executed": run.executed is not None, "seconds": run.seconds,
                                              "error": None if run.error is None else str(run.error)}))  # fmt: skip
        self._runs[source.name] = run
        return run

    def _execute(self, source: Path) -> NotebookRun:
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
        return NotebookRun(source, executed, error, time.perf_counter() - start)

    def run_all(self) -> list[NotebookRun]:
        """Every notebook in ``notebooks/``, in order (those already run are not run again)."""
        return [self.run(source) for source in NOTEBOOKS]


@pytest.fixture(scope="session")
def executed_notebooks(tmp_path_factory: pytest.TempPathFactory) -> ExecutedNotebooks:
    folder = shared_folder(tmp_path_factory, "executed-notebooks")
    return ExecutedNotebooks(folder, shared_folder(tmp_path_factory, "kdbook-cache"))


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
    copy = shared_folder(tmp_path_factory, "book")
    with exclusive(copy.parent / "book.lock"):  # built once for both workers
        if not (copy / ".built").is_file():
            _build_book(jupyter_book, runs, copy)
            (copy / ".built").write_text("")
    return copy / "kdbook" / "_build" / "html"


def _build_book(jupyter_book: str, runs: list[NotebookRun], copy: Path) -> None:
    shutil.rmtree(copy / "kdbook", ignore_errors=True)  # what a failed attempt left
    shutil.rmtree(copy / "scripts", ignore_errors=True)
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


#: Modules whose tests take a minute or more in all (subprocesses, Ray, torchrun, a wheel build): scheduled
#: right after the notebooks, so that no long group is left for the end while the other worker waits.
LONG_MODULES = ("tests/test_sweep.py", "tests/test_distributed.py", "tests/test_editions.py", "tests/test_cli.py",
                "tests/test_release.py", "tests/test_experiments.py")  # fmt: skip


def _group(item: pytest.Item) -> tuple[int, str]:
    """The xdist group of ``item`` and its rank in the run order: the executed notebooks first (the longest
    groups, one per notebook), then the long modules and CIFAR-10's tests, then each other module's tests,
    then the book and the browser (they read every executed notebook, so they come when the notebooks are
    done)."""
    if item.get_closest_marker("browser") is not None or item.get_closest_marker("book") is not None:
        return 4 if item.get_closest_marker("browser") else 3, "book"
    if item.get_closest_marker("cifar") is not None:
        return 1, "cifar"  # decoded once, in one worker
    notebook = getattr(getattr(item, "callspec", None), "params", {}).get("path")
    if item.get_closest_marker("notebook") is not None and isinstance(notebook, Path):
        return 0, f"notebook-{notebook.stem}"
    module = item.nodeid.split("::")[0]
    return (1 if module in LONG_MODULES else 2), module


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order and group the tests (see the module's docstring); browser tests run last either way."""
    ranked = {item.nodeid: _group(item) for item in items}
    items.sort(key=lambda item: ranked[item.nodeid][0])
    for item in items:
        item.add_marker(pytest.mark.xdist_group(ranked[item.nodeid][1]))
