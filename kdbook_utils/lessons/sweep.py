"""Many student runs at once: a lesson's (job, seed) grid as Ray tasks, resumable after an interruption.

A lesson's tables are grids of independent runs (jobs x seeds, see
:class:`~kdbook_utils.lessons.LessonRunner`). By default a runner trains them one after the other in
its own process. :class:`RayExecutor` instead sends each (job, seed) to a Ray task with its own share of
the machine (``num_cpus``, ``num_gpus``), on this machine or on a cluster::

    runner = HintonLesson.prepare(preset, splits)            # teachers trained (or loaded) here, once
    runner.executor = RayExecutor(RunFolder("results/.runs/lab/hinton"), "hinton", preset, runner.settings)
    runner.sweep()                                           # the same table, built from Ray tasks

or from the command line, ``python -m kdbook_utils run hinton --preset lab --ray``.

* A worker rebuilds the lesson's runner from plain values (lesson, preset, settings, data root, device):
  it loads the data and takes the teachers from the on-disk cache (``cached_teacher``), so the driver
  prepares the teachers before any task starts. On a cluster of several machines the cache folder
  (``$KDBOOK_CACHE``) and the data must be on a file system every machine sees.
* Each finished run's rows are written at once to their own file in a :class:`RunFolder`, named by a
  hash of everything that makes the run (lesson, preset, settings, job, seed). A sweep that was
  interrupted (a killed process, a lost machine) is resumed by running the same command again: runs
  whose file is there are read back, not trained again, and only the rest are sent out.
* The table comes back in the order the sequential loop makes it (seeds, then jobs), so a lesson's
  results files are the same whichever way they were computed.

Ray is an optional extra (``pip install "kdbook-utils[scale]"``); without it everything runs in one
process as before.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from kdbook_utils.checkpoints import CACHE_ENV_VAR
from kdbook_utils.experiments import recipe_hash
from kdbook_utils.lessons import LessonRunner
from kdbook_utils.lessons.records import lesson_entry
from kdbook_utils.presets import DATA_ROOT_ENV_VAR, Preset, get_preset

__all__ = ["RayExecutor", "RunFolder", "ray_available", "start_ray"]

INSTALL_HINT = 'pip install "kdbook-utils[scale]" (or pip install ray)'


def ray_available() -> bool:
    """Whether Ray is installed."""
    return importlib.util.find_spec("ray") is not None


def _ray() -> Any:
    """The ``ray`` module, imported on first use: it takes seconds to import, and most commands never
    need it (and it is an optional extra)."""
    if not ray_available():
        raise ModuleNotFoundError(
            f"Running on Ray needs Ray, which is not installed; install it with {INSTALL_HINT}."
        )
    return importlib.import_module("ray")


class RunFolder:
    """One file per finished run: ``<folder>/<key>.json`` holds the run's rows (its splits and outputs).

    Files are written atomically (a temporary name, then a rename), so a file that is there is complete.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def done(self, key: str) -> bool:
        return self.path(key).is_file()

    def read(self, key: str) -> list[dict[str, Any]]:
        return json.loads(self.path(key).read_text())["rows"]

    def write(self, key: str, rows: list[dict[str, Any]], about: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(key)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_text(json.dumps({"run": dict(about), "rows": rows}, indent=1, default=str))
        os.replace(temporary, target)

    def finished(self) -> list[str]:
        """The keys of the runs whose rows are there."""
        return sorted(path.stem for path in self.folder.glob("*.json")) if self.folder.is_dir() else []


def run_key(lesson: str, preset: Preset, settings: Any, spec: Mapping[str, Any], seed: int) -> str:
    """The name of a run's file: a hash of everything that makes the run."""
    return recipe_hash({"lesson": lesson, "preset": dataclasses.asdict(preset),
                        "settings": dataclasses.asdict(settings), "job": dict(spec), "seed": int(seed)})  # fmt: skip


def start_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start a local Ray instance (``address=None``; ``num_cpus``/``num_gpus`` default to the machine's)
    or connect to a running cluster (``address="auto"`` or ``"ray://host:10001"``).

    The workers get this process's ``$KDBOOK_CACHE`` and ``$KDBOOK_DATA``, so they find the cached
    teachers and the data where the driver does.
    """
    ray = _ray()
    if ray.is_initialized():
        return
    env = {name: os.environ[name] for name in (CACHE_ENV_VAR, DATA_ROOT_ENV_VAR) if name in os.environ}
    local = (
        {"num_cpus": num_cpus, "num_gpus": num_gpus, "include_dashboard": False} if address is None else {}
    )
    ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, **local)


class RayExecutor:
    """A :class:`~kdbook_utils.lessons.LessonRunner` executor: ``runner.table(jobs, seeds)`` through Ray.

    Args:
        runs: where each finished run's rows go (and are found again on a resumed sweep).
        lesson, preset, settings: what the workers rebuild the runner from (plain, picklable values).
        root: the data root the workers load the data from (None: ``$KDBOOK_DATA`` or the default).
        device: the device each worker trains on (None: the preset's device rule on the worker; a task
            with ``num_gpus`` sees only its own GPU(s), as ``cuda``).
        num_cpus, num_gpus: each run's share of a machine (fractions of a GPU are allowed: 0.5 packs two
            runs on one GPU). A task also uses ``num_cpus`` threads for PyTorch.
        progress: a bar of finished runs.
    """

    def __init__(self, runs: RunFolder, lesson: str, preset: Preset, settings: Any, *, root: str | None = None,
                 device: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
                 progress: bool = True) -> None:  # fmt: skip
        _ray()
        if num_cpus <= 0 or num_gpus < 0:
            raise ValueError(f"Each run needs num_cpus > 0 and num_gpus >= 0; got {num_cpus} and {num_gpus}.")
        self.runs = runs
        self.lesson, self.preset, self.settings = lesson, preset, settings
        self.root, self.device = root, device
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.progress = progress
        self.trained = 0  # runs trained by this executor (not read back from the run folder)
        self.reused = 0  # runs read back from the run folder

    def __call__(
        self, runner: LessonRunner, jobs: Mapping[str, Mapping[str, Any]], seeds: Sequence[int]
    ) -> pd.DataFrame:
        if not seeds:
            raise ValueError("A table needs at least one seed, e.g. seeds=(0, 1, 2).")
        grid = [(label, int(seed)) for seed in seeds for label in jobs]
        keys = {
            (label, seed): run_key(self.lesson, self.preset, self.settings, jobs[label], seed)
            for label, seed in grid
        }
        missing = list(dict.fromkeys(key for key in keys.values() if not self.runs.done(key)))
        self.reused += len(set(keys.values())) - len(missing)
        if missing:
            start_ray()
            self._train(missing, {key: (label, seed) for (label, seed), key in keys.items()}, jobs)
        rows: list[dict[str, Any]] = []
        for label, seed in grid:
            rows += [{"lesson": self.lesson, "method": label, "seed": seed, **row}
                     for row in self.runs.read(keys[(label, seed)])]  # fmt: skip
        return pd.DataFrame(rows)

    def _train(
        self, keys: list[str], what: dict[str, tuple[str, int]], jobs: Mapping[str, Mapping[str, Any]]
    ) -> None:
        ray = _ray()
        task = ray.remote(_train_one).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        pending = {}
        for key in keys:
            label, seed = what[key]
            pending[task.remote(self.lesson, self.preset.name, self.settings, self.root, self.device,
                                dict(jobs[label]), seed, self.num_cpus)] = key  # fmt: skip
        bar = tqdm(total=len(keys), desc=f"{self.lesson} runs on Ray", unit="run", disable=not self.progress)
        try:
            while pending:
                finished, _ = ray.wait(list(pending), num_returns=1)
                key = pending.pop(finished[0])
                rows = ray.get(finished[0])  # a task's error is raised here, with the worker's traceback
                label, seed = what[key]
                self.runs.write(key, rows, {"lesson": self.lesson, "preset": self.preset.name, "job": dict(jobs[label]),
                                            "seed": seed, "label": label})  # fmt: skip
                self.trained += 1
                bar.update()
        finally:
            for reference in pending:
                ray.cancel(reference, force=True)
            bar.close()


# ------------------------------------------------------------------------------------------ the workers

_RUNNERS: dict[str, LessonRunner] = {}  # each worker process prepares a lesson once, then reuses it


def _worker_runner(
    lesson: str, preset_name: str, settings: Any, root: str | None, device: str | None
) -> LessonRunner:
    key = recipe_hash({"lesson": lesson, "preset": preset_name, "settings": dataclasses.asdict(settings),
                       "root": root, "device": device})  # fmt: skip
    if key not in _RUNNERS:
        preset = get_preset(preset_name)
        splits = lesson_entry(lesson).data(preset, root=root, progress=False)
        _RUNNERS[key] = lesson_entry(lesson).runner.prepare(preset, splits, device=device, progress=False,
                                                            settings=settings)  # fmt: skip
    return _RUNNERS[key]


def _train_one(lesson: str, preset_name: str, settings: Any, root: str | None, device: str | None,
               spec: dict[str, Any], seed: int, threads: float) -> list[dict[str, Any]]:  # fmt: skip
    """One (job, seed) of a lesson on a Ray worker: its tidy rows without the lesson, label and seed."""
    torch.set_num_threads(max(1, int(threads)))
    runner = _worker_runner(lesson, preset_name, settings, root, device)
    rows = runner.job(spec, seed).rows()
    runner.runs.clear()  # the driver keeps the rows; the worker need not keep the trained network
    return rows
