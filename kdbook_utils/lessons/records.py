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
from kdbook_utils.errors import Seen, closest, must_be
from kdbook_utils.experiments import (
    check_results_folder,
    compare,
    git_commit,
    machine_description,
    read_results,
    recipe_hash,
    write_results,
)
from kdbook_utils.lessons import RESULTS, crosslayer, hinton, lm, lsl, mskd, settings_hash
from kdbook_utils.presets import PRESETS, Preset, get_preset
from kdbook_utils.train import DeviceLike, precision_name


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
    """The lesson called ``name``; an unknown name is refused with the lessons there are."""
    if not isinstance(name, str):
        raise TypeError(must_be("The lesson", f"a lesson's name, one of {', '.join(LESSONS)}",
                                Seen(f"a {type(name).__name__}"), "Pass e.g. 'hinton'."))  # fmt: skip
    if name not in LESSONS:
        raise ValueError(
            must_be("The lesson", f"one of {', '.join(LESSONS)}", name, closest(name, LESSONS).strip())
        )
    return LESSONS[name]


def lesson_settings(entry: LessonEntry, preset: str | Preset, settings: Any = None) -> Any:
    """The settings ``entry``'s lesson runs with under ``preset``: ``settings`` if given (checked to be the
    lesson's kind), else the lesson's own for the preset's name; a name the lesson has no settings for is
    refused with the names it has (a preset renamed with ``replace(name=...)`` needs ``settings=``)."""
    kind = type(next(iter(entry.settings.values())))
    if settings is not None:
        if not isinstance(settings, kind):
            raise TypeError(must_be(f"The settings of lesson {entry.name!r}", f"a {kind.__name__}",
                                    Seen(f"a {type(settings).__name__}"),
                                    f"Start from the lesson's own: SETTINGS['lab'] of kdbook_utils.lessons."
                                    f"{entry.name}, changed with dataclasses.replace(...)."))  # fmt: skip
        return settings
    name = preset.name if isinstance(preset, Preset) else preset
    if name not in entry.settings:
        renamed = " (a preset renamed with replace(name=...) keeps no lesson settings)" if isinstance(preset, Preset) \
            and name not in PRESETS else ""  # fmt: skip
        raise ValueError(must_be(f"The preset of lesson {entry.name!r}", f"one it has settings for: "
                                 f"{', '.join(entry.settings)}", Seen(f"{name!r}{renamed}"),
                                 "Use one of those names, or pass settings= (e.g. the lesson's SETTINGS['lab'])."
                                 f"{closest(name, entry.settings)}"))  # fmt: skip
    return entry.settings[name]


def results_path(lesson: str, preset: str = "lab", folder: Path | None = None) -> Path:
    """Where a lesson's recorded results live (without the suffix: ``.csv`` and ``.json``)."""
    if not isinstance(preset, str):
        shown = (
            f"a Preset named {preset.name!r}" if isinstance(preset, Preset) else f"a {type(preset).__name__}"
        )
        raise TypeError(must_be("results_path's preset", "a preset's name", Seen(shown), "Pass preset.name."))
    return (folder or RESULTS) / preset / lesson_entry(lesson).name


def preset_hash(preset: Preset) -> str:
    """A short hash of what a preset runs (every field but its prose description)."""
    return recipe_hash({k: v for k, v in dataclasses.asdict(preset).items() if k != "description"})


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
    if not isinstance(preset, (str, Preset)):
        raise TypeError(must_be("record's preset", "a preset or its name", Seen(f"a {type(preset).__name__}"),
                                "Pass e.g. 'lab' or get_preset('lab')."))  # fmt: skip
    preset = get_preset(preset) if isinstance(preset, str) else preset
    settings = lesson_settings(entry, preset, settings)
    check_results_folder(results_path(lesson, preset.name, folder).parent)  # before hours of training
    models = cache_dir() / "models"
    cached_before = set(models.glob("*.pt"))
    started = time.perf_counter()
    splits = entry.data(preset, root=root, progress=progress)
    runner = entry.runner.prepare(preset, splits, device=device, progress=progress, settings=settings)
    runs = runner.record()
    wall = time.perf_counter() - started
    provenance = run_provenance(lesson, preset, settings, runner.device, wall,
                                f"python -m kdbook_utils record {lesson} --preset {preset.name}",
                                precision=precision_name(runner.precision), teachers=runner_teachers(runner),
                                models_trained=sorted(p.stem for p in set(models.glob("*.pt")) - cached_before))  # fmt: skip
    table_path, _ = write_results(runs, results_path(lesson, preset.name, folder), provenance)
    return table_path


def runner_teachers(runner: Any) -> list[dict[str, Any]]:
    """The teachers a lesson ran with: each one's role, file, where it came from (shipped, cache, trained)
    and, for a shipped one, what it was trained on and its recorded test accuracy."""
    return [
        {"role": role, "model": model.path.name, "source": model.source,
         **{key: model.record[key] for key in ("trained_on", "precision", "test_accuracy") if key in model.record}}
        for role, model in runner.trained_models().items()
    ]  # fmt: skip


def check_recorded(lesson: str, preset: str = "lab", folder: Path | None = None) -> tuple[pd.DataFrame, dict]:
    """The recorded runs and provenance of ``lesson``, refusing a file that is missing, malformed, or
    made with other settings (of the lesson or the preset) than the ones the lesson would run now."""
    entry = lesson_entry(lesson)
    current = lesson_settings(entry, preset)
    runs, provenance = read_results(results_path(lesson, preset, folder))
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
    lesson_settings(entry, preset)  # a wrong preset is the caller's error, not a missing file
    declared = list(entry.runner.STAGES)
    if stage not in declared:  # a misspelled stage is the caller's error too, whatever the files hold
        raise ValueError(f"Lesson {lesson!r} has no stage {stage!r}; its stages are {declared}."
                         f"{closest(stage, declared)}")  # fmt: skip
    try:
        runs, provenance = check_recorded(lesson, preset, folder)
    except (FileNotFoundError, ValueError) as error:
        display(Markdown(f"*No usable recorded `{preset}` results for this lesson: {error}*"))
        return
    if stage not in set(runs["stage"]):
        stages = list(dict.fromkeys(runs["stage"]))
        raise ValueError(f"The recorded {lesson} results have no stage {stage!r}; they have "
                         f"{sorted(set(runs['stage']))}.{closest(stage, stages)}")  # fmt: skip
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
