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

Every bad argument is an error that names what was given and how to fix it (exit status 2), and every
argument is checked before anything trains: the output folder can be written, the data are there, each
``--set FIELD=VALUE`` parses to the field's type (several values without spaces: ``--set
temperatures=4,8``, or ``--set`` repeated) and names only what the lesson can build. Without
``--preset``, ``run`` takes the preset from ``$KDBOOK_PRESET`` (as a notebook does); ``record``, which
writes into the package, asks for ``--preset`` when ``$KDBOOK_PRESET`` names another preset than lab.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import os
import shlex
import sys
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from kdbook_utils import distributed
from kdbook_utils.data import DamagedDataError, DatasetNotFoundError
from kdbook_utils.errors import closest
from kdbook_utils.experiments import (
    check_results_folder,
    compare,
    read_results,
    write_results,
)
from kdbook_utils.lessons import LessonRunner, Stage
from kdbook_utils.lessons.records import LESSONS, precision_name, record, results_path, run_provenance
from kdbook_utils.lessons.sweep import RayExecutor, RunFolder, ray_available, start_ray
from kdbook_utils.lessons.teachers import ship, train_teachers
from kdbook_utils.methods.lsl import REDUCTIONS
from kdbook_utils.models import list_models
from kdbook_utils.models.gpt import GPT_FAMILY
from kdbook_utils.models.multi_exit import HEAD_STYLES
from kdbook_utils.models.small_cnn import SMALL_CNN_FAMILY
from kdbook_utils.presets import PRESET_ENV_VAR, PRESETS, Preset
from kdbook_utils.train import resolve_device

__all__ = ["STAGES", "Stage", "main"]


class UsageError(Exception):
    """A bad command-line argument: the message says what was given and how to fix it."""


STAGES: dict[str, dict[str, Stage]] = {name: entry.runner.STAGES for name, entry in LESSONS.items()}
"""Each lesson's stages, in the order its ``record()`` runs them (a stage's rows carry its name)."""


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
                     help="change one of the lesson's settings, e.g. --set epochs=5 (repeatable); several "
                          "values without spaces: --set temperatures=4,8")  # fmt: skip
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

    teachers = commands.add_parser(
        "teachers", help="train a lesson's teachers into the cache; --ship writes them into the package"
    )
    teachers.add_argument("lesson", help=f"one of {', '.join(LESSONS)}")
    _common(teachers, default_preset="lab")
    teachers.add_argument("--ship", action="store_true",
                          help="write them (in half precision where that costs no accuracy) into kdbook_utils/teachers with their manifest")  # fmt: skip

    show = commands.add_parser("show", help="print the comparison tables of results files")
    show.add_argument(
        "path", type=Path, help="a results folder (searched recursively) or a results .csv/.json"
    )
    return parser


def _common(command: argparse.ArgumentParser, default_preset: str = "quick") -> None:
    command.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: ${PRESET_ENV_VAR} "
                         f"if set, else {default_preset})")  # fmt: skip
    command.set_defaults(default_preset=default_preset)
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


def _preset_name(given: str | None, default: str, command: str) -> tuple[str, str]:
    """The preset a command runs and where it came from: ``--preset``, else ``$KDBOOK_PRESET`` (as the
    notebooks read it), else the command's default. ``record`` writes into the package, so it refuses to
    guess between its default (lab) and another preset in the environment: it asks for ``--preset``."""
    from_environment = os.environ.get(PRESET_ENV_VAR, "").strip()
    if given is not None:
        if from_environment and from_environment.lower() != given.strip().lower():
            print(f"Note: --preset {given} is used; ${PRESET_ENV_VAR}={from_environment} is ignored by this "
                  "command.", file=sys.stderr)  # fmt: skip
        return given, "--preset"
    if from_environment:
        if command == "record" and from_environment.lower() != default:
            raise UsageError(f"record records preset {default!r} unless told otherwise, but ${PRESET_ENV_VAR} is "
                             f"{from_environment!r}: say which with --preset {from_environment} or --preset "
                             f"{default}.")  # fmt: skip
        return from_environment, f"${PRESET_ENV_VAR}"
    return default, "default"


def _preset(name: str, lesson: str, source: str = "--preset") -> Preset:
    key = name.strip().lower()
    if key not in PRESETS:
        origin = f" (from {source})" if source.startswith("$") else ""
        raise UsageError(
            f"Unknown preset {name!r}{origin}; the presets are {', '.join(PRESETS)}.{closest(key, PRESETS)}"
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
    pickles = {"cifar-10-batches-py": "data_batch_1", "cifar-100-python": "meta"}
    if folder.name in pickles or any((folder / file).is_file() for file in pickles.values()):
        raise UsageError(f"--data {root} is torchvision's {folder.name if folder.name in pickles else 'pickle'} "
                         "folder itself; --data takes the folder that holds it. Point at its parent: "
                         f"--data {folder.parent}")  # fmt: skip
    return str(folder)


def _device(name: str | None, preset: Preset) -> torch.device:
    try:
        return resolve_device(name or preset.device)
    except (ValueError, RuntimeError) as error:
        raise UsageError(f"--device {name}: {error}") from error


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # a bare word is a string: --set student=cnn-2x16


def _field_types(settings: Any) -> dict[str, Any]:
    """Each settings field's declared type (``int | None``, ``tuple[float, ...]``, ...)."""
    return typing.get_type_hints(type(settings))


def _optional(hint: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(hint, False)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [part for part in typing.get_args(hint) if part is not type(None)]
        if len(parts) == 1 and len(typing.get_args(hint)) == 2:
            return parts[0], True
    return hint, False


def _convert(value: Any, hint: Any, name: str, assignment: str, current: Any) -> Any:
    """``value`` (a parsed Python literal) as the field's declared type, or a UsageError naming the fix."""
    kind, optional = _optional(hint)
    if value is None:
        if optional:
            return None
        raise UsageError(
            f"--set {assignment}: {name} cannot be None; give a value like its current {current!r}."
        )
    if typing.get_origin(kind) is tuple:
        item_kind = typing.get_args(kind)[0]
        if isinstance(value, str):  # bare words: --set students=cnn-1x8,cnn-2x8
            value = tuple(_parse_value(part.strip()) for part in value.split(",") if part.strip())
        items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if not items:
            raise UsageError(f"--set {assignment}: {name} needs at least one value, e.g. --set {name}="
                             f"{','.join(map(str, current[:2]))}")  # fmt: skip
        return tuple(
            _convert(item, item_kind, name, assignment, current[0] if current else item) for item in items
        )
    if kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"--set {assignment}: {name} is {current!r}; give True or False.")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and " " in value.strip():
                raise _several_values(assignment, name)
            raise UsageError(
                f"--set {assignment}: {name} must be a whole number, like its value {current!r}."
            )
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str) and " " in value.strip():
                raise _several_values(assignment, name)
            raise UsageError(f"--set {assignment}: {name} must be a number, like its value {current!r}.")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise UsageError(f"--set {assignment}: {name} is a str (now {current!r}); got {value!r}. Write it as a "
                             f"Python literal, e.g. --set {name}={current!r}.")  # fmt: skip
        return value
    if isinstance(kind, type) and not isinstance(value, kind):
        raise UsageError(f"--set {assignment}: {name} is a {kind.__name__} (now {current!r}); got {value!r}. Write "
                         f"it as a Python literal, e.g. --set {name}={current!r}.")  # fmt: skip
    return value


def _several_values(assignment: str, name: str) -> UsageError:
    items = ",".join(assignment.partition("=")[2].split())
    return UsageError(f"--set {assignment}: {name} takes one value. A setting with several values is written "
                      f"without spaces, e.g. --set {name}={items}; repeating --set {name}=... adds to it.")  # fmt: skip


def _assignment(settings: Any, assignment: str) -> tuple[str, Any]:
    """``(field, value)`` of ``FIELD=VALUE``, the value converted to the field's declared type."""
    fields = {field.name: field for field in dataclasses.fields(settings)}
    name, sep, text = assignment.partition("=")
    name = name.strip()
    if not sep or not name:
        raise UsageError(f"--set takes FIELD=VALUE, e.g. --set epochs=5; got {assignment!r}.")
    if name not in fields:
        raise UsageError(f"--set {assignment}: the lesson's settings have no field {name!r}; its fields are "
                         f"{', '.join(fields)}.{closest(name, fields)}")  # fmt: skip
    current = getattr(settings, name)
    return name, _convert(_parse_value(text.strip()), _field_types(settings)[name], name, assignment, current)


def _choices(lesson: str, name: str) -> Sequence[str] | None:
    """The names a lesson can build for a settings field that names something (None: not a name)."""
    if lesson == "hinton" and name in ("student", "students"):
        return list(SMALL_CNN_FAMILY)
    if lesson == "lm" and name in ("teacher", "student"):
        return list(GPT_FAMILY)
    if name in ("teacher", "student", "pretrained_teacher"):
        return list_models()
    return {"reduction": REDUCTIONS, "heads": HEAD_STYLES}.get(name)


def _check_setting(lesson: str, name: str, value: Any, assignment: str, current: Any) -> None:
    """Refuse a value the lesson cannot run with (an unknown name, a count below one, a negative seed, a
    learning rate or temperature that is not positive, a negative loss weight) before anything trains."""
    items = value if isinstance(value, tuple) else (value,)
    choices = _choices(lesson, name)
    for item in items:
        if item is None:
            continue
        if choices is not None and item not in choices:
            raise UsageError(f"--set {assignment}: lesson {lesson!r} has no {name.rstrip('s')} {item!r}; the ones it "
                             f"can build are {', '.join(choices)}.{closest(item, choices)}")  # fmt: skip
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            if not math.isfinite(item):
                raise UsageError(f"--set {assignment}: {name} must be a finite number; got {item!r}.")
            if "seeds" in name:
                rule, ok = "a non-negative integer, e.g. 0", item >= 0
            elif "alpha" in name or name == "beta" or name == "gram_epochs":  # 0 switches a term or phase off
                rule, ok = "0 or more", item >= 0
            elif isinstance(item, int):
                rule, ok = "at least 1", item >= 1
            else:
                rule, ok = "a number above 0", item > 0
            if not ok:
                raise UsageError(f"--set {assignment}: {name} must be {rule}; got {item!r}. The lesson's own value "
                                 f"is {current!r}.")  # fmt: skip
    if lesson == "hinton" and "alpha" in name and any(not 0 <= item <= 1 for item in items):
        raise UsageError(f"--set {assignment}: alpha weighs the hard-label term of Hinton KD and lies in [0, 1]; "
                         f"got {value!r}. Use e.g. --set {name}=0.1,0.5.")  # fmt: skip
    if "seeds" in name and len(set(items)) != len(items):
        raise UsageError(
            f"--set {assignment}: {name} repeats a seed; give each seed once, e.g. --set {name}=0,1,2."
        )


def _apply_overrides(lesson: str, settings: Any, assignments: Sequence[str]) -> Any:
    """``settings`` with every ``--set`` applied and checked. A tuple field set more than once collects the
    values (``--set temperatures=4 --set temperatures=8``); another field set twice to different values is
    refused."""
    changes: dict[str, Any] = {}
    given: dict[str, str] = {}
    for assignment in assignments:
        name, value = _assignment(settings, assignment)
        if name in changes:
            if isinstance(value, tuple):
                value = changes[name] + value
            elif value != changes[name]:
                raise UsageError(
                    f"--set {given[name]} and --set {assignment} give {name} two values; keep one."
                )
        _check_setting(lesson, name, value, assignment, getattr(settings, name))
        changes[name], given[name] = value, assignment
    return dataclasses.replace(settings, **changes)


def _stray_set_values(argv: Sequence[str], extra: Sequence[str]) -> str | None:
    """The message for words argparse could not place that follow a ``--set FIELD=VALUE`` (``--set
    temperatures=4 8``: a value with several items written with spaces), or None."""
    for index, token in enumerate(argv):
        value = (
            argv[index + 1]
            if token == "--set" and index + 1 < len(argv)
            else token[6:]
            if token.startswith("--set=")
            else None
        )
        if value is None:
            continue
        after = index + (2 if token == "--set" else 1)
        stray = []
        while after < len(argv) and not argv[after].startswith("-") and argv[after] in extra:
            stray.append(argv[after])
            after += 1
        if stray:
            name, _, first = value.partition("=")
            items = ",".join([*first.split(), *stray])
            return (f"--set {value} {' '.join(stray)}: a setting's value is one argument, so the words after it "
                    f"are not part of it. Write several values without spaces: --set {name}={items} (or repeat "
                    f"--set {name}=... for each value).")  # fmt: skip
    return None


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
    name, source = _preset_name(args.preset, args.default_preset, "run")
    preset = _preset(name, lesson, source)
    if source.startswith("$"):
        print(f"Preset {preset.name} (from {source}).", file=sys.stderr)
    settings = LESSONS[lesson].settings[preset.name]
    if args.seeds:
        if len(set(args.seeds)) != len(args.seeds):
            raise UsageError(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed; give each seed once.")
        settings = dataclasses.replace(settings, seeds=tuple(args.seeds))
    settings = _apply_overrides(lesson, settings, args.overrides)
    stages = _stages(lesson, args.stage)
    root = _data_root(args.data, preset)
    _results_folder(lesson, args.out, preset)
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
    device = _device(args.device, preset)
    if spread:
        distributed.init(device)
    progress = not args.quiet and sys.stderr.isatty() and distributed.is_main_process()
    started = time.perf_counter()
    entry = LESSONS[lesson]
    try:
        splits = entry.data(preset, root=root, progress=progress)
    except DatasetNotFoundError as error:
        raise UsageError(f"{error}\nWith the command line: --data <folder>.") from error
    except DamagedDataError as error:
        raise UsageError(str(error)) from error
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
    precision = precision_name(runner.precision)
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


def _results_folder(lesson: str, out: Path | None, preset: Preset) -> None:
    """Refuse an output folder that cannot be written before anything trains."""
    folder = results_path(lesson, preset.name, out).parent
    try:
        check_results_folder(folder)
    except OSError as error:  # NotADirectoryError, PermissionError
        option = f"--out {out}" if out is not None else "The package's results folder"
        raise UsageError(f"{option}: {error}") from error


def command_record(args: argparse.Namespace) -> int:
    lesson = _lesson(args.lesson)
    name, source = _preset_name(args.preset, args.default_preset, "record")
    preset = _preset(name, lesson, source)
    root = _data_root(args.data, preset)
    device = _device(args.device, preset)
    _results_folder(lesson, None, preset)
    progress = not args.quiet and sys.stderr.isatty()
    try:
        table_path = record(lesson, preset, root=root, device=device, progress=progress)
    except DatasetNotFoundError as error:
        raise UsageError(f"{error}\nWith the command line: --data <folder>.") from error
    except DamagedDataError as error:
        raise UsageError(str(error)) from error
    print(f"Wrote {table_path} and {table_path.with_suffix('.json').name}.\n")
    print(comparison_text(*read_results(table_path.with_suffix(""))))
    return 0


def command_teachers(args: argparse.Namespace, argv: Sequence[str]) -> int:
    lesson = _lesson(args.lesson)
    preset = _preset(args.preset, lesson)
    root = _data_root(args.data, preset)
    device = _device(args.device, preset)
    progress = not args.quiet and sys.stderr.isatty()
    try:
        runner = train_teachers(LESSONS[lesson].runner, preset, LESSONS[lesson].data, root=root, device=device,
                                progress=progress)  # fmt: skip
    except DatasetNotFoundError as error:
        raise UsageError(f"{error}\nWith the command line: --data <folder>.") from error
    for role, model in runner.trained_models().items():
        print(f"{role}: {model.path} ({model.source})")
    if args.ship:
        for shipped in ship(runner, "python -m kdbook_utils " + shlex.join(argv)):
            print(f"shipped {shipped['file']} in {shipped['stored_as']}: {shipped['bytes'] / 1e6:.1f} MB, test accuracy "
                  f"{shipped['test_accuracy']:.2f} % (float32 {shipped['test_accuracy_float32']:.2f} %)")  # fmt: skip
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
        try:
            text = comparison_text(runs, provenance)
        except ValueError as error:
            raise UsageError(f"Cannot compare the results {stem.with_suffix('.csv')}: {error}") from error
        print(f"== {stem.with_suffix('.csv')}")
        print(text)
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
        declared = STAGES.get(lesson, {}).get(str(stage))
        split = declared.split if declared is not None else "val"
        output = declared.output if declared is not None else None
        if split not in set(part["split"]):
            split = str(part["split"].iloc[0])
        lines.append(
            f"\nStage {stage} ({split} split{f', output {output!r}' if output else ''}, accuracy in %):"
        )
        if baseline is not None and baseline in set(part["method"]):
            comparison = compare(part, baseline, split=split, output=output)
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
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = _stray_set_values(argv, extra)
        if stray is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        print(f"{parser.prog}: error: {stray}", file=sys.stderr)
        return 2
    try:
        if args.command == "list":
            return command_list(args)
        if args.command == "run":
            return command_run(args, argv)
        if args.command == "record":
            return command_record(args)
        if args.command == "teachers":
            return command_teachers(args, argv)
        return command_show(args)
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
