"""Each lesson's ``lab`` pipeline, end to end on a small slice of the real CIFAR-10, so the lab path cannot rot.

The same code as ``python -m kdbook_utils record <lesson> --preset lab`` (:func:`records.record`) runs with
the lab preset and settings shrunk to one short epoch on a few hundred images; the written results file is
then read back and shown through the same comparison as the committed results. The numbers mean nothing;
what is checked is that every stage runs, every run lands in the table, and the provenance is complete.
Skipped where the CIFAR-10 copy is absent (see ``conftest.cifar10_root``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from conftest import private_cache

from kdbook_utils import experiments
from kdbook_utils.experiments import RESULT_COLUMNS, read_results
from kdbook_utils.lessons import records
from kdbook_utils.presets import get_preset

pytestmark = pytest.mark.cifar

TINY_LAB = get_preset("lab").replace(
    train_subset=360, test_subset=120, val_size=120, teacher_epochs=1, student_epochs=1, batch_size=64,
    seeds=(0, 1), train_teachers=True,  # these one-epoch teachers are not the shipped ones: train them
)  # fmt: skip

SHRINK: dict[str, dict[str, Any]] = {
    "hinton": {"teacher": "resnet8", "teacher_epochs": 1, "student_images": 200, "epochs": 1,
               "temperatures": (4.0,), "alphas": (0.5,), "sweep_seeds": (0,), "seeds": (0, 1),
               "students": ("cnn-1x8",)},
    "lsl": {"teacher": "alexnet_lsl_teacher_eighth", "student": "alexnet_lsl_student_eighth", "teacher_epochs": 1,
            "student_images": 120, "epochs": 1, "projection_dim": 32, "alphas": (0.3,), "seeds": (0, 1)},
    "crosslayer": {"width": 0.125, "teachers": 2, "teacher_epochs": 1, "student_images": 120, "gram_epochs": 1,
                   "task_epochs": 1, "seeds": (0, 1),
                   "chain": {"base_width": 4, "teacher_epochs": 1, "adapter_epochs": 1}},
    "mskd": {"teacher_options": {"base_width": 8}, "student_options": {"base_width": 8}, "student_images": 120,
             "teacher_epochs": 1, "head_epochs": 1, "epochs": 1, "seeds": (0, 1)},
}  # fmt: skip


@pytest.mark.parametrize("lesson", sorted(SHRINK))  # the lessons on images (lesson 5 writes its own text)
def test_lab_pipeline_runs_one_short_epoch_on_real_cifar(
    lesson: str, cifar10_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decoded_images: Path
) -> None:
    monkeypatch.setenv("KDBOOK_CACHE", str(private_cache(tmp_path / "cache", decoded_images)))
    # One epoch on a few hundred images ends near chance, which the lessons rightly flag as a failed run
    # (and lesson 1 then has no KD setting to choose); here only the plumbing is under test.
    monkeypatch.setattr(experiments, "FAILED_IF_BELOW_CHANCE_TIMES", 0.0)
    entry = records.lesson_entry(lesson)
    settings = dataclasses.replace(entry.settings["lab"], **SHRINK[lesson])
    table_path = records.record(
        lesson, TINY_LAB, root=cifar10_root, device="cpu", folder=tmp_path, progress=False, settings=settings
    )

    runs, provenance = read_results(table_path.with_suffix(""))
    assert set(RESULT_COLUMNS) <= set(runs.columns)
    assert (runs["lesson"] == lesson).all()
    final = runs[runs["stage"] == "final"]
    assert entry.baseline in set(final["method"]), "the baseline of the headline comparison was not run"
    for method, rows in final.groupby("method"):
        assert sorted(set(rows[rows["split"] == "test"]["seed"])) == [0, 1], (
            f"{method}: not run on every seed"
        )
    assert runs["accuracy"].between(0, 100).all()  # percent
    for key in (
        "commit",
        "date",
        "machine",
        "torch",
        "wall_seconds",
        "settings_hash",
        "preset_hash",
        "command",
    ):
        assert provenance[key] not in (None, ""), key
    assert provenance["settings"]["seeds"] == [0, 1]
    assert provenance["preset_config"]["dataset"] == "cifar10"
