"""Execute the course notebooks top to bottom, each in a fresh kernel running *this* Python.

    python scripts/execute_notebooks.py                      # every notebooks/*.ipynb, preset quick
    python scripts/execute_notebooks.py notebooks/01_hinton_kd.ipynb --out kdbook/lessons --preset lab

The kernel is this interpreter (the project's .venv when run by scripts/book.sh), whatever kernels
Jupyter has registered elsewhere: a private kernel spec is written to a temporary folder placed first on
JUPYTER_PATH. Each notebook runs in its own folder (``notebooks/``) with ``KDBOOK_PRESET`` set, as its
**student edition** (made by scripts/editions.py: solutions stubbed, hidden tests left out), which is what
the book shows; ``--edition instructor`` runs the notebooks as they are. A failing cell stops that
notebook; the cell's source and traceback are printed, the other notebooks still run, and the exit status
is 1. Executed copies (outputs and widget state included) go to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import nbformat
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL_NAME = "kdbook-executor"
DEFAULT_TIMEOUT_S = 900


@contextmanager
def kernel_for_this_python(
    preset: str, env: Mapping[str, str] | None = None, python: str | None = None
) -> Iterator[str]:
    """A kernel spec that starts ``sys.executable`` (or ``python``, another environment's interpreter)
    with ``KDBOOK_PRESET=preset`` and the variables in ``env`` (e.g. ``KDBOOK_CACHE``) set; yields its
    name."""
    python = python or sys.executable
    with tempfile.TemporaryDirectory(prefix="kdbook-kernel-") as folder:
        spec_dir = Path(folder, "kernels", KERNEL_NAME)
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"kdbook ({python})",
            "language": "python",
            "env": {"KDBOOK_PRESET": preset, "PYDEVD_DISABLE_FILE_VALIDATION": "1", **(env or {})},
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
        previous = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [folder, previous]))
        try:
            yield KERNEL_NAME
        finally:
            if previous is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = previous


def peak_resident_mib(pid: int | str = "self") -> float | None:
    """The most resident memory process ``pid`` has held so far, in MiB (Linux: ``VmHWM`` in
    ``/proc/<pid>/status``); None where the system does not say."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, flags=re.MULTILINE)
    return int(found.group(1)) / 1024 if found else None


class KernelMemory:
    """The kernel's peak resident memory while it ran a notebook, read after every cell (``VmHWM`` is a
    high-water mark, so the last reading is the peak). The kernel process only: none of the lessons starts
    worker processes in its kernel."""

    def __init__(self) -> None:
        self.peak_mib: float | None = None

    def read(self, client: NotebookClient) -> None:
        pid = getattr(getattr(client.km, "provisioner", None), "pid", None)
        peak = peak_resident_mib(pid) if pid is not None else None
        if peak is not None:
            self.peak_mib = max(peak, self.peak_mib or 0.0)


def execute_notebook(
    path: Path,
    *,
    kernel_name: str,
    timeout: int = DEFAULT_TIMEOUT_S,
    cwd: Path | None = None,
    allow_errors: bool = False,
    memory: KernelMemory | None = None,
) -> nbformat.NotebookNode:
    """Run every cell of ``path`` in order and return the executed notebook (raises on a failing cell,
    unless ``allow_errors``: then every cell runs and errors stay in the outputs, as a grader runs it).
    With ``memory``, the kernel's peak resident memory is recorded in it.

    The kernel talks to this process over local sockets (the IPC transport), not TCP: nothing listens on
    the network, and the kernel has no reason to warn that its traffic is unencrypted."""
    notebook = nbformat.read(path, as_version=4)
    original_kernelspec = notebook.metadata.get("kernelspec")
    # The sockets get an absolute path prefix (a relative one would depend on each side's working folder).
    with tempfile.TemporaryDirectory(prefix="kdbook-kernel-ipc-") as sockets:
        client = NotebookClient(
            notebook,
            km=AsyncKernelManager(kernel_name=kernel_name, transport="ipc", ip=str(Path(sockets) / "kernel")),
            kernel_name=kernel_name,
            timeout=timeout,
            allow_errors=allow_errors,
            resources={"metadata": {"path": str(cwd or path.parent)}},
            store_widget_state=True,
        )
        if memory is not None:
            client.on_cell_executed = lambda **_: memory.read(client)
        try:
            client.execute()
        finally:
            # nbclient shuts its kernel down itself, unless something interrupted it from outside (Ctrl-C, a
            # test's time limit): then the kernel would go on computing until this process exits.
            manager = client.km
            if manager is not None and run_sync(manager.is_alive)():
                run_sync(manager.shutdown_kernel)(now=True)
    # Keep the notebook's own kernel name (python3) rather than our temporary one.
    notebook.metadata["kernelspec"] = original_kernelspec or {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    return notebook


def student_edition_of(path: Path, folder: Path) -> Path:
    """Write the student edition of the lesson at ``path`` into ``folder`` (solutions stubbed, hidden tests
    left out: what the book, Colab and Binder show) and return its path."""
    editions = _editions()
    target = folder / path.name
    nbformat.write(editions.student_edition(editions.read_notebook(path), path.name), target)
    return target


def _editions() -> ModuleType:
    name = "kdbook_editions"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("editions.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_all(
    paths: Sequence[Path], *, out_dir: Path | None, preset: str, timeout: int, edition: str = "student"
) -> int:
    """Execute ``paths`` one by one (``edition`` "student": each lesson's student edition, as the book shows
    it; "instructor": the notebooks as they are), print a time per notebook, write executed copies; 0 when
    all pass."""
    failures: list[str] = []
    timings: list[tuple[str, float, str]] = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    with kernel_for_this_python(preset) as kernel_name, tempfile.TemporaryDirectory() as editions_folder:
        for path in paths:
            print(f"▶ {path.name} (preset {preset}, {edition} edition) ...", flush=True)
            start = time.perf_counter()
            status = "ok"
            source = student_edition_of(path, Path(editions_folder)) if edition == "student" else path
            try:
                executed = execute_notebook(source, kernel_name=kernel_name, timeout=timeout, cwd=path.parent)
            except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
                status = "FAILED"
                failures.append(path.name)
                print(f"\n✗ {path.name} failed:\n{error}\n", file=sys.stderr, flush=True)
                if out_dir is not None:
                    (out_dir / path.name).unlink(missing_ok=True)  # never publish a stale copy
            else:
                if out_dir is not None:
                    nbformat.write(executed, out_dir / path.name)
            seconds = time.perf_counter() - start
            timings.append((path.name, seconds, status))
            print(f"  {status} in {seconds:.0f} s", flush=True)
    width = max(len(name) for name, _, _ in timings) if timings else 10
    print("\nnotebook".ljust(width + 1), "seconds  status")
    for name, seconds, status in timings:
        print(name.ljust(width), f"{seconds:7.0f}  {status}")
    print("total".ljust(width), f"{sum(s for _, s, _ in timings):7.0f}")
    if failures:
        print(f"\n{len(failures)} notebook(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="notebooks to run (default: notebooks/*.ipynb)"
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for the executed copies")
    parser.add_argument(
        "--preset", default=os.environ.get("KDBOOK_PRESET", "quick"), help="KDBOOK_PRESET value"
    )
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S, help="seconds allowed per cell")
    parser.add_argument("--edition", choices=("student", "instructor"), default="student",
                        help="run each lesson's student edition (default: what the book shows) or the "
                             "instructor's notebook as it is")  # fmt: skip
    args = parser.parse_args(argv)
    paths = [path.resolve() for path in args.notebooks] or sorted(NOTEBOOKS.glob("*.ipynb"))
    if not paths:
        print(f"No notebooks found in {NOTEBOOKS}.", file=sys.stderr)
        return 1
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        print(f"Not found: {', '.join(missing)}", file=sys.stderr)
        return 1
    return run_all(paths, out_dir=args.out, preset=args.preset, timeout=args.timeout, edition=args.edition)


if __name__ == "__main__":
    sys.exit(main())
