"""The command line: the lessons' experiments without a notebook, on one machine, several GPUs or Ray.

::

    python -m kdbook_utils list                                   # lessons, their stages, presets
    python -m kdbook_utils run hinton --preset lab --seeds 0 1 2 --out results/
    python -m kdbook_utils run crosslayer --preset lab --stage final --device cuda --data ~/cifar10
    python -m kdbook_utils run hinton --preset lab --ray          # each (job, seed) a Ray task
    torchrun --nproc_per_node=4 -m kdbook_utils run mskd --preset paper --out results/
    python -m kdbook_utils record hinton --preset lab             # the package's recorded results
    python -m kdbook_utils show results/                          # the comparison tables, as text

``run`` prepares the lesson's runner (its teachers come from the cache, or are trained once) and runs its
experiments with the same code the notebooks and the results recorder use (the lesson's ``record()``,
or the stages named with ``--stage``), then writes ``<out>/<preset>/<lesson>.csv`` (one row per run,
split and output) and ``<lesson>.json`` (the provenance) and prints the comparison. ``show`` prints the
comparison of results files written by ``run`` or ``record``.

Every bad argument is an error that names what was given and how to fix it (exit status 2).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from kdbook_utils import distributed
from kdbook_utils.data import DatasetNotFoundError
from kdbook_utils.errors import closest
from kdbook_utils.experiments import (
    compare,
    read_results,
    write_results,
)
from kdbook_utils.lessons import LessonRunner, Stage
from kdbook_utils.lessons.records import LESSONS, precision_name, record, results_path, run_provenance
from kdbook_utils.lessons.sweep import RayExecutor, RunFolder, ray_available, start_ray
from kdbook_utils.presets import PRESETS, Preset, active_preset
from kdbook_utils.train import resolve_device

__all__ = ["STAGES", "Stage", "main"]


class UsageError(Exception):
    """A bad command-line argument: the message says what was given and how to fix it."""


STAGES: dict[str, dict[str, Stage]] = {name: entry.runner.STAGES for name, entry in LESSONS.items()}
"""Each lesson's stages, in the order its ``record()`` runs them (a stage's rows carry its name)."""

SPLIT_OF_STAGE = {"final": "test"}
"""The split a stage's comparison is read on: the final comparison on test, every choice on validation."""


# --------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------


def _seed(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"a seed must be a non-negative integer; got {text!r}. Use e.g. --seeds 0 1 2"
        )
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kdbook_utils",
        description="Run the kdbook lessons' experiments and show their results.",
        epilog="Several GPUs: torchrun --nproc_per_node=N -m kdbook_utils run ... . A cluster: run ... --ray.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("list", help="the lessons, their stages and the presets")

    run = commands.add_parser("run", help="run a lesson's experiments and write a results file",
                              description="Run a lesson's experiments (all its stages, or those given with "
                                          "--stage) and write <out>/<preset>/<lesson>.csv and .json.")  # fmt: skip
    run.add_argument("lesson", help=f"one of {', '.join(LESSONS)}")
    _common(run)
    run.add_argument("--seeds", nargs="+", type=_seed, metavar="SEED",
                     help="the seeds of the lesson's comparisons (replaces its settings' seeds)")  # fmt: skip
    run.add_argument("--stage", nargs="+", metavar="STAGE",
                     help="run only these stages (and the ones they need); see 'list'")  # fmt: skip
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                     help="change one of the lesson's settings, e.g. --set epochs=5 (repeatable)")  # fmt: skip
    run.add_argument(
        "--out", type=Path, default=Path("results"), help="the results folder (default: results)"
    )
    scale = run.add_argument_group("Ray (the optional extra 'scale')")
    scale.add_argument("--ray", action="store_true", help="run each (job, seed) as a Ray task; resumable")
    scale.add_argument("--ray-address", default=None,
                       help="a running Ray cluster ('auto', 'ray://host:10001'); default: start one here")  # fmt: skip
    scale.add_argument("--ray-cpus", type=int, default=None,
                       help="CPUs of the local Ray instance (default: all of this machine's)")  # fmt: skip
    scale.add_argument("--cpus-per-run", type=float, default=1.0, help="each run's CPUs (default 1)")
    scale.add_argument("--gpus-per-run", type=float, default=None,
                       help="each run's GPUs, fractions allowed (default: 1 if this machine has CUDA, else 0)")  # fmt: skip

    recorder = commands.add_parser(
        "record", help="record a lesson's results into the package (kdbook_utils/results)"
    )
    recorder.add_argument("lesson", help=f"one of {', '.join(LESSONS)}")
    _common(recorder, default_preset="lab")

    show = commands.add_parser("show", help="print the comparison tables of results files")
    show.add_argument(
        "path", type=Path, help="a results folder (searched recursively) or a results .csv/.json"
    )
    return parser


def _common(command: argparse.ArgumentParser, default_preset: str = "quick") -> None:
    command.add_argument(
        "--preset", default=default_preset, help=f"one of {', '.join(PRESETS)} (default {default_preset})"
    )
    command.add_argument("--device", default=None,
                         help="auto, cpu, cuda, cuda:N or mps (default: the preset's)")  # fmt: skip
    command.add_argument("--data", default=None, metavar="ROOT",
                         help="the folder holding the data set (default: $KDBOOK_DATA, else the cache)")  # fmt: skip
    command.add_argument("--quiet", action="store_true", help="no progress bars")


def _lesson(name: str) -> str:
    if name not in LESSONS:
        raise UsageError(
            f"Unknown lesson {name!r}; the lessons are {', '.join(LESSONS)}.{closest(name, LESSONS)}"
        )
    return name


def _preset(name: str, lesson: str) -> Preset:
    key = name.strip().lower()
    if key not in PRESETS:
        raise UsageError(
            f"Unknown preset {name!r}; the presets are {', '.join(PRESETS)}.{closest(key, PRESETS)}"
        )
    if key not in LESSONS[lesson].settings:
        raise UsageError(
            f"Lesson {lesson!r} has no settings for preset {key!r}; it has {', '.join(LESSONS[lesson].settings)}."
        )
    return PRESETS[key]


def _data_root(root: str | None, preset: Preset) -> str | None:
    if root is None:
        return None
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise UsageError(
            f"The data root {root!r} is not a folder{' (it does not exist)' if not folder.exists() else ''}. "
            f"Pass --data with the folder that holds {preset.dataset} (torchvision's cifar-10-batches-py/, or "
            "train/<class>/*.jpg and test/<class>/*.jpg), or leave --data out to use $KDBOOK_DATA."
        )
    return str(folder)


def _device(name: str | None, preset: Preset) -> torch.device:
    try:
        return resolve_device(name or preset.device)
    except (ValueError, RuntimeError) as error:
        raise UsageError(f"--device {name}: {error}") from error


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: --set student=cnn-2x16


def _override(settings: Any, assignment: str) -> Any:
    """``settings`` with one field changed from ``FIELD=VALUE`` (the value read as a Python literal)."""
    fields = {field.name: field for field in dataclasses.fields(settings)}
    name, sep, text = assignment.partition("=")
    name = name.strip()
    if not sep or not name:
        raise UsageError(f"--set takes FIELD=VALUE, e.g. --set epochs=5; got {assignment!r}.")
    if name not in fields:
        raise UsageError(f"--set {assignment}: the lesson's settings have no field {name!r}; its fields are "
                         f"{', '.join(fields)}.{closest(name, fields)}")  # fmt: skip
    current, value = getattr(settings, name), _parse_value(text.strip())
    if isinstance(current, tuple):
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    elif isinstance(current, bool) or isinstance(value, bool):
        if not isinstance(value, bool) or not isinstance(current, bool):
            raise UsageError(f"--set {assignment}: {name} is {current!r}; give True or False.")
    elif isinstance(current, (int, float)) and isinstance(value, (int, float)):
        if isinstance(current, int) and not isinstance(value, int):
            raise UsageError(
                f"--set {assignment}: {name} must be a whole number, like its value {current!r}."
            )
    elif current is not None and value is not None and not isinstance(value, type(current)):
        raise UsageError(f"--set {assignment}: {name} is a {type(current).__name__} (now {current!r}); got "
                         f"{value!r}. Write it as a Python literal, e.g. --set {name}={current!r}.")  # fmt: skip
    return dataclasses.replace(settings, **{name: value})


def _stages(lesson: str, wanted: Sequence[str] | None) -> list[str]:
    """The stages to run, in the lesson's order, with every stage they need."""
    stages = STAGES[lesson]
    if not wanted:
        return list(stages)
    unknown = [name for name in wanted if name not in stages]
    if unknown:
        raise UsageError(f"Lesson {lesson!r} has no stage {unknown[0]!r}; its stages are {', '.join(stages)}."
                         f"{closest(unknown[0], stages)}")  # fmt: skip
    chosen = set(wanted)
    for name in wanted:
        chosen.update(stages[name].needs)
    return [name for name in stages if name in chosen]


# --------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------


def command_list(args: argparse.Namespace) -> int:
    print("Lessons (python -m kdbook_utils run LESSON --preset PRESET [--stage STAGE ...]):\n")
    for name, entry in LESSONS.items():
        print(
            f"  {name:<11} {entry.title}; baseline: {entry.baseline!r}; presets: {', '.join(entry.settings)}"
        )
        for stage, about in STAGES[name].items():
            needs = f" (needs {', '.join(about.needs)})" if about.needs else ""
            print(f"      stage {stage:<9}{about.description}{needs}")
        print()
    print("Presets:\n")
    for name, preset in PRESETS.items():
        print(f"  {name:<7} {preset.dataset:<9} {preset.description}")
    return 0


def command_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    lesson = _lesson(args.lesson)
    preset = _preset(args.preset, lesson)
    settings = LESSONS[lesson].settings[preset.name]
    if args.seeds:
        if len(set(args.seeds)) != len(args.seeds):
            raise UsageError(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed; give each seed once.")
        settings = dataclasses.replace(settings, seeds=tuple(args.seeds))
    for assignment in args.overrides:
        settings = _override(settings, assignment)
    stages = _stages(lesson, args.stage)
    root = _data_root(args.data, preset)
    spread = distributed.launched_by_torchrun()
    if args.ray and spread:
        raise UsageError("--ray and torchrun do not mix: torchrun splits one run over processes, Ray spreads many "
                         "runs over machines. Use one: drop --ray, or start without torchrun.")  # fmt: skip
    for option, value, rule in (("--cpus-per-run", args.cpus_per_run, "a number above 0"),
                                ("--ray-cpus", args.ray_cpus, "a number above 0"),
                                ("--gpus-per-run", args.gpus_per_run, "0 (no GPU) or more")):  # fmt: skip
        if value is not None and (value < 0 or (value == 0 and option != "--gpus-per-run")):
            raise UsageError(f"{option} {value:g} is no share of a machine; give {rule}, e.g. {option} 1.")
    if args.ray and not ray_available():
        raise UsageError(
            '--ray needs Ray, which is not installed: pip install "kdbook-utils[scale]" (or pip install ray).'
        )
    with active_preset(preset):  # fit's device and precision rules follow the preset run
        device = _device(args.device, preset)
        if spread:
            distributed.init(device)
        progress = not args.quiet and sys.stderr.isatty() and distributed.is_main_process()
        started = time.perf_counter()
        entry = LESSONS[lesson]
        try:
            splits = entry.data(preset, root=root)
        except DatasetNotFoundError as error:
            raise UsageError(f"{error}\nWith the command line: --data <folder>.") from error
        runner: LessonRunner = entry.runner.prepare(
            preset, splits, device=device, progress=progress, settings=settings
        )
        executor = "one process, one run after the other"
        if spread:
            executor = f"torchrun, {distributed.world_size()} processes"
        if args.ray:
            gpus = (
                args.gpus_per_run
                if args.gpus_per_run is not None
                else (1.0 if torch.cuda.is_available() else 0.0)
            )
            start_ray(args.ray_address, num_cpus=args.ray_cpus)
            runner.executor = RayExecutor(RunFolder(args.out / ".runs" / preset.name / lesson), lesson, preset, settings,
                                          root=root, device=args.device or preset.device, num_cpus=args.cpus_per_run,
                                          num_gpus=gpus, progress=progress)  # fmt: skip
            executor = f"Ray, {args.cpus_per_run:g} CPU and {gpus:g} GPU per run"
        if args.stage:
            runs = pd.concat(
                [STAGES[lesson][stage].run(runner).assign(stage=stage) for stage in stages], ignore_index=True
            )
        else:
            runs = runner.record()
        precision = precision_name(device)
        if args.ray:
            done = runner.executor
            print(f"Ray: {done.trained} run(s) trained, {done.reused} read back from {done.runs.folder}.")
    provenance = run_provenance(lesson, preset, settings, device, time.perf_counter() - started,
                                "python -m kdbook_utils " + shlex.join(argv), stages=stages,
                                executor=executor, precision=precision)  # fmt: skip
    table_path, _ = write_results(runs, results_path(lesson, preset.name, args.out), provenance)
    if distributed.is_main_process():
        print(f"Wrote {table_path} and {table_path.with_suffix('.json').name} ({len(runs)} rows).\n")
        print(comparison_text(runs, provenance))
    distributed.shutdown()
    return 0


def command_record(args: argparse.Namespace) -> int:
    lesson = _lesson(args.lesson)
    preset = _preset(args.preset, lesson)
    root = _data_root(args.data, preset)
    device = _device(args.device, preset)
    progress = not args.quiet and sys.stderr.isatty()
    try:
        table_path = record(lesson, preset, root=root, device=device, progress=progress)
    except DatasetNotFoundError as error:
        raise UsageError(f"{error}\nWith the command line: --data <folder>.") from error
    print(f"Wrote {table_path} and {table_path.with_suffix('.json').name}.\n")
    print(comparison_text(*read_results(table_path.with_suffix(""))))
    return 0


def command_show(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.is_dir():
        found = sorted(
            csv.with_suffix("") for csv in path.rglob("*.csv") if csv.with_suffix(".json").is_file()
        )
        if not found:
            raise UsageError(f"No results files (a .csv with its .json beside it) under {str(path)!r}; write some "
                             "with: python -m kdbook_utils run LESSON --out <folder>.")  # fmt: skip
    elif path.suffix in (".csv", ".json", "") and path.with_suffix(".csv").is_file():
        found = [path.with_suffix("")]
    else:
        raise UsageError(f"{str(path)!r} is neither a results folder nor a results file (<lesson>.csv with "
                         "<lesson>.json); pass e.g. results/ or results/lab/hinton.csv.")  # fmt: skip
    for stem in found:
        try:
            runs, provenance = read_results(stem)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"Cannot read the results {stem}: {error}") from error
        print(f"== {stem.with_suffix('.csv')}")
        print(comparison_text(runs, provenance))
    return 0


def comparison_text(runs: pd.DataFrame, provenance: dict[str, Any]) -> str:
    """A results table as text: its provenance, then per stage the paired comparison with the lesson's
    baseline (final stage: test split; other stages: validation split, where the choices are made)."""
    lesson = str(provenance.get("lesson") or runs["lesson"].iloc[0])
    baseline = LESSONS[lesson].baseline if lesson in LESSONS else None
    title = LESSONS[lesson].title if lesson in LESSONS else lesson
    header = (
        f"{title}, preset {provenance.get('preset', '?')}: {provenance.get('date', '?')}, "
        f"{provenance.get('machine', '?')}, device {provenance.get('device', '?')}, "
        f"{provenance.get('wall_seconds', float('nan')) / 60:.1f} min; regenerate with: {provenance.get('command', '?')}"
    )
    lines = [header]
    stages = list(dict.fromkeys(runs["stage"])) if "stage" in runs.columns else [None]
    for stage in stages:
        part = runs if stage is None else runs[runs["stage"] == stage]
        split = SPLIT_OF_STAGE.get(str(stage), "val")
        if split not in set(part["split"]):
            split = str(part["split"].iloc[0])
        lines.append(f"\nStage {stage} ({split} split, accuracy in %):")
        if baseline is not None and baseline in set(part["method"]):
            comparison = compare(part, baseline, split=split)
            columns = ["mean", "std", "seeds", "difference", "ci_low", "ci_high", "verdict"]
            lines.append(comparison.table[columns].to_string(float_format=lambda x: f"{x:.2f}", na_rep="-"))
        else:
            chosen = part[(part["split"] == split) & (part["output"] == "final")] if "final" in set(part["output"]) \
                else part[part["split"] == split]  # fmt: skip
            good = chosen[chosen["failed"].astype(str) == ""]
            summary = good.groupby("method", sort=False)["accuracy"].agg(["mean", "std", "count"])
            summary = summary.rename(columns={"count": "seeds"})
            lines.append(summary.to_string(float_format=lambda x: f"{x:.2f}", na_rep="-"))
            failed = len(chosen) - len(good)
            if failed:
                lines.append(f"({failed} failed run(s) left out)")
        if lesson in LESSONS and LESSONS[lesson].comparison is not None:
            lines.append(LESSONS[lesson].comparison(part))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            return command_list(args)
        if args.command == "run":
            return command_run(args, argv)
        if args.command == "record":
            return command_record(args)
        return command_show(args)
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
