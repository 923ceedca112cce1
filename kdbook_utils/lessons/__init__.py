"""Lesson support: each lesson's settings per preset, what it runs, its figures and tables, and the papers'
reported numbers (labelled as the papers'). The notebooks call these; the mathematics is in
:mod:`kdbook_utils.methods` and the jobs in :mod:`kdbook_utils.experiments`.

Recorded results travel with the package (``kdbook_utils/results/``), so a notebook opened on Colab or
Binder shows them too: the ``lab`` runs of every lesson (:func:`recorded_runs`) and the measured running
time of every notebook (:func:`notebook_times`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import pandas as pd
import torch
from IPython.display import Markdown

from kdbook_utils.data import DataSplits, TensorLoader
from kdbook_utils.errors import must_be
from kdbook_utils.experiments import StudentRun, TeacherOutputCache, TrainedModel, recipe_hash, run_seeds
from kdbook_utils.presets import Preset
from kdbook_utils.train import DeviceLike, evaluate, precision_name, preset_precision, resolve_device

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
        teachers = "?" if trained is None else "trained in the run" if trained else "shipped or cached"
        rows.append(f"| {provenance['lesson']} | `{provenance['preset']}` | {teachers} | {provenance['machine']}, "
                    f"`{provenance['device']}`, {provenance.get('precision', 'float32')} | {provenance['date'][:10]} "
                    f"| {provenance['wall_seconds'] / 60:.0f} min | `{provenance['command']}` |")  # fmt: skip
    if not rows:
        return "*No experiments recorded yet.*\n"
    header = [
        "| lesson | preset | teachers | machine, device, precision | measured | time | command |",
        "|---|---|---|---|---|---|---|",
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
    """One step of a lesson's experiment: what it runs, the stages it needs first, how to run it, and the
    split (and output) its comparison is read on: choices on validation, final comparisons on test."""

    description: str
    needs: tuple[str, ...]
    run: Callable[[Any], pd.DataFrame]  # runner -> tidy table of runs
    split: str = "val"
    output: str | None = None  # None: the final output


def _images_in(model: TrainedModel) -> str:
    """How many images a trained model learned from, read from its recipe's data identity (``n=...``)."""
    identity = str(model.recipe.get("train_data", ""))
    found = re.search(r"\bn=(\d+)", identity)
    return f"{int(found.group(1)):,}" if found else "?"


def show_source(obj: Any) -> Markdown:
    """The package's own source code of a function or method, as a code block: what a lesson shows is the
    code that runs."""
    source = textwrap.dedent(inspect.getsource(obj))
    module = inspect.getmodule(obj)
    path = (module.__name__ if module else "?").replace(".", "/") + ".py"
    return Markdown(f"`{path}`, `{obj.__qualname__}`:\n\n```python\n{source}```")


def verdict_sentence(comparison: Any, method: str, preset: Preset, recorded: str) -> str:
    """One sentence on what this run's comparison shows at its scale, whatever it shows: the verdict, and
    for an interval that contains zero, that the run is inconclusive at this scale, with where the recorded
    ``lab`` results of the same comparison are (``recorded``, e.g. "section 10")."""
    row = comparison.table.loc[method]
    verdict = str(row["verdict"])
    if verdict == "failed":
        return f"Every run of **{method}** failed, so this run says nothing about it (see the table)."
    if verdict in ("no verdict",):
        return f"One seed cannot tell a gain from seed noise: no verdict at this scale ({recorded} has the `lab` runs)."
    if verdict in ("better", "worse"):
        return (f"At this scale (preset `{preset.name}`), **{method}** is **{verdict}** than the baseline: the "
                f"whole 95 % interval [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}] lies "
                f"{'above' if verdict == 'better' else 'below'} zero. {recorded.capitalize()} has the recorded "
                "`lab` runs of the same comparison.")  # fmt: skip
    width = row["ci_high"] - row["ci_low"]
    return (f"At this scale (preset `{preset.name}`) the comparison is **inconclusive**: the 95 % interval "
            f"[{row['ci_low']:+.1f}, {row['ci_high']:+.1f}], {width:.1f} points wide, contains zero, so these "
            f"runs cannot tell a gain of **{method}** from seed noise. That is not evidence that there is no "
            f"effect; {recorded} has the recorded `lab` runs of the same comparison.")  # fmt: skip


WHERE_FROM: dict[str, str] = {
    "shipped": "shipped with the course",
    "cache": "from your cache",
    "trained": "trained in this run",
}
"""Where a teacher came from (:attr:`~kdbook_utils.experiments.TrainedModel.source`), in words."""


def job_key(spec: Mapping[str, Any]) -> str:
    """The key a run is kept under: the job's full specification as canonical JSON. A function in it (a
    learner's own loss, say) counts by its name and source code, so an edited function is a new job."""

    def plain(value: Any) -> Any:
        if callable(value):
            try:
                source = inspect.getsource(value)
            except (OSError, TypeError):  # defined where no source is kept: the object itself
                source = f"object {id(value)}"
            digest = hashlib.sha256(source.encode()).hexdigest()[:12]
            return f"<function {getattr(value, '__qualname__', type(value).__name__)} {digest}>"
        if isinstance(value, Mapping):
            return {str(key): plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return json.dumps(plain(spec), sort_keys=True, default=str)


@dataclass
class LessonRunner:
    """What every lesson's runner shares: its preset, settings and data, where and how it trains, and one
    entry point per student run.

    A *job* is a dict of plain values that says which student to train, e.g. ``{"method": "KD",
    "temperature": 4.0, "alpha": 0.1}``. :meth:`job` completes it with the lesson's defaults
    (:meth:`complete`) and trains it with a seed, once: every run is kept in ``runs`` under its full
    specification and the seed (:func:`job_key`), so a job met twice is trained once and a changed job
    (another weight, an edited loss function) is trained anew. :meth:`table` runs several jobs over seeds
    into one tidy table. Because jobs are plain values, a scheduler can send them to other processes or
    machines (:attr:`executor`).

    ``device`` and ``precision`` are resolved once, from the preset, by :meth:`prepare` (or given), and
    every teacher and student of the lesson trains with them. ``teachers_may_train`` is the preset's
    ``train_teachers``: whether a missing teacher is trained here or refused with the way to get it.
    """

    preset: Preset
    settings: Any
    splits: DataSplits  # the students' training images (a subset), the validation and test splits
    device: torch.device
    precision: torch.dtype | None
    progress: bool

    STAGES: ClassVar[dict[str, Stage]] = {}
    """The lesson's experiment, step by step, in the order :meth:`record` runs them."""
    SETTINGS: ClassVar[Mapping[str, Any]] = {}
    """The lesson's settings per preset name."""
    lesson: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.cache = TeacherOutputCache()
        self.runs: dict[tuple[str, int], StudentRun] = {}
        self.executor: (
            Callable[[LessonRunner, Mapping[str, Mapping[str, Any]], Sequence[int]], pd.DataFrame] | None
        ) = None
        """Who runs :meth:`table`'s grid: None, this process, one run after the other; or e.g.
        :class:`kdbook_utils.lessons.sweep.RayExecutor`, each (job, seed) a Ray task. Same table either way."""

    @classmethod
    def settings_for(cls, preset: Preset, settings: Any = None) -> Any:
        """``settings``, or the lesson's settings for ``preset`` (by its name)."""
        if settings is not None:
            return settings
        if preset.name not in cls.SETTINGS:
            raise ValueError(
                must_be(
                    f"The preset's name, for lesson {cls.lesson!r},",
                    f"one the lesson has settings for ({', '.join(cls.SETTINGS)})",
                    preset.name,
                    "A preset renamed with replace(name=...) needs the lesson's settings passed too: "
                    f"prepare(preset, splits, settings=SETTINGS['{next(iter(cls.SETTINGS), 'quick')}']).",
                )
            )
        return cls.SETTINGS[preset.name]

    @staticmethod
    def runtime(preset: Preset, device: DeviceLike) -> tuple[torch.device, torch.dtype | None]:
        """Where and in which precision the lesson trains: ``device`` (None: the preset's) and the
        preset's precision rule on it (:func:`~kdbook_utils.train.preset_precision`)."""
        resolved = resolve_device(preset.device if device is None else device)
        return resolved, preset_precision(preset, resolved)

    def complete(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """``spec`` with the lesson's defaults filled in: the full specification a run is kept under."""
        return dict(spec)

    def train_job(self, spec: dict[str, Any], seed: int) -> StudentRun:
        """Train the student of a complete job ``spec`` with ``seed`` (each lesson writes its own)."""
        raise NotImplementedError

    def job(self, spec: Mapping[str, Any], seed: int) -> StudentRun:
        """The student of ``spec`` trained with ``seed``: trained once, then kept under its full spec."""
        full = self.complete(spec)
        key = (job_key(full), int(seed))
        if key not in self.runs:
            self.runs[key] = self.train_job(full, int(seed))
        return self.runs[key]

    def notebook_teachers(self) -> None:
        """Train (once, cached) any teacher the lesson's notebook uses beyond those of ``prepare``; the
        notebook timer calls it to time the teachers alone. Default: there are none."""

    def teacher_models(self) -> dict[str, TrainedModel]:
        """The teachers of the lesson's comparisons, by role."""
        return {}

    def trained_models(self) -> dict[str, TrainedModel]:
        """Every teacher the lesson uses, its notebook's included, by role: what ``python -m kdbook_utils
        teachers`` trains and ships, and what a results file's provenance names."""
        return self.teacher_models()

    @property
    def student_epochs(self) -> int:
        """How many epochs each student of the comparisons trains."""
        return int(self.settings.epochs)

    def evaluation_loader(self, split: str) -> Any:
        """Batches of the ``split`` split ("val" or "test") in order, unaugmented, for measuring a model."""
        return TensorLoader(getattr(self.splits, split), 512, train=False, device=self.device)

    def accuracy(self, model: torch.nn.Module, split: str = "test") -> float:
        """``model``'s accuracy (percent) on ``split``."""
        return float(evaluate(model, self.evaluation_loader(split), device=self.device)["accuracy"])

    def teacher_accuracy(self, role: str | None = None) -> float:
        """A teacher's accuracy (percent) on the validation split (default: the first teacher)."""
        teachers = self.teacher_models()
        return self.accuracy(teachers[role or next(iter(teachers))].model, "val")

    def scale(self) -> Markdown:
        """The run's scale in one paragraph, computed from the settings and the teachers: how many images and
        epochs each student gets, and what its teachers learned from and reach on the validation split."""
        seeds = ", ".join(str(seed) for seed in getattr(self.settings, "seeds", ()))
        teachers = self.teacher_models()
        first = next(iter(teachers.values()))
        learned = _images_in(first)
        text = (
            f"**Scale** (preset `{self.preset.name}`, device `{self.device}`, "
            f"{precision_name(self.precision)}): each student learns from **{len(self.splits.train):,}** "
            f"images for **{self.student_epochs}** epochs (seeds {seeds}); choices are made on "
            f"{len(self.splits.val):,} validation images and the final comparison uses {len(self.splits.test):,} "
            f"test images. The teacher{'s' if len(teachers) > 1 else ''} "
            f"({', '.join(sorted({str(getattr(t.model, 'arch', 'teacher')) for t in teachers.values()}))}, "
            f"{WHERE_FROM[first.source]}) learned from {learned} images and reach"
            f"{'' if len(teachers) > 1 else 'es'} **{self.teacher_accuracy():.1f} %** on the validation split"
            f"{' (the first of them)' if len(teachers) > 1 else ''}."
        )
        if learned != "?" and int(learned.replace(",", "")) > len(self.splits.train):
            text += (" The teacher has seen more images than any student: the transfer-set regime of Hinton et "
                     "al., where the student learns from the teacher's outputs on a smaller set.")  # fmt: skip
        return Markdown(text)

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
