"""Recorded results: each lesson's ``lab`` experiments run end to end and written to a results file with
its provenance, then shown in the notebooks through the same paired comparison as a live run.

``python -m kdbook_utils record <lesson> --preset lab`` (:func:`record`) runs a lesson's pipeline (the
same code the notebook runs) and writes ``kdbook_utils/results/<preset>/<lesson>.csv``, one row per run,
with ``<lesson>.json`` beside it: the commit, the preset and the lesson's settings with their hashes, the
date, the machine, the torch version and the wall time. :func:`recorded_comparison` shows a recorded file
in a notebook; :func:`check_recorded` is what the tests use to refuse a file that is missing, malformed,
or made with other settings than the lesson would run now.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from IPython.display import Markdown, display

from kdbook_utils.checkpoints import cache_dir
from kdbook_utils.data import preset_data
from kdbook_utils.experiments import (
    compare,
    git_commit,
    machine_description,
    read_results,
    recipe_hash,
    write_results,
)
from kdbook_utils.lessons import RESULTS, crosslayer, hinton, lm, lsl, mskd, settings_hash
from kdbook_utils.presets import Preset, active_preset, get_preset
from kdbook_utils.train import DeviceLike, autocast_dtype, resolve_device


@dataclass(frozen=True)
class LessonEntry:
    """How to run and read one lesson's recorded experiment."""

    name: str
    title: str
    settings: dict[str, Any]  # preset name -> the lesson's settings dataclass
    runner: Any  # a class with prepare(preset, splits, device=, progress=, settings=) and record()
    baseline: str  # the method every other is compared with
    headline: Callable[[pd.DataFrame], list[str]]  # the methods of the final comparison, from the runs
    data: Callable[..., Any] = preset_data  # (preset, root=) -> what the runner's prepare takes as splits
    comparison: Callable[[pd.DataFrame], str] | None = None  # the lesson's own comparisons, as text


def _final_methods(runs: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(runs[runs["stage"] == "final"]["method"]))


LESSONS: dict[str, LessonEntry] = {
    "hinton": LessonEntry("hinton", "Lesson 1: Hinton KD", hinton.SETTINGS, hinton.HintonLesson, hinton.ALONE,
                          _final_methods),
    "lsl": LessonEntry("lsl", "Lesson 2: LSL", lsl.SETTINGS, lsl.LSLRunner, lsl.ALONE, _final_methods),
    "crosslayer": LessonEntry("crosslayer", "Lesson 3: cross-layer KD", crosslayer.SETTINGS,
                              crosslayer.CrossLayerRunner, crosslayer.STUDENT_ALONE.label, _final_methods),
    "mskd": LessonEntry("mskd", "Lesson 4: MSKD", mskd.SETTINGS, mskd.MSKDRunner, mskd.SINGLE_KD, _final_methods),
    "lm": LessonEntry("lm", "Lesson 5: distilling a language model", lm.SETTINGS, lm.LMLesson, lm.ALONE,
                      _final_methods, data=lm.lesson_data, comparison=lm.comparison_text),
}  # fmt: skip


def lesson_entry(name: str) -> LessonEntry:
    if name not in LESSONS:
        raise ValueError(f"Unknown lesson {name!r}; the lessons are {', '.join(LESSONS)}.")
    return LESSONS[name]


def results_path(lesson: str, preset: str = "lab", folder: Path | None = None) -> Path:
    """Where a lesson's recorded results live (without the suffix: ``.csv`` and ``.json``)."""
    return (folder or RESULTS) / preset / lesson


def preset_hash(preset: Preset) -> str:
    """A short hash of what a preset runs (every field but its prose description)."""
    return recipe_hash({k: v for k, v in dataclasses.asdict(preset).items() if k != "description"})


def precision_name(device: torch.device) -> str:
    """What :func:`~kdbook_utils.train.fit` trains in on ``device`` by default under the current preset."""
    return str(autocast_dtype(None, device) or torch.float32).removeprefix("torch.")


def run_provenance(
    lesson: str, preset: Preset, settings: Any, device: Any, wall_seconds: float, command: str, **extra: Any
) -> dict[str, Any]:
    """Where a results file came from: the commit, the preset and the lesson's settings with their hashes,
    the date, the machine, the device, torch and Python, the wall time and the command that regenerates it."""
    return {
        "lesson": lesson, "preset": preset.name, "preset_config": dataclasses.asdict(preset),
        "preset_hash": preset_hash(preset), "settings": dataclasses.asdict(settings),
        "settings_hash": settings_hash(settings), "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(), "device": str(device), "torch": torch.__version__,
        "python": sys.version.split()[0], "wall_seconds": round(wall_seconds, 1), "command": command, **extra,
    }  # fmt: skip


def record(
    lesson: str,
    preset: str | Preset = "lab",
    *,
    root: str | os.PathLike | None = None,
    device: DeviceLike = None,
    folder: Path | None = None,
    progress: bool = True,
    settings: Any = None,
) -> Path:
    """Run ``lesson``'s experiment with ``preset`` and write its results file with provenance."""
    entry = lesson_entry(lesson)
    preset = get_preset(preset) if isinstance(preset, str) else preset
    settings = settings or entry.settings[preset.name]
    models = cache_dir() / "models"
    cached_before = set(models.glob("*.pt"))
    with active_preset(preset):  # fit's device and precision rules follow the preset recorded
        device = resolve_device(device)
        started = time.perf_counter()
        splits = entry.data(preset, root=root)
        runner = entry.runner.prepare(preset, splits, device=device, progress=progress, settings=settings)
        runs = runner.record()
        wall = time.perf_counter() - started
        precision = precision_name(device)
    provenance = run_provenance(lesson, preset, settings, device, wall,
                                f"python -m kdbook_utils record {lesson} --preset {preset.name}",
                                precision=precision,
                                models_trained=sorted(p.stem for p in set(models.glob("*.pt")) - cached_before))  # fmt: skip
    table_path, _ = write_results(runs, results_path(lesson, preset.name, folder), provenance)
    return table_path


def check_recorded(lesson: str, preset: str = "lab", folder: Path | None = None) -> tuple[pd.DataFrame, dict]:
    """The recorded runs and provenance of ``lesson``, refusing a file that is missing, malformed, or
    made with other settings (of the lesson or the preset) than the ones the lesson would run now."""
    entry = lesson_entry(lesson)
    runs, provenance = read_results(results_path(lesson, preset, folder))
    current = entry.settings[preset]
    problems = []
    if provenance.get("settings_hash") != settings_hash(current):
        problems.append(f"the lesson's settings changed (recorded {provenance.get('settings')}, now "
                        f"{dataclasses.asdict(current)})")  # fmt: skip
    if provenance.get("preset_hash") != preset_hash(get_preset(preset)):
        problems.append("the preset changed")
    if problems:
        raise ValueError(f"The recorded {preset} results of {lesson} are out of date: {'; '.join(problems)}. "
                         f"Regenerate them: {provenance.get('command', 'python -m kdbook_utils record')}.")  # fmt: skip
    return runs, provenance


def _settings_line(settings: dict[str, Any]) -> str:
    shown = [f"`{key}={value}`" for key, value in settings.items() if len(str(value)) <= 40]
    return ", ".join(shown) or "-"


def recorded_comparison(lesson: str, baseline: str | None = None, *, preset: str = "lab", output: str | None = None,
                        folder: Path | None = None, stage: str = "final") -> None:  # fmt: skip
    """Show a lesson's recorded results in a notebook: provenance, then the paired comparison of one stage
    (the final comparison by default) on the test split (the same :func:`~kdbook_utils.experiments.compare`
    as the live run)."""
    entry = lesson_entry(lesson)
    try:
        runs, provenance = check_recorded(lesson, preset, folder)
    except (FileNotFoundError, ValueError) as error:
        display(Markdown(f"*No usable recorded `{preset}` results for this lesson: {error}*"))
        return
    if stage not in set(runs["stage"]):
        raise ValueError(f"The recorded {lesson} results have no stage {stage!r}; they have "
                         f"{sorted(set(runs['stage']))}.")  # fmt: skip
    chosen = runs[runs["stage"] == stage]
    methods = entry.headline(runs) if stage == "final" else list(dict.fromkeys(chosen["method"]))
    comparison = compare(chosen, baseline or entry.baseline, split="test", output=output, methods=methods)
    minutes = provenance["wall_seconds"] / 60
    display(
        Markdown(
            f"Recorded with preset `{provenance['preset']}` on {provenance['date']} ({provenance['machine']}, "
            f"device `{provenance['device']}`, torch {provenance['torch']}), commit `{provenance['commit'][:12]}`, in "
            f"{minutes:.0f} minutes. Regenerate with `{provenance['command']}`.\n\nThe lesson's `{provenance['preset']}` "
            f"settings: {_settings_line(provenance.get('settings', {}))}."
        )
    )
    display(comparison.table[["mean", "std", "seeds", "difference", "ci_low", "ci_high", "verdict"]]
            .style.format(precision=2, na_rep="-"))  # fmt: skip
    display(Markdown(comparison.summary()))
