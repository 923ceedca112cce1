"""The lessons' teachers, trained once and shipped with the package.

Every lesson learns from teachers that take minutes (``quick``) to hours (``lab`` on a CPU) to train. The
course trains them once, with the same code a lesson would run, and ships them in
``kdbook_utils/teachers/``: each file stores its weights in half precision, and ``manifest.json`` records
its SHA-256 (checked before every load), its recipe, what it was trained on, the precision it trained in
and its accuracy on the test split. A lesson finds them by their recipe
(:func:`kdbook_utils.experiments.cached_model`), so a changed recipe is never served a stale teacher.

::

    python -m kdbook_utils teachers hinton --preset lab --data ~/data/cifar10          # train into the cache
    python -m kdbook_utils teachers hinton --preset lab --data ~/data/cifar10 --ship   # and ship them
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from kdbook_utils.checkpoints import MANIFEST, SHIPPED, file_sha256, read_checkpoint, save_checkpoint
from kdbook_utils.experiments import TrainedModel, git_commit, machine_description
from kdbook_utils.lessons import LessonRunner
from kdbook_utils.presets import Preset
from kdbook_utils.train import DeviceLike

try:
    import fcntl
except ImportError:  # Windows: no POSIX file locks
    fcntl = None  # type: ignore[assignment]

__all__ = ["ship", "train_teachers"]


def train_teachers(
    runner_class: type[LessonRunner],
    preset: Preset,
    data: Callable[..., Any],
    *,
    root: str | os.PathLike | None = None,
    device: DeviceLike = None,
    progress: bool = True,
) -> LessonRunner:
    """Train (or load) every teacher of a lesson, its notebook's included, into the cache: the lesson's
    runner prepared with ``train_teachers=True``, whatever the preset says, on ``data(preset, root=)``
    (the lesson's data: ``preset_data`` for the lessons on images)."""
    splits = data(preset, root=root, progress=progress)
    runner = runner_class.prepare(
        preset.replace(train_teachers=True), splits, device=device, progress=progress
    )
    runner.notebook_teachers()
    return runner


def _left_out(model: TrainedModel) -> tuple[str, ...]:
    """Weights a shipped file need not store: exit heads trained on a frozen copy of the teacher leave the
    copy out (the loader rebuilds it from the teacher, which ships on its own)."""
    recipe = read_checkpoint(model.path)["metadata"].get("recipe", {})
    return ("backbone.",) if recipe.get("kind") == "teacher exits" and not recipe.get("joint") else ()


HALF_PRECISION_TOLERANCE = 0.1
"""Test accuracy, in points, that storing a teacher in half precision may cost; a teacher that would lose
more ships in float32."""


def ship(runner: LessonRunner, command: str, folder: Path = SHIPPED) -> list[dict[str, Any]]:
    """Write every teacher of ``runner`` into the package's shipped models, in half precision unless that
    costs more than :data:`HALF_PRECISION_TOLERANCE` points of test accuracy (measured after the round trip
    through the file), and record each in the manifest. Teachers
    this lesson shipped before for the same preset, under a recipe it no longer uses, are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for role, trained in runner.trained_models().items():
        stored = read_checkpoint(trained.path)
        name = f"{trained.model.cache_key}.pt"
        float32_accuracy = runner.accuracy(trained.model, "test")
        target = save_checkpoint(trained.model, folder / name, storage=torch.float16, leave_out=_left_out(trained),
                                 **stored["metadata"])  # fmt: skip
        stored_as = "float16"
        shipped_accuracy = runner.accuracy(_half_copy(trained.model, read_checkpoint(target)), "test")
        if float32_accuracy - shipped_accuracy > HALF_PRECISION_TOLERANCE:  # half precision costs accuracy
            target = save_checkpoint(
                trained.model, folder / name, leave_out=_left_out(trained), **stored["metadata"]
            )
            stored_as, shipped_accuracy = "float32", float32_accuracy
        history = stored["metadata"].get("history") or {}
        records.append({
            "file": name, "lesson": runner.lesson, "role": role, "preset": runner.preset.name,
            "recipe": stored["metadata"].get("recipe", {}), "trained_on": stored["metadata"].get("recipe", {}).get("train_data"),
            "precision": stored["metadata"].get("recipe", {}).get("precision", "float32"), "stored_as": stored_as,
            "test_accuracy": shipped_accuracy,
            "test_accuracy_float32": float32_accuracy, "test_examples": len(runner.splits.test),
            "train_seconds": round(sum(history.get("seconds", [])), 1), "bytes": target.stat().st_size,
            "sha256": file_sha256(target), "machine": machine_description(), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "command": command,
        })  # fmt: skip
    with _manifest_lock(folder):  # two lessons shipping at once each keep the other's entries
        manifest_path = folder / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"models": {}}
        for record in records:
            manifest["models"][record["file"]] = {
                key: value for key, value in record.items() if key != "file"
            }
        current = {record["file"] for record in records}
        for name, record in list(manifest["models"].items()):  # this lesson's teachers of an older recipe
            if (
                record.get("lesson") == runner.lesson
                and record.get("preset") == runner.preset.name
                and name not in current
            ):
                del manifest["models"][name]
                (folder / name).unlink(missing_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".manifest.", suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(manifest, file, indent=1, sort_keys=True)
        os.replace(temporary, manifest_path)
    return records


@contextlib.contextmanager
def _manifest_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder``'s manifest while it is read, changed and written (POSIX only:
    elsewhere shipping two lessons at once is the one thing not to do)."""
    if fcntl is None:
        yield
        return
    with open(folder / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _half_copy(model: torch.nn.Module, checkpoint: dict[str, Any]) -> torch.nn.Module:
    """``model`` with the weights a shipped file holds: rounded to half precision, as a learner gets them."""
    rounded = copy.deepcopy(model)
    rounded.load_state_dict(checkpoint["state_dict"], strict=not checkpoint["metadata"].get("left_out"))
    return rounded.eval()
