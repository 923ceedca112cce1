"""Lesson support: each lesson's settings per preset, what it runs, its figures and tables, and the papers'
reported numbers (labelled as the papers'). The notebooks call these; the mathematics is in
:mod:`kdbook_utils.methods` and the jobs in :mod:`kdbook_utils.experiments`.

Recorded results travel with the package (``kdbook_utils/results/``), so a notebook opened on Colab or
Binder shows them too: the ``lab`` runs of every lesson (:func:`recorded_runs`) and the measured running
time of every notebook (:func:`notebook_times`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import pandas as pd
from IPython.display import Markdown

from kdbook_utils.experiments import StudentRun, recipe_hash, run_seeds

RESULTS = Path(__file__).resolve().parents[1] / "results"
"""Where recorded results live: ``lab/<lesson>.csv`` (+ ``.json`` provenance) and ``timings.csv``."""


def settings_hash(settings: Any) -> str:
    """A short hash of a lesson's settings (a dataclass): recorded results carry it, so results made with
    other settings than the lesson would run now are recognised."""
    return recipe_hash(dataclasses.asdict(settings))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _memory(row: Mapping[str, Any]) -> str:
    """The kernel's peak resident memory of a timed run, e.g. "610 MiB" or "1.4 GiB"."""
    mib = row.get("peak_memory_mib")
    if mib is None or pd.isna(mib):
        return "not measured yet"
    return f"{mib:.0f} MiB" if mib < 1024 else f"{mib / 1024:.1f} GiB"


def _measured(row: Mapping[str, Any]) -> str:
    """The date of the time, and of the memory where it was measured on another day."""
    memory_date = row.get("memory_date")
    if memory_date is None or pd.isna(memory_date) or memory_date == row["date"]:
        return str(row["date"])
    return f"{row['date']} (memory {memory_date})"


def _times_rows(table: pd.DataFrame) -> list[str]:
    lines = []
    for row in table.to_dict("records"):
        if str(row["cached"]).lower() == "true":
            teachers = "already cached"
        elif pd.notna(
            row.get("teacher_seconds")
        ):  # time_notebooks.py --teachers: cached run + teachers alone
            teachers = f"trained first ({_duration(row['teacher_seconds'])}, timed on their own)"
        else:
            teachers = "empty cache, notebooks in order"
        lines.append(f"| `{row['preset']}` | {teachers} | {row['machine']} | {_measured(row)} "
                     f"| {_duration(row['seconds'])} | {_memory(row)} |")  # fmt: skip
    return lines


def timings_markdown() -> str:
    """Every recorded notebook time and peak memory, as one Markdown table (the instructor guide shows it)."""
    path = RESULTS / "timings.csv"
    if not path.is_file():
        return "*No running times recorded yet.*\n"
    table = pd.read_csv(path)
    lines = [
        "| notebook | preset | teachers | machine | measured | time | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for notebook, rows in table.groupby("notebook", sort=True):
        lines += [f"| `{notebook}` " + line for line in _times_rows(rows)]
    return "\n".join(lines) + "\n"


def recordings_markdown() -> str:
    """How long each recorded experiment took (``results/<preset>/<lesson>.json``), as a Markdown table:
    the lesson's whole experiment from the command line, its teachers trained in the same run."""
    rows = []
    for path in sorted(RESULTS.glob("*/*.json")):
        provenance = json.loads(path.read_text())
        trained = provenance.get("models_trained")
        teachers = "?" if trained is None else "trained in the run" if trained else "from the cache"
        rows.append(f"| {provenance['lesson']} | `{provenance['preset']}` | {teachers} | {provenance['machine']}, "
                    f"`{provenance['device']}`, {provenance.get('precision', 'float32')} | {provenance['date'][:10]} "
                    f"| {provenance['wall_seconds'] / 60:.0f} min | `{provenance['command']}` |")  # fmt: skip
    if not rows:
        return "*No experiments recorded yet.*\n"
    header = [
        "| lesson | preset | machine, device, precision | measured | time | command |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(header + rows) + "\n"


def write_timings_markdown(path: str | Path) -> Path:
    """Write :func:`timings_markdown` and :func:`recordings_markdown` to ``path`` (the book's build does this
    before building)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        timings_markdown()
        + "\nThe recorded results that every lesson shows, each a whole experiment run from the command line "
        "(`?`: the record does not say whether its teachers were trained in the run):\n\n"
        + recordings_markdown()
    )
    return target


def notebook_times(notebook: str) -> Markdown:
    """This notebook's measured running times and peak memory, from ``results/timings.csv``, as a small
    Markdown table.

    The file records each run of the notebooks we timed: the preset, whether the teachers were already
    cached, the machine, the date, the seconds and the kernel's peak resident memory (what a student's
    JupyterHub pod needs). The table is rendered from it, never typed.
    """
    path = RESULTS / "timings.csv"
    if not path.is_file():
        return Markdown("*No running times recorded yet for this notebook.*")
    table = pd.read_csv(path)
    mine = table[table["notebook"] == notebook]
    if mine.empty:
        return Markdown("*No running times recorded yet for this notebook.*")
    lines = ["| preset | teachers | machine | measured | time | peak memory |", "|---|---|---|---|---|---|"]
    return Markdown("\n".join(lines + _times_rows(mine)))


class Stage(NamedTuple):
    """One step of a lesson's experiment: what it runs, the stages it needs first, and how to run it."""

    description: str
    needs: tuple[str, ...]
    run: Callable[[Any], pd.DataFrame]  # runner -> tidy table of runs


class LessonRunner:
    """What every lesson's runner shares: one entry point per student run, and tables of runs over seeds.

    A *job* is a dict of plain values that says which student to train (e.g. ``{"kd": True,
    "temperature": 4.0, "alpha": 0.1}``); :meth:`job` trains it with a seed (each runner keeps the runs it
    made, so a job met twice is trained once), and :meth:`table` runs several jobs over seeds into one tidy
    table. Because jobs are plain values, a scheduler can also send them to other processes or machines.
    """

    STAGES: ClassVar[dict[str, Stage]] = {}
    """The lesson's experiment, step by step, in the order :meth:`record` runs them."""

    lesson: str = ""
    progress: bool = True
    executor: (
        Callable[[LessonRunner, Mapping[str, Mapping[str, Any]], Sequence[int]], pd.DataFrame] | None
    ) = None
    """Who runs :meth:`table`'s grid: None, this process, one run after the other; or e.g.
    :class:`kdbook_utils.lessons.sweep.RayExecutor`, each (job, seed) a Ray task. Same table either way."""

    def job(self, spec: Mapping[str, Any], seed: int) -> StudentRun:
        raise NotImplementedError

    def notebook_teachers(self) -> None:
        """Train (once, cached) any teacher the lesson's notebook uses beyond those of ``prepare``; the
        notebook timer calls it to time the teachers alone. Default: there are none."""

    def table(self, jobs: Mapping[str, Mapping[str, Any]], seeds: Sequence[int]) -> pd.DataFrame:
        """Every job over ``seeds``: one row per (job label, seed, split, output), as ``run_seeds`` makes it."""
        if self.executor is not None:
            return self.executor(self, jobs, seeds)
        methods = {label: (lambda seed, spec=spec: self.job(spec, seed)) for label, spec in jobs.items()}
        return run_seeds(methods, seeds, progress=self.progress, lesson=self.lesson)

    def record(self) -> pd.DataFrame:
        """The whole experiment for a results file: every stage, each row labelled with its stage."""
        return pd.concat(
            [stage.run(self).assign(stage=name) for name, stage in self.STAGES.items()], ignore_index=True
        )
