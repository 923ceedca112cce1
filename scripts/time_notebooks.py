"""Measure how long the notebooks take, and record it for the notebooks, the book and the README.

    python scripts/time_notebooks.py --preset quick                 # fresh cache, then again with it warm
    python scripts/time_notebooks.py --preset lab --data ~/data/cifar10 notebooks/01_hinton_kd.ipynb
    python scripts/time_notebooks.py --preset lab --only-cached ...  # the cache in $KDBOOK_CACHE is warm
    python scripts/time_notebooks.py --preset lab --teachers ...     # + the teachers, timed on their own

Each notebook is executed twice in a fresh kernel (with ``scripts/execute_notebooks.py``'s kernel): first
with an empty teacher cache (``teachers: empty cache, notebooks in order``: notebook 01 finds the teacher
that 00 trained), then again with the cache that run filled (``already cached``). Each run appends a row to ``kdbook_utils/results/timings.csv``, replacing an earlier
row of the same notebook, preset, cache state and machine: the notebook, preset, cache state, machine, date
and seconds. The notebooks' introductions, the instructor guide and the README read that file.

``--teachers`` is the cheaper way to the empty-cache time when the notebooks are long (``lab`` on a small
CPU): an empty cache differs from a warm one only in the teachers the notebook trains, so it trains each
notebook's teachers on their own, from an empty cache, exactly as the lesson does (its runner's
``prepare`` and ``notebook_teachers``), and records the notebook's empty-cache time as its measured cached
time plus theirs (the ``teacher_seconds`` column says how much of the time they are).
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
COLUMNS = ["notebook", "preset", "cached", "machine", "date", "seconds", "teacher_seconds"]
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


def record(rows: list[dict]) -> None:
    table = pd.read_csv(TIMINGS) if TIMINGS.is_file() else pd.DataFrame(columns=COLUMNS)
    for row in rows:
        same = ((table["notebook"] == row["notebook"]) & (table["preset"] == row["preset"])
                & (table["cached"] == row["cached"]) & (table["machine"] == row["machine"]))  # fmt: skip
        table = pd.concat([table[~same], pd.DataFrame([row])], ignore_index=True)
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    table.sort_values(["notebook", "preset", "cached"]).to_csv(TIMINGS, index=False)


def teacher_seconds(lesson: str, preset_name: str) -> float:
    """Seconds to train ``lesson``'s teachers from an empty cache, as the lesson does: its runner's
    ``prepare`` and ``notebook_teachers`` in an empty cache, less the same calls once they are cached
    (data handling, loading)."""
    sys.path.insert(0, str(ROOT))
    from kdbook_utils.lessons.records import LESSONS
    from kdbook_utils.presets import get_preset

    preset = get_preset(preset_name)
    entry = LESSONS[lesson]
    runner = entry.runner
    empty = tempfile.TemporaryDirectory(prefix="kdbook-teacher-timing-")
    with empty as cache, mock.patch.dict(os.environ, {"KDBOOK_CACHE": cache}):
        splits = entry.data(preset)
        times = []
        for _ in ("empty cache", "cached"):
            started = time.perf_counter()
            runner.prepare(preset, splits, progress=False).notebook_teachers()
            times.append(time.perf_counter() - started)
    print(f"{lesson}: teachers {times[0]:.0f} s from an empty cache, {times[1]:.0f} s cached", flush=True)
    return times[0] - times[1]


def add_teachers(paths: Sequence[Path], preset: str, where: str, today: str) -> list[dict]:
    """Empty-cache rows: each notebook's recorded cached time on this machine plus its teachers' time."""
    table = pd.read_csv(TIMINGS) if TIMINGS.is_file() else pd.DataFrame(columns=COLUMNS)
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
        teachers = measured[lesson]
        rows.append({"notebook": path.stem, "preset": preset, "cached": False, "machine": where, "date": today,
                     "seconds": round(float(cached["seconds"].iloc[-1]) + teachers, 1),
                     "teacher_seconds": round(teachers, 1)})  # fmt: skip
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
                    started = time.perf_counter()
                    executed = executor.execute_notebook(
                        path, kernel_name=kernel, timeout=executor.DEFAULT_TIMEOUT_S * 4
                    )
                    seconds = time.perf_counter() - started
                    if args.keep:
                        args.keep.mkdir(parents=True, exist_ok=True)
                        nbformat.write(executed, args.keep / path.name)
                    print(
                        f"{path.name}: {seconds:.0f} s ({'cached' if cached else 'empty cache'})", flush=True
                    )
                    rows.append({"notebook": path.stem, "preset": args.preset, "cached": cached, "machine": where,
                                 "date": today, "seconds": round(seconds, 1)})  # fmt: skip
                record(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
