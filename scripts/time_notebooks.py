"""Measure how long the notebooks take and how much memory they need, and record both for the notebooks,
the book and the README.

    python scripts/time_notebooks.py --preset quick                 # fresh cache, then again with it warm
    python scripts/time_notebooks.py --preset lab --data ~/data/cifar10 notebooks/01_hinton_kd.ipynb
    python scripts/time_notebooks.py --preset lab --only-cached ...  # the cache in $KDBOOK_CACHE is warm
    python scripts/time_notebooks.py --preset paper --teachers ...   # + the teachers, timed on their own
    python scripts/time_notebooks.py --preset quick --memory-only    # memory only; the times recorded stay

Each notebook is executed twice in a fresh kernel (with ``scripts/execute_notebooks.py``'s kernel): first
with an empty cache (``teachers: empty cache, notebooks in order``: shipped teachers load from the package,
anything else is trained; in ``paper``, whose teachers do not ship, notebook 01 finds the teacher that 00
trained), then again with the cache that run filled (``already cached``). Each run appends a row to
``kdbook_utils/results/timings.csv``, replacing an earlier row of the same notebook, preset, cache state and
machine: the notebook, preset, cache state, machine, date and seconds, and the kernel's peak resident memory
in MiB (``peak_memory_mib``, Linux's ``VmHWM`` of the kernel process, with ``memory_date``), which tells an
instructor how much memory a student's pod needs. The notebooks' introductions, the instructor guide and
the README read that file; rows written before memory was measured have none (shown as not measured yet).

``--memory-only`` runs the same way but records only the memory, into the rows already there, and keeps
their times: on a machine busy with other work the times would come out too long, the memory would not.

``--teachers`` is for presets whose teachers do not ship (``paper``; ``quick`` and ``lab`` ship theirs, so
there is nothing to time): it is the cheaper way to the empty-cache time when the notebooks are long. An empty cache differs from a warm one only in the teachers the notebook trains, so it trains each
notebook's teachers on their own, from an empty cache, exactly as the lesson does (its runner's
``prepare`` and ``notebook_teachers``), and records the notebook's empty-cache time as its measured cached
time plus theirs (the ``teacher_seconds`` column says how much of the time they are). Its peak memory is the
larger of the cached run's and that of this process while it trained the teachers.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import nbformat
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = ROOT / "kdbook_utils" / "results" / "timings.csv"
COLUMNS = ["notebook", "preset", "cached", "machine", "date", "seconds", "teacher_seconds", "peak_memory_mib",
           "memory_date"]  # fmt: skip
KEY = ["notebook", "preset", "cached", "machine"]
NOTEBOOK_LESSON = {
    "00_start_here": "hinton",  # notebook 00 trains the teacher that lesson 1 loads
    "01_hinton_kd": "hinton",
    "02_lsl_layer_selection": "lsl",
    "03_cross_layer_kd": "crosslayer",
    "04_mskd_multi_exit": "mskd",
    "05_lm_distillation": "lm",
}


def load_executor():
    spec = importlib.util.spec_from_file_location(
        "execute_notebooks", ROOT / "scripts" / "execute_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def machine() -> str:
    sys.path.insert(0, str(ROOT))
    from kdbook_utils.experiments import machine_description

    return machine_description()


def read_timings() -> pd.DataFrame:
    """The recorded rows, with every column (older files lack the memory columns)."""
    table = pd.read_csv(TIMINGS) if TIMINGS.is_file() else pd.DataFrame(columns=COLUMNS)
    table = table.reindex(columns=[*table.columns, *(c for c in COLUMNS if c not in table.columns)])
    return table.astype({"peak_memory_mib": float, "memory_date": object})


def same_run(table: pd.DataFrame, row: dict) -> pd.Series:
    """Rows of ``table`` for the same notebook, preset, cache state and machine as ``row``."""
    same = pd.Series(True, index=table.index)
    for key in KEY:
        same &= table[key].astype(str).str.lower() == str(row[key]).lower()
    return same


def record(rows: list[dict], memory_only: bool = False) -> None:
    """Write ``rows`` into the timings file, each replacing the row of the same run; with ``memory_only``,
    only the memory of a run already recorded is replaced (its time stays)."""
    table = read_timings()
    for row in rows:
        same = same_run(table, row)
        if memory_only and same.any():
            table.loc[same, ["peak_memory_mib", "memory_date"]] = [row["peak_memory_mib"], row["memory_date"]]
        else:
            table = pd.concat([table[~same], pd.DataFrame([row])], ignore_index=True)
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    table.sort_values(["notebook", "preset", "cached"]).to_csv(TIMINGS, index=False)


def rounded_mib(mib: float | None) -> float | None:
    return None if mib is None else float(round(mib))


def reset_peak_memory() -> bool:
    """Start this process's resident high-water mark afresh (Linux: ``5`` into ``/proc/self/clear_refs``);
    False where that is not possible (the peak then counts from the start of the process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def teacher_seconds(lesson: str, preset_name: str) -> tuple[float, float | None]:
    """Seconds to train ``lesson``'s teachers from an empty cache, as the lesson does: its runner's
    ``prepare`` and ``notebook_teachers`` in an empty cache, less the same calls once they are cached
    (data handling, loading); and this process's peak resident memory (MiB) meanwhile."""
    sys.path.insert(0, str(ROOT))
    from kdbook_utils.lessons.records import LESSONS
    from kdbook_utils.presets import get_preset

    preset = get_preset(preset_name)
    entry = LESSONS[lesson]
    runner = entry.runner
    empty = tempfile.TemporaryDirectory(prefix="kdbook-teacher-timing-")
    reset_peak_memory()
    with empty as cache, mock.patch.dict(os.environ, {"KDBOOK_CACHE": cache}):
        splits = entry.data(preset)
        times = []
        for _ in ("empty cache", "cached"):
            started = time.perf_counter()
            runner.prepare(preset, splits, progress=False).notebook_teachers()
            times.append(time.perf_counter() - started)
    peak = load_executor().peak_resident_mib()
    print(f"{lesson}: teachers {times[0]:.0f} s from an empty cache, {times[1]:.0f} s cached", flush=True)
    return times[0] - times[1], peak


def add_teachers(paths: Sequence[Path], preset: str, where: str, today: str) -> list[dict]:
    """Empty-cache rows: each notebook's recorded cached time on this machine plus its teachers' time."""
    table = read_timings()
    rows, measured = [], {}
    for path in paths:
        if path.stem not in NOTEBOOK_LESSON:
            raise SystemExit(f"{path.name}: no lesson known for it; add it to NOTEBOOK_LESSON.")
        cached = table[(table["notebook"] == path.stem) & (table["preset"] == preset)
                       & (table["cached"].astype(str).str.lower() == "true") & (table["machine"] == where)]  # fmt: skip
        if cached.empty:
            raise SystemExit(
                f"{path.name}: no cached {preset} time on this machine yet; run --only-cached first."
            )
        lesson = NOTEBOOK_LESSON[path.stem]
        if lesson not in measured:
            measured[lesson] = teacher_seconds(lesson, preset)
        teachers, teachers_peak = measured[lesson]
        cached_peak = cached["peak_memory_mib"].iloc[-1]
        peak = max(float(cached_peak), teachers_peak) if pd.notna(cached_peak) and teachers_peak else None
        rows.append({"notebook": path.stem, "preset": preset, "cached": False, "machine": where, "date": today,
                     "seconds": round(float(cached["seconds"].iloc[-1]) + teachers, 1),
                     "teacher_seconds": round(teachers, 1), "peak_memory_mib": rounded_mib(peak),
                     "memory_date": today if peak is not None else None})  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--data", default=None, help="data root for lab/paper (sets KDBOOK_DATA)")
    parser.add_argument(
        "--only-cached",
        action="store_true",
        help="one run with the cache in $KDBOOK_CACHE, whose teachers are already trained",
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="also write the executed notebooks to this folder"
    )
    parser.add_argument(
        "--teachers",
        action="store_true",
        help="time only the teachers, from an empty cache, and record each notebook's empty-cache time as "
        "its recorded cached time plus theirs",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="record only the notebooks' peak memory, into the rows already recorded (their times stay)",
    )
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    executor = load_executor()
    if args.data:
        os.environ["KDBOOK_DATA"] = str(Path(args.data).expanduser())
    where = machine()
    today = datetime.date.today().isoformat()
    if args.teachers:
        record(add_teachers(paths, args.preset, where, today))
        return 0
    with tempfile.TemporaryDirectory(prefix="kdbook-timing-cache-") as cache:
        if not args.only_cached:
            os.environ["KDBOOK_CACHE"] = cache
        runs = [True] if args.only_cached else [False, True]
        with executor.kernel_for_this_python(args.preset) as kernel:
            for cached in runs:
                rows = []
                for path in paths:  # in order: notebook 00 trains the teacher lesson 1 loads
                    memory = executor.KernelMemory()
                    started = time.perf_counter()
                    executed = executor.execute_notebook(
                        path, kernel_name=kernel, timeout=executor.DEFAULT_TIMEOUT_S * 4, memory=memory
                    )
                    seconds = time.perf_counter() - started
                    if args.keep:
                        args.keep.mkdir(parents=True, exist_ok=True)
                        nbformat.write(executed, args.keep / path.name)
                    peak = "not measured" if memory.peak_mib is None else f"{memory.peak_mib:.0f} MiB"
                    state = "cached" if cached else "empty cache"
                    print(f"{path.name}: {seconds:.0f} s, peak memory {peak} ({state})", flush=True)
                    rows.append({"notebook": path.stem, "preset": args.preset, "cached": cached, "machine": where,
                                 "date": today, "seconds": round(seconds, 1),
                                 "peak_memory_mib": rounded_mib(memory.peak_mib),
                                 "memory_date": today if memory.peak_mib is not None else None})  # fmt: skip
                record(rows, memory_only=args.memory_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
